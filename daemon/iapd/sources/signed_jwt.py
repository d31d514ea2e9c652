"""IAP's second credential for service accounts: a JWT the service account signs itself.

IAP accepts, beside Google-issued ID tokens, a JWT with `iss` = `sub` = the service account's
email, `aud` = the app's URL (exactly, or with a path wildcard `https://app.example.com/*`),
`iat` now and `exp` at most an hour later, signed by one of the account's keys (`kid` in the
header). No token endpoint, no OAuth client in IAP's programmatic allowlist, and it works for
apps behind Identity Platform or workforce identity federation.

  key_file     signed here with the key: no network call at all
  impersonate  IAM Credentials `signJwt` for the target, as the caller credentials
  metadata     `signJwt` for the machine's own service account, with the metadata server's
               access token (the account needs `iam.serviceAccounts.signJwt` on itself)
  adc          a key file signs here; an impersonation or federation file signs through
               `signJwt` for the account it names

The JWT's clock is the system's (IAP reads `iat`/`exp` against Google's), as for key-file
assertions; its lifetime on our clocks is counted from receipt like every other token.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from iapd.config import ADCSource, ImpersonateSource, KeyFileSource, MetadataSource
from iapd.errors import ConfigProblem, UpstreamError
from iapd.google_http import fetch, json_object
from iapd.key_file import ServiceAccountKey
from iapd.sources.base import IdToken, SourceContext
from iapd.sources.service_account import AccessTokenSource, adc_stamp, iam_credentials, resolve_adc

# IAP refuses a JWT whose `exp` is more than an hour after its `iat`.
JWT_LIFETIME = 3600


class Signer(Protocol):
    """Signs a JWT payload as one service account."""

    key: str

    def email(self) -> str | None: ...

    async def sign(self, claims: dict[str, Any]) -> str: ...


class KeySigner:
    """A service-account key file: the signature is made here (~1 ms of CPU, off the loop)."""

    def __init__(self, path: str, ctx: SourceContext) -> None:
        self.path = path
        self.ctx = ctx
        self.key = f"key_file:{path}"
        self._key: ServiceAccountKey | None = None

    def email(self) -> str | None:
        return self._key.email if self._key else None

    async def sign(self, claims: dict[str, Any]) -> str:
        if self._key is None:
            self._key = await self.ctx.google_auth.run(ServiceAccountKey.load, self.path)
        return await self.ctx.google_auth.run(self._key.sign_jwt, {**claims, "iss": self._key.email, "sub": self._key.email})


class IamSigner:
    """IAM Credentials `signJwt` for `target`, authorised by the caller's access token."""

    def __init__(self, target: str | None, delegates: list[str], caller, ctx: SourceContext,
                 key: str, find_target=None) -> None:
        self.target = target
        self.delegates = delegates
        self.caller = caller  # has `async token() -> str`
        self.ctx = ctx
        self.key = key
        self._find_target = find_target  # the metadata server's own account, asked once

    def email(self) -> str | None:
        return self.target

    async def sign(self, claims: dict[str, Any]) -> str:
        if self.target is None:
            self.target = await self._find_target()
        signed, _ = await iam_credentials(
            self.ctx, self.caller, self.target, "signJwt",
            {"payload": json.dumps({**claims, "iss": self.target, "sub": self.target})}, self.delegates, "signedJwt",
            f"signing a JWT as {self.target}",
            f"permission denied on signJwt: the caller may not sign JWTs as {self.target} (it needs "
            "iam.serviceAccounts.signJwt on it: roles/iam.serviceAccountTokenCreator)")
        return signed


class MetadataAccessToken:
    """The metadata server's access token for its default service account (what signJwt is
    called with on GCE, GKE, Cloud Run), and that account's email."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx

    def _url(self, leaf: str) -> str:
        base = self.ctx.endpoints.metadata_url.rstrip("/")
        return f"{base}/computeMetadata/v1/instance/service-accounts/default/{leaf}"

    async def email(self) -> str:
        answer = await fetch(self.ctx.session, "GET", self._url("email"), what="asking the metadata server",
                             headers={"Metadata-Flavor": "Google"})
        return answer.text.strip()

    async def token(self) -> str:
        answer = await fetch(self.ctx.session, "GET", self._url("token"), what="asking the metadata server",
                             headers={"Metadata-Flavor": "Google"})
        token = json_object(answer, "the metadata server's access token").get("access_token")
        if not isinstance(token, str):
            raise UpstreamError("the metadata server returned no access token")
        return token


class SignedJwtSource:
    """Tokens for an `aud` that is the app's URL (the cache's "audience" for these profiles)."""

    kind = "service_account:signed_jwt"

    def __init__(self, profile: str, signer: Signer | None, ctx: SourceContext, adc: ADCSource | None = None) -> None:
        self.profile = profile
        self.ctx = ctx
        self._signer = signer
        self._adc = adc  # resolved on first use, and again when the file changes
        self._stamp: tuple | None = None
        self.key = "jwt:" + (signer.key if signer is not None else f"adc:{adc.credentials_file or 'default'}")

    def identity(self) -> str | None:
        return self._signer.email() if self._signer is not None else None

    async def changed(self) -> bool:
        """For `adc`: whether the credentials file is another one now (then it is read again)."""
        if self._adc is None:
            return False
        stamp = await adc_stamp(self._adc)
        if stamp == self._stamp:
            return False
        self._signer, self._stamp = None, stamp
        return True

    async def fetch(self, audience: str | None) -> IdToken:
        if not audience:
            raise ConfigProblem(f"profile {self.profile!r}: a signed JWT needs `jwt_audience` (the app's URL)")
        if self._signer is None:
            assert self._adc is not None
            self._stamp = await adc_stamp(self._adc)
            self._signer = await self._resolve_adc(self._adc)
        now = int(time.time())
        signed = await self._signer.sign({"aud": audience, "iat": now, "exp": now + JWT_LIFETIME})
        return IdToken.received(signed, self.ctx.clock)

    async def _resolve_adc(self, config: ADCSource) -> Signer:
        adc = await resolve_adc(config, self.ctx, "to sign a JWT as", "is no service account to sign a JWT as")
        if adc.kind == "metadata":
            return _metadata_signer(self.ctx)
        if adc.kind == "key_file":
            return KeySigner(adc.path, self.ctx)  # a key signs here: no call
        return IamSigner(adc.target, adc.delegates, adc.caller, self.ctx, key=f"adc:{adc.path}")


def _metadata_signer(ctx: SourceContext) -> IamSigner:
    metadata = MetadataAccessToken(ctx)
    return IamSigner(None, [], metadata, ctx, key="metadata:default", find_target=metadata.email)


def build_signed_jwt_source(profile: str, config, ctx: SourceContext) -> SignedJwtSource:
    if isinstance(config, KeyFileSource):
        return SignedJwtSource(profile, KeySigner(config.key_file, ctx), ctx)
    if isinstance(config, MetadataSource):
        return SignedJwtSource(profile, _metadata_signer(ctx), ctx)
    if isinstance(config, ImpersonateSource):
        caller = AccessTokenSource.from_file(config.credentials_file, ctx)
        signer = IamSigner(config.target, list(config.delegates), caller, ctx,
                           key=f"impersonate:{config.target}:{caller.name}")
        return SignedJwtSource(profile, signer, ctx)
    assert isinstance(config, ADCSource)
    return SignedJwtSource(profile, None, ctx, adc=config)
