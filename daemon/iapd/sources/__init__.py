"""Token sources: where ID tokens come from (a user's refresh token, service accounts)."""
