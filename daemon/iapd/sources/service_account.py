"""Service-account ID tokens for CI. Same cache, same socket, same client as user tokens.

  key_file     a service-account key: JWT-bearer grant with `target_audience`
  metadata     the metadata server of GCE, GKE, Cloud Run (`identity?format=full`)
  impersonate  IAM Credentials generateIdToken for a target, as whoever the caller credentials are
  adc          application-default credentials, resolved to one of the above: a key file, the
               metadata server, or (external_account, impersonated_service_account) generateIdToken
               for the service account the file names — workload identity federation in CI.

Service accounts need an audience: Google mints their ID tokens only for a named one, and the
tokens must carry `email` (IAP requires it for service accounts), which each path asks for.

generateIdToken needs `iam.serviceAccounts.getOpenIdToken` on the target, which a service
account does not hold on itself. So it is always called with the *source* credentials of an
impersonation (gcloud's user login, the federated token of workload identity) and the
delegates, never as the target itself — as google-auth's `impersonated_credentials` does.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from iapd.config import ADCSource, ImpersonateSource, KeyFileSource, MetadataSource
from iapd.errors import ConfigProblem, LoginRequired, UpstreamError, UpstreamUnavailable
from iapd.google_creds import CLOUD_PLATFORM, adc_file, credentials_from_info, file_stamp, read_credentials_file
from iapd.google_http import fetch, json_object
from iapd.key_file import ServiceAccountKey
from iapd.sources.base import IdToken, SourceContext

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def _need_audience(audience: str | None, profile: str) -> str:
    if not audience:
        raise ConfigProblem(f"profile {profile!r}: a service account needs an `audience` (the IAP client id)")
    return audience


class KeyFileCredential:
    kind = "service_account:key_file"

    def __init__(self, profile: str, path: str, ctx: SourceContext) -> None:
        self.profile = profile
        self.path = path
        self.ctx = ctx
        self.key = f"key_file:{self.path}"
        self._key: ServiceAccountKey | None = None

    def identity(self) -> str | None:
        return self._key.email if self._key else None

    async def fetch(self, audience: str | None) -> IdToken:
        audience = _need_audience(audience, self.profile)
        if self._key is None:
            self._key = await self.ctx.google_auth.run(ServiceAccountKey.load, self.path)
        key = self._key
        endpoints = self.ctx.endpoints
        # The configured token endpoint wins when set; otherwise the key file's own.
        token_url = endpoints.token_url if "token_url" in endpoints.model_fields_set else \
            (key.token_uri or endpoints.token_url)
        # Google reads these against its own clock: the system's, not the one renewals are
        # scheduled on (which tests shift to play a suspend).
        now = int(time.time())
        claims = {"iss": key.email, "aud": token_url, "iat": now, "exp": now + 3600,
                  "target_audience": audience}
        # An RSA signature is ~1 ms of CPU: off the loop, since after a suspend many are due at once.
        assertion = await self.ctx.google_auth.run(key.sign_jwt, claims)
        try:
            answer = await fetch(self.ctx.session, "POST", token_url, what="getting a service-account ID token",
                                 data={"grant_type": JWT_BEARER, "assertion": assertion})
        except LoginRequired as exc:
            raise UpstreamError(f"the service account key in {self.path} was refused: {exc.message}") from None
        body = json_object(answer, "getting a service-account ID token")
        if not isinstance(body.get("id_token"), str):
            raise UpstreamError("the token endpoint returned no id_token for the service account")
        return IdToken.received(body["id_token"], self.ctx.clock, answer.server_date)


class MetadataCredential:
    kind = "service_account:metadata"

    def __init__(self, profile: str, ctx: SourceContext) -> None:
        self.profile = profile
        self.ctx = ctx
        self.key = "metadata:default"
        self._email: str | None = None

    def identity(self) -> str | None:
        return self._email

    async def fetch(self, audience: str | None) -> IdToken:
        audience = _need_audience(audience, self.profile)
        base = self.ctx.endpoints.metadata_url.rstrip("/")
        url = f"{base}/computeMetadata/v1/instance/service-accounts/default/identity"
        try:
            # format=full: the token carries `email`, which IAP requires for service accounts.
            answer = await fetch(self.ctx.session, "GET", url, what="asking the metadata server",
                                 params={"audience": audience, "format": "full"}, headers={"Metadata-Flavor": "Google"})
        except UpstreamUnavailable as exc:
            raise UpstreamUnavailable(f"{exc.message} (is this a GCE/GKE/Cloud Run machine? metadata server: {base})") from None
        # Trap: the metadata server caches ID tokens and hands back the same one until shortly
        # before it expires: its `exp`, not our receipt, says how long it lives (IdToken).
        id_token = IdToken.received(answer.text.strip(), self.ctx.clock, answer.server_date)
        self._email = id_token.email
        return id_token


class AccessTokenSource:
    """An OAuth access token from google-auth credentials, loaded once (by `load`, in a thread)
    and refreshed when needed, one refresh at a time."""

    def __init__(self, name: str, load: Callable[[], Any], ctx: SourceContext) -> None:
        self.name = name
        self.load = load
        self.ctx = ctx
        self._creds = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_file(cls, path: str | None, ctx: SourceContext) -> "AccessTokenSource":
        from iapd.google_creds import load_google_credentials

        return cls(path or "application-default credentials",
                   lambda: load_google_credentials(path, ctx.endpoints, [CLOUD_PLATFORM]), ctx)

    async def token(self) -> str:
        async with self._lock:
            if self._creds is None:
                self._creds = await self.ctx.google_auth.run(self.load)
            return await self.ctx.google_auth.run(self.ctx.google_auth.fresh_access_token, self._creds)


class IamIdTokenCredential:
    """generateIdToken for `target` through `delegates`, authorised by the caller's access token."""

    kind = "service_account:impersonate"

    def __init__(self, profile: str, target: str, delegates: list[str], caller: AccessTokenSource,
                 ctx: SourceContext) -> None:
        self.profile = profile
        self.target = target
        self.delegates = delegates
        self.caller = caller
        self.ctx = ctx
        self.key = f"impersonate:{target}:{caller.name}"

    def identity(self) -> str | None:
        return self.target

    async def fetch(self, audience: str | None) -> IdToken:
        audience = _need_audience(audience, self.profile)
        token, server_date = await iam_credentials(
            self.ctx, self.caller, self.target, "generateIdToken", {"audience": audience, "includeEmail": True},
            self.delegates, "token", f"impersonating {self.target}",
            f"permission denied on impersonation: {self.caller.name} may not mint ID tokens for {self.target} "
            "(it needs roles/iam.serviceAccountOpenIdTokenCreator on it, and on each delegate)")
        return IdToken.received(token, self.ctx.clock, server_date)


