"""The one interface every token source implements, so the cache never cares where a token
comes from (google-auth's `Credentials` idea, made async), and what every source is handed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import aiohttp

from iapd.clock import Clock
from iapd.config import Endpoints
from iapd.errors import UpstreamError
from iapd.jwt import MalformedToken, unverified_claims

if TYPE_CHECKING:
    from iapd.google_creds import GoogleAuth


MAX_LIFETIME = 7 * 24 * 3600.0  # no ID or access token lives a week; an answer that says so is wrong


def _check_printable(value: str) -> None:
    """A token is printable ASCII without spaces (RFC 6750's b64token and then some): one with a
    CR/LF in it would add headers to every request `--format header` or a proxy makes with it."""
    if not value or not all("!" <= c <= "~" for c in value):
        raise UpstreamError("the token endpoint returned a token with characters no token has")


@dataclass(frozen=True)
class SourceContext:
    """Everything a source may use, passed in explicitly (google-auth's `refresh(request)`
    passes its transport the same way): sources never see the agent, the cache or a socket."""

    session: aiohttp.ClientSession
    clock: Clock
    endpoints: Endpoints
    http_timeout: float
    google_auth: "GoogleAuth"  # google-auth's synchronous code, run off the loop and bounded


@dataclass(frozen=True)
class IdToken:
    value: str = field(repr=False)
    claims: dict
    lifetime: float  # from receipt, on our clocks
    received_wall: float
    received_mono: float
    # As issued (`exp - iat`), however much of it was left on receipt: what the renewal margin
    # is sized from, so a token handed back from an upstream's cache is not taken for fresh.
    issued_lifetime: float

    @classmethod
    def opaque(cls, value: str, clock: Clock, expires_in: float) -> "IdToken":
        """An opaque access token (no claims to read): its life is the response's `expires_in`."""
        if not 0 < expires_in <= MAX_LIFETIME:  # NaN fails this too
            raise UpstreamError("the token endpoint returned an impossible expires_in")
        _check_printable(value)
        return cls(value, {}, expires_in, clock.wall(), clock.mono(), expires_in)

    @classmethod
    def received(cls, value: str, clock: Clock, server_date: float | None = None,
                 expires_in: float | None = None) -> "IdToken":
        """A token's life is the *smaller* of two measures, both counted from receipt on our
        clocks: its full lifetime (`exp - iat`: a skewed IdP or local clock cannot make us
        serve it expired), and what is left of it by its own `exp`, read against the issuer's
        clock as its `Date` header shows it. The second matters when an upstream hands back a
        token it cached — the metadata server does — which arrives with minutes, not an hour,
        left."""
        _check_printable(value)
        try:
            claims = unverified_claims(value)
            exp, iat = float(claims["exp"]), float(claims["iat"])
        except (MalformedToken, KeyError, TypeError, ValueError):
            raise UpstreamError("the token endpoint returned a malformed ID token") from None
        # Numbers from an issuer are checked, not trusted: a NaN or infinite `exp` would be
        # cached forever (and break every status answer).
        if not (math.isfinite(exp) and math.isfinite(iat)) or exp - iat > MAX_LIFETIME:
            raise UpstreamError("the token endpoint returned an ID token with an impossible exp or iat")
        if expires_in is not None and not 0 < expires_in <= MAX_LIFETIME:
            raise UpstreamError("the token endpoint returned an impossible expires_in")
        wall = clock.wall()
        issued = lifetime = exp - iat
        if server_date is not None:
            lifetime = min(lifetime, exp - server_date)
        if expires_in is not None:  # an access token's `expires_in` may be shorter than its JWT says
            issued = lifetime = min(lifetime, expires_in)
        if lifetime <= 0:
            raise UpstreamError("the token endpoint returned an ID token that has already expired")
        return cls(value, claims, lifetime, wall, clock.mono(), issued)

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
    (transient), UpstreamError (refused) or ConfigProblem; it never blocks the event loop.
    """

    key: str
    kind: str

    async def fetch(self, audience: str | None) -> IdToken: ...

    def identity(self) -> str | None:
        """Who tokens are for (an email), if known without a network call."""
        ...
