"""Service-account ID tokens for CI. Same cache, same socket, same client as user tokens.

  key_file     a service-account key: JWT-bearer grant with `target_audience`
  metadata     the metadata server of GCE, GKE, Cloud Run (`identity?format=full`)
  impersonate  IAM Credentials generateIdToken for a target, as whoever the caller credentials are
  adc          application-default credentials, resolved to one of the above: a key file, the
               metadata server, or (external_account, impersonated_service_account) generateIdToken
               for the service account the file names — workload identity federation in CI.

Service accounts need an audience: Google mints their ID tokens only for a named one, and the
tokens must carry `email` (IAP requires it for service accounts), which each path asks for.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Any

from iapd.config import ADCSource, ImpersonateSource, KeyFileSource, MetadataSource
from iapd.errors import LoginRequired, UpstreamError, UpstreamUnavailable
from iapd.google_creds import CLOUD_PLATFORM, adc_file, fresh_access_token, load_google_credentials
from iapd.google_http import request_json, request_text
from iapd.sources.base import IdToken

if TYPE_CHECKING:
    from iapd.agent import Agent

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def _need_audience(audience: str | None, profile: str) -> str:
    if not audience:
        raise UpstreamError(f"profile {profile!r}: a service account needs an `audience` (the IAP client id)")
    return audience


class KeyFileCredential:
    kind = "service_account:key_file"

    def __init__(self, profile: str, path: str, agent: "Agent") -> None:
        self.profile = profile
        self.path = path
        self.agent = agent
        self.key = f"key_file:{self.path}"
        self._info: dict[str, Any] | None = None

    def identity(self) -> str | None:
        return self._info.get("client_email") if self._info else None

    def _load(self) -> dict[str, Any]:
        # google.auth.crypt pulls in cryptography (~50 ms, several MiB): only for key-file users.
        from google.auth import crypt

        try:
            with open(self.path, encoding="utf-8") as fh:
                info = json.load(fh)
            if info.get("type") != "service_account":
                raise ValueError(f"type is {info.get('type')!r}, expected 'service_account'")
            signer = crypt.RSASigner.from_service_account_info(info)
        except FileNotFoundError:
            raise UpstreamError(f"service account key file {self.path} does not exist") from None
        except PermissionError:
            raise UpstreamError(f"service account key file {self.path} is not readable") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamError(f"service account key file {self.path} is not a valid key: {str(exc)[:120]}") from None
        return {**info, "_signer": signer}

    async def fetch(self, audience: str | None) -> IdToken:
        audience = _need_audience(audience, self.profile)
        if self._info is None:
            self._info = await asyncio.to_thread(self._load)
        endpoints = self.agent.config.endpoints
        # The configured token endpoint wins when set; otherwise the key file's own.
        token_url = endpoints.token_url if "token_url" in endpoints.model_fields_set else \
            self._info.get("token_uri", endpoints.token_url)
        now = int(time.time())
        claims = {"iss": self._info["client_email"], "aud": token_url, "iat": now, "exp": now + 3600,
                  "target_audience": audience}
        from google.auth import jwt as google_jwt

        assertion = google_jwt.encode(self._info["_signer"], claims).decode()
        try:
            body = await request_json(self.agent.session, "POST", token_url, what="getting a service-account ID token",
                                      data={"grant_type": JWT_BEARER, "assertion": assertion})
        except LoginRequired as exc:
            raise UpstreamError(f"the service account key in {self.path} was refused: {exc.message}") from None
        if not isinstance(body.get("id_token"), str):
            raise UpstreamError("the token endpoint returned no id_token for the service account")
        return IdToken.received(body["id_token"], self.agent.clock)


class MetadataCredential:
    kind = "service_account:metadata"

    def __init__(self, profile: str, agent: "Agent") -> None:
        self.profile = profile
        self.agent = agent
        self.key = "metadata:default"
        self._email: str | None = None

    def identity(self) -> str | None:
        return self._email

    async def fetch(self, audience: str | None) -> IdToken:
        audience = _need_audience(audience, self.profile)
        base = self.agent.config.endpoints.metadata_url.rstrip("/")
        url = f"{base}/computeMetadata/v1/instance/service-accounts/default/identity"
        try:
            # format=full: the token carries `email`, which IAP requires for service accounts.
            token = await request_text(self.agent.session, "GET", url, what="asking the metadata server",
                                       params={"audience": audience, "format": "full"},
                                       headers={"Metadata-Flavor": "Google"})
        except UpstreamUnavailable as exc:
            raise UpstreamUnavailable(f"{exc.message} (is this a GCE/GKE/Cloud Run machine? metadata server: {base})") from None
        id_token = IdToken.received(token.strip(), self.agent.clock)
        self._email = id_token.email
        return id_token


class IamIdTokenCredential:
    """generateIdToken for `target`, authorised by an access token of the caller's credentials."""

    kind = "service_account:impersonate"

    def __init__(self, profile: str, target: str, delegates: list[str], caller: "AccessTokenSource",
                 agent: "Agent") -> None:
        self.profile = profile
        self.target = target
        self.delegates = delegates
        self.caller = caller
        self.agent = agent
        self.key = f"impersonate:{target}:{caller.name}"

    def identity(self) -> str | None:
        return self.target

    async def fetch(self, audience: str | None) -> IdToken:
        audience = _need_audience(audience, self.profile)
        base = self.agent.config.endpoints.iam_credentials_url.rstrip("/")
        url = f"{base}/v1/projects/-/serviceAccounts/{self.target}:generateIdToken"
        body = {"audience": audience, "includeEmail": True,
                "delegates": [f"projects/-/serviceAccounts/{d}" for d in self.delegates]}
        headers = {"Authorization": f"Bearer {await self.caller.token()}"}
        try:
            answer = await request_json(self.agent.session, "POST", url, json=body, headers=headers,
                                        what=f"impersonating {self.target}")
        except UpstreamError as exc:
            if exc.http_status in (401, 403):
                raise UpstreamError(
                    f"permission denied on impersonation: {self.caller.name} may not mint ID tokens for {self.target} "
                    "(it needs roles/iam.serviceAccountOpenIdTokenCreator on it, and on each delegate)") from None
            raise
        if not isinstance(answer.get("token"), str):
            raise UpstreamError("IAM Credentials returned no token")
        return IdToken.received(answer["token"], self.agent.clock)