class ADCCredential:
    """Application-default credentials (or a named credentials file), resolved on first use."""

    kind = "service_account:adc"

    def __init__(self, profile: str, config: ADCSource, ctx: SourceContext) -> None:
        self.profile = profile
        self.config = config
        self.ctx = ctx
        self.key = f"adc:{config.credentials_file or 'default'}"
        self._inner = None
        self._stamp: tuple | None = None  # of the file `_inner` was made from

    def identity(self) -> str | None:
        return self._inner.identity() if self._inner is not None else None

    async def changed(self) -> bool:
        """Whether the credentials file is another one now (`gcloud auth application-default
        login` again, a swapped file, one created or removed): then it is read again."""
        stamp = await adc_stamp(self.config)
        if stamp == self._stamp:
            return False
        self._inner, self._stamp = None, stamp
        return True

    async def fetch(self, audience: str | None) -> IdToken:
        if self._inner is None:
            self._stamp = await adc_stamp(self.config)
            self._inner = await self._resolve()
        return await self._inner.fetch(audience)

    async def _resolve(self):
        adc = await resolve_adc(self.config, self.ctx, "for ID tokens", "cannot mint ID tokens for IAP")
        if adc.kind == "metadata":
            return MetadataCredential(self.profile, self.ctx)  # on GCP, ADC is the metadata server
        if adc.kind == "key_file":
            return KeyFileCredential(self.profile, adc.path, self.ctx)
        return IamIdTokenCredential(self.profile, adc.target, adc.delegates, adc.caller, self.ctx)


@dataclass(frozen=True)
class ResolvedADC:
    """What application-default credentials turned out to be: the metadata server, a key file,
    or an impersonation of `target` by `caller` (external_account, impersonated_service_account)."""

    kind: str  # metadata | key_file | impersonate
    path: str | None = None
    target: str | None = None
    delegates: list[str] = field(default_factory=list)
    caller: AccessTokenSource | None = None


