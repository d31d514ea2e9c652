"""Service-account ID tokens for CI: a key file (JWT-bearer with `target_audience`) or the
metadata server (GCE, GKE, Cloud Run). Same cache, same socket, same client as user tokens.

Service accounts need an audience: Google mints their ID tokens only for a named one.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from google.auth import crypt
from google.auth import jwt as google_jwt

from iapd.config import KeyFileSource, MetadataSource
from iapd.errors import LoginRequired, UpstreamError, UpstreamUnavailable
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

    def __init__(self, profile: str, config: KeyFileSource, agent: "Agent") -> None:
        self.profile = profile
        self.path = config.key_file
        self.agent = agent
        self.key = f"key_file:{self.path}"
        self._info: dict[str, Any] | None = None

    def identity(self) -> str | None:
        return self._info.get("client_email") if self._info else None

    def _load(self) -> dict[str, Any]:
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

    def __init__(self, profile: str, config: MetadataSource, agent: "Agent") -> None:
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


def build_service_account_source(profile: str, config: KeyFileSource | MetadataSource, agent: "Agent"):
    if isinstance(config, KeyFileSource):
        return KeyFileCredential(profile, config, agent)
    return MetadataCredential(profile, config, agent)