class AccessTokenSource:
    """An OAuth access token from google-auth credentials (a file, or application-default).

    google-auth is synchronous: loading and refreshing run in a worker thread, one at a time."""

    def __init__(self, credentials_file: str | None, agent: "Agent") -> None:
        self.path = credentials_file
        self.agent = agent
        self.name = credentials_file or "application-default credentials"
        self._creds = None
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        async with self._lock:
            if self._creds is None:
                self._creds = await asyncio.to_thread(load_google_credentials, self.path, self.agent.config.endpoints,
                                                      [CLOUD_PLATFORM])
            return await asyncio.to_thread(fresh_access_token, self._creds)


class ADCCredential:
    """Application-default credentials (or a named credentials file), resolved on first use."""

    kind = "service_account:adc"

    def __init__(self, profile: str, config: ADCSource, agent: "Agent") -> None:
        self.profile = profile
        self.config = config
        self.agent = agent
        self.key = f"adc:{config.credentials_file or 'default'}"
        self._inner = None

    def identity(self) -> str | None:
        return self._inner.identity() if self._inner is not None else None

    async def fetch(self, audience: str | None) -> IdToken:
        if self._inner is None:
            self._inner = await self._resolve()
        return await self._inner.fetch(audience)

    async def _resolve(self):
        path = self.config.credentials_file or adc_file()
        if path is None:
            return MetadataCredential(self.profile, self.agent)  # on GCP, ADC is the metadata server
        try:
            info = await asyncio.to_thread(_read_json, path)
        except (OSError, ValueError) as exc:
            raise UpstreamError(f"cannot read credentials file {path}: {exc}") from None
        kind = info.get("type")
        if kind == "service_account":
            return KeyFileCredential(self.profile, path, self.agent)
        if kind in ("external_account", "impersonated_service_account"):
            target = _target_of(info.get("service_account_impersonation_url", ""))
            if target is None:
                raise UpstreamError(f"{path}: an {kind} file must name a service account to impersonate "
                                    "(service_account_impersonation_url) for ID tokens")
            return IamIdTokenCredential(self.profile, target, [], AccessTokenSource(path, self.agent), self.agent)
        if kind == "authorized_user":
            raise UpstreamError(f"{path} holds a user's gcloud login, which cannot mint ID tokens for IAP: use a "
                                "[user] profile, or kind = \"impersonate\" with a target service account")
        raise UpstreamError(f"{path}: unsupported credentials type {kind!r}")


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _target_of(url: str) -> str | None:
    """The email in `…/serviceAccounts/EMAIL:generateAccessToken`."""
    match = re.search(r"/serviceAccounts/([^/:]+):generateAccessToken$", url)
    return match.group(1) if match else None


def build_service_account_source(profile: str, config, agent: "Agent"):
    if isinstance(config, KeyFileSource):
        return KeyFileCredential(profile, config.key_file, agent)
    if isinstance(config, MetadataSource):
        return MetadataCredential(profile, agent)
    if isinstance(config, ImpersonateSource):
        return IamIdTokenCredential(profile, config.target, list(config.delegates),
                                    AccessTokenSource(config.credentials_file, agent), agent)
    assert isinstance(config, ADCSource)
    return ADCCredential(profile, config, agent)