async def adc_stamp(config: ADCSource) -> tuple | None:
    """What changes when the file application-default credentials come from does (read in a
    thread): a source made from it is made again when this differs."""
    return await asyncio.to_thread(lambda: file_stamp(config.credentials_file or adc_file()))


async def resolve_adc(config: ADCSource, ctx: SourceContext, purpose: str, user_login: str) -> ResolvedADC:
    """The one reading of an ADC file, for ID tokens and signed JWTs alike (`purpose` and
    `user_login`, what a user's gcloud login cannot do, say which in errors)."""
    path = config.credentials_file or adc_file()
    if path is None:
        return ResolvedADC("metadata")
    info = await ctx.google_auth.run(read_credentials_file, path)
    kind = info.get("type")
    if kind == "service_account":
        return ResolvedADC("key_file", path)
    if kind in ("external_account", "impersonated_service_account"):
        target = _target_of(info.get("service_account_impersonation_url", ""))
        if target is None:
            raise ConfigProblem(f"{path}: an {kind} file must name a service account to impersonate "
                                f"(service_account_impersonation_url) {purpose}")
        source_info, delegates = _impersonation_source(info)
        endpoints, where = ctx.endpoints, f"in {path}"
        caller = AccessTokenSource(f"the source credentials of {path}",
                                   lambda: credentials_from_info(source_info, endpoints, [CLOUD_PLATFORM], where), ctx)
        return ResolvedADC("impersonate", path, target, delegates, caller)
    if kind == "authorized_user":
        raise ConfigProblem(f"{path} holds a user's gcloud login, which {user_login}: use a "
                            "[user] profile, or kind = \"impersonate\" with a target service account")
    raise ConfigProblem(f"{path}: unsupported credentials type {kind!r}")


async def iam_credentials(ctx: SourceContext, caller: AccessTokenSource, target: str, method: str, body: dict,
                          delegates: list[str], field: str, what: str, denied: str) -> tuple[str, float | None]:
    """One IAM Credentials call (`generateIdToken`, `signJwt`) for `target` through `delegates`,
    authorised by the caller's access token: the answer's `field` and its `Date`. A 401/403 is
    the one line `denied`."""
    base = ctx.endpoints.iam_credentials_url.rstrip("/")
    url = f"{base}/v1/projects/-/serviceAccounts/{target}:{method}"
    headers = {"Authorization": f"Bearer {await caller.token()}"}
    body = {**body, "delegates": [f"projects/-/serviceAccounts/{d}" for d in delegates]}
    try:
        answer = await fetch(ctx.session, "POST", url, json=body, headers=headers, what=what)
    except UpstreamError as exc:
        if exc.http_status in (401, 403):
            raise UpstreamError(denied) from None
        raise
    value = json_object(answer, what).get(field)
    if not isinstance(value, str):
        raise UpstreamError(f"IAM Credentials returned no {field}")
    return value, answer.server_date


def _impersonation_source(info: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The credentials an impersonation file acts *as*, and its delegates (emails).

    impersonated_service_account (gcloud --impersonate-service-account): `source_credentials`.
    external_account (workload identity federation): the same file without the impersonation
    URL, whose access token is the federated token of the external identity itself."""
    if info.get("type") == "impersonated_service_account":
        source = info.get("source_credentials")
        if not isinstance(source, dict):
            raise ConfigProblem("an impersonated_service_account file must have source_credentials")
        delegates = [str(d).rsplit("/", 1)[-1] for d in info.get("delegates") or []]
        return source, delegates
    return {k: v for k, v in info.items() if k != "service_account_impersonation_url"}, []


def _target_of(url: str) -> str | None:
    """The email in `…/serviceAccounts/EMAIL:generateAccessToken`."""
    match = re.search(r"/serviceAccounts/([^/:]+):generateAccessToken$", url)
    return match.group(1) if match else None


def build_service_account_source(profile: str, config, ctx: SourceContext):
    if isinstance(config, KeyFileSource):
        return KeyFileCredential(profile, config.key_file, ctx)
    if isinstance(config, MetadataSource):
        return MetadataCredential(profile, ctx)
    if isinstance(config, ImpersonateSource):
        return IamIdTokenCredential(profile, config.target, list(config.delegates),
                                    AccessTokenSource.from_file(config.credentials_file, ctx), ctx)
    assert isinstance(config, ADCSource)
    return ADCCredential(profile, config, ctx)
