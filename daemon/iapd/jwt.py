"""Reading a JWT's claims without verifying it.

The daemon is a courier: the token came straight from the token endpoint over TLS, and IAP
verifies it. We only need `exp`, `iat`, `aud` and `email` to schedule renewal and report status.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any


class MalformedToken(ValueError):
    pass


def unverified_claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (IndexError, ValueError) as exc:
        raise MalformedToken("not a JWT") from exc
    if not isinstance(claims, dict):
        raise MalformedToken("JWT payload is not an object")
    return claims


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, for logs and status (never the token)."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]
