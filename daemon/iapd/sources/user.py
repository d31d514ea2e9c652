"""A person's credential: a desktop OAuth client and the refresh token from their login.

ID token for an audience = `grant_type=refresh_token` with `audience=<IAP client id>` (or no
audience in allowlist mode, where `aud` is the desktop client id itself).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlencode

from iapd.config import UserSource as UserConfig
from iapd.errors import BadRequest, LoginRequired, UpstreamError
from iapd.google_http import Answer, fetch, json_object, request_json, revoke
from iapd.jwt import MalformedToken, unverified_claims
from iapd.logins import Login
from iapd.secret_manager import read_secret
from iapd.sources.base import IdToken, SourceContext

log = logging.getLogger("iapd.user")


class UserCredential:
    kind = "user"

    def __init__(self, config: UserConfig, login: Login, ctx: SourceContext) -> None:
        self.config = config
        self.login = login  # the refresh token, its lock and its record: shared, never copied here
        self.store = login.store
        self.ctx = ctx
        self.key = login.key
        self._secret_lock = asyncio.Lock()
        self._secret: str | None = None  # read from Secret Manager, before the store has a record

    def identity(self) -> str | None:
        return self.login.identity()

    def logged_in(self) -> bool:
        return self.login.logged_in()

    async def client_secret(self, fresh: bool = False) -> str:
        """From the config, else from the store, else read once from Secret Manager (one read at
        a time, whoever asks) and kept in the store beside the refresh token. `fresh` (a new
        login) reads it again when it names `versions/latest`: the secret may have been rotated."""
        if self.config.client_secret is not None:
            return self.config.client_secret
        name = self.config.client_secret_name
        assert name is not None
        async with self._secret_lock:
            record = self.store.get(self.key) or {}
            reread = fresh and name.endswith("/versions/latest")
            if not reread and record.get("client_secret") and record.get("client_secret_name") == name:
                return record["client_secret"]
            if not reread and self._secret is not None:
                return self._secret
            secret = self._secret = await read_secret(name, self.config.secret_manager_credentials,
                                                      self.ctx.endpoints, self.ctx.http_timeout)
            if record:  # keep it with the refresh token; before a login, the login saves it
                try:
                    await self.store.update(self.key, client_secret=secret, client_secret_name=name)
                except OSError as exc:  # a full disk, a locked keyring: kept in memory, read again later
                    log.warning("%s: could not keep the client secret in the store (%s)", self.key, str(exc)[:200])
            return secret

    # -- logging in (through iapd.login) ---------------------------------------------------------

    async def prepare_login(self) -> None:
        await self.client_secret(fresh=True)

    def redirect(self) -> tuple[int, str]:
        return 0, "/oauth2/callback"  # an ephemeral port: never a fixed one (flyte-iap's 4444)

    def redirect_uri(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/oauth2/callback"  # Google's desktop clients take any loopback port

    async def authorization_url(self, redirect_uri: str, state: str, challenge: str) -> str:
        params = {
            "client_id": self.config.client_id, "redirect_uri": redirect_uri, "response_type": "code",
            "scope": "openid email", "state": state, "code_challenge": challenge, "code_challenge_method": "S256",
            # offline + consent: Google returns a refresh token only then.
            "access_type": "offline", "prompt": "consent",
        }
        if self.config.account:
            params["login_hint"] = self.config.account
        if self.config.hosted_domain:
            params["hd"] = self.config.hosted_domain
        return f"{self.ctx.endpoints.auth_url}?{urlencode(params)}"

    async def start_device(self) -> dict[str, Any]:
        raise BadRequest("Google's desktop clients have no device grant here: use `iapctl login PROFILE --no-browser`")

    async def fetch(self, audience: str | None) -> IdToken:
        if not self.login.logged_in():
            raise LoginRequired(self.login.record().get("login_reason") or "not logged in")
        secret = await self.client_secret()
        what = "refreshing the ID token"
        answers: list[Answer] = []

        async def exchange(refresh_token: str) -> dict:
            data = {"grant_type": "refresh_token", "client_id": self.config.client_id, "client_secret": secret,
                    "refresh_token": refresh_token}
            if audience:
                data["audience"] = audience
            answers.append(await fetch(self.ctx.session, "POST", self.ctx.endpoints.token_url, data=data, what=what))
            return json_object(answers[-1], what)

        # Rotation (not Google's habit, but OAuth allows it) is the login's to store, once.
        body = await self.login.refresh(self.ctx.endpoints.token_url, exchange, self._revoke)
        if not isinstance(body.get("id_token"), str):
            raise UpstreamError("the token endpoint returned no id_token (is `openid` in the login's scope?)")
        return IdToken.received(body["id_token"], self.ctx.clock, answers[-1].server_date)

    async def exchange_code(self, code: str, redirect_uri: str, verifier: str) -> str:
        """Finish a login: code → refresh token, saved. Returns the email that logged in."""
        secret = await self.client_secret()
        body = await request_json(self.ctx.session, "POST", self.ctx.endpoints.token_url, what="completing the login", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "client_id": self.config.client_id, "client_secret": secret, "code_verifier": verifier})
        if not body.get("refresh_token"):
            raise UpstreamError("Google returned no refresh token (the login must ask for offline access)")
        try:
            claims = unverified_claims(body.get("id_token", ""))
        except MalformedToken:
            claims = {}
        email = claims.get("email")
        mismatch = self._wrong_account(claims)
        if mismatch is not None:
            await self._revoke(body["refresh_token"])  # a grant we will not keep must not live on
            raise LoginRequired(mismatch)
        record: dict[str, Any] = {"refresh_token": body["refresh_token"], "email": email,
                                  "client_id": self.config.client_id,
                                  # Bound: this refresh token goes to these two URLs and no others.
                                  "token_endpoint": self.ctx.endpoints.token_url,
                                  "revocation_endpoint": self.ctx.endpoints.revoke_url}
        if self.config.client_secret_name:
            record.update(client_secret=secret, client_secret_name=self.config.client_secret_name)
        # prompt=consent mints a new refresh token each login; the login revokes the one it replaces.
        await self.login.save(record, self._revoke)
        return email or "(unknown account)"

    def _wrong_account(self, claims: dict[str, Any]) -> str | None:
        """Why a login's account is not the one this profile is pinned to, or None."""
        want, domain = self.config.account, self.config.hosted_domain
        got = claims.get("email") or "an account with no email"
        if want and str(claims.get("email", "")).lower() != want.lower():
            return f"signed in as {got}, but this profile is for {want}: log in again with that account"
        if domain and claims.get("hd") != domain:
            return f"signed in as {got}, which is not in {domain}: log in again with an account of {domain}"
        return None

    async def _revoke(self, token: str) -> str | None:
        # At the login's own revocation endpoint; a grant not stored yet, at the configured one.
        url = self.login.revocation_endpoint() or self.ctx.endpoints.revoke_url
        return await revoke(self.ctx.session, url, token)

    async def logout(self) -> dict[str, Any]:
        """Revoke at the issuer (best effort, reported), then wipe the store entry. RFC 7009:
        success is the status code; the body is to be ignored (it may be empty)."""
        return await self.login.logout(self._revoke)
