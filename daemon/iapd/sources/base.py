"""The one interface every token source implements, so the cache never cares where a token
comes from (google-auth's `Credentials` idea, made async)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from iapd.clock import Clock
from iapd.jwt import MalformedToken, unverified_claims
from iapd.errors import UpstreamError


@dataclass(frozen=True)
class IdToken:
    value: str = field(repr=False)
    claims: dict
    lifetime: float
    received_wall: float
    received_mono: float

    @classmethod
    def received(cls, value: str, clock: Clock) -> "IdToken":
        """Lifetime comes from the token itself (`exp - iat`), and is counted from *our* clock at
        receipt: a skewed IdP or local clock then cannot make us serve an expired token."""
        try:
            claims = unverified_claims(value)
            lifetime = float(claims["exp"]) - float(claims["iat"])
        except (MalformedToken, KeyError, TypeError, ValueError):
            raise UpstreamError("the token endpoint returned a malformed ID token") from None
        if lifetime <= 0:
            raise UpstreamError("the token endpoint returned an ID token with no lifetime")
        return cls(value, claims, lifetime, clock.wall(), clock.mono())

    def remaining(self, clock: Clock) -> float:
        return min(self.received_wall + self.lifetime - clock.wall(),
                   self.received_mono + self.lifetime - clock.mono())

    @property
    def email(self) -> str | None:
        return self.claims.get("email")


class TokenSource(Protocol):
    """Produces ID tokens for an audience from one credential.

    `key` names the credential: profiles whose sources share a key share logins, refresh
    tokens and login-required state. `fetch` raises LoginRequired, UpstreamUnavailable
    (transient) or UpstreamError; it never blocks the event loop.
    """

    key: str
    kind: str

    async def fetch(self, audience: str | None) -> IdToken: ...

    def identity(self) -> str | None:
        """Who tokens are for (an email), if known without a network call."""
        ...
