"""What can go wrong while getting a token, as the socket API reports it.

Each class carries the API's error code and HTTP status, so the server maps an exception to a
response in one place and the client maps the code to an exit status. Messages are one line, for
a person, and never contain a token, a refresh token or a secret.
"""

from __future__ import annotations

import traceback

from iapctl.shown import shown


class IapdError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, **extra: object) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message
        self.extra = extra  # more JSON fields for the API's error body
        self.http_status: int | None = None  # Google's HTTP status, where one was received

    def with_extra(self, **extra: object) -> "IapdError":
        clone = type(self)(self.message, **{**self.extra, **extra})
        return clone


class LoginRequired(IapdError):
    """No usable refresh token: never logged in, logged out, or the grant is dead
    (`invalid_grant`, incl. a reauthentication policy's `invalid_rapt`). Never retried."""

    code = "login_required"
    status = 401


class ViaLoginRequired(LoginRequired):
    """The `via` profile in front of an issuer needs a login — not this profile's own login,
    which stays (and stays live at its issuer). `extra["profile"]` names the one to log in."""


class UpstreamUnavailable(IapdError):
    """Transient: 5xx, 429, timeouts, network errors. Retried with backoff."""

    code = "upstream_unavailable"
    status = 503


class UpstreamError(IapdError):
    """Google said no in a way retrying will not fix soon (invalid_client, permission denied, an
    unknown audience): retried rarely (hourly), and at once after a login."""

    code = "upstream_error"
    status = 502


class ConfigProblem(IapdError):
    """The profile cannot work as configured (a missing key file, no audience for a service
    account, a credentials file of the wrong type): never retried until the config changes."""

    code = "bad_config"
    status = 422


class UnknownProfile(IapdError):
    code = "unknown_profile"
    status = 404


class BadRequest(IapdError):
    code = "bad_request"
    status = 400


def without_message(exc: BaseException) -> str:
    """An unexpected exception for the log: its type and where it was raised, not its message
    — a library's message may quote a response body, a URL or a header, and so a secret."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__module__}.{type(exc).__qualname__} at {where or 'unknown'}"


def printable(text: str) -> str:
    """`text` with control characters escaped: messages quote what an IdP or a browser sent
    (`error_description`, a redirect URL), and they end up on someone's terminal. (The client's
    rule, iapctl.shown, so that the two agree.)"""
    return shown(text)
