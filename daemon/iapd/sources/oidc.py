"""Any OpenID Connect issuer: Dex behind oauth2-proxy, Keycloak, Okta, flyteadmin's own
authorization server (itself behind IAP: `via`). Same cache, renewal, store, socket and client
as the Google profiles; only where the tokens come from differs.

Endpoints come from the issuer's discovery document (`/.well-known/openid-configuration`,
else RFC 8414's `/.well-known/oauth-authorization-server`), each overridable in the config.
Client authentication follows discovery and the RFCs: `client_secret_basic` for a confidential
client unless the issuer offers only `client_secret_post`; a public client sends its id and
relies on PKCE. Grants: authorization code + PKCE (the loopback login of iapd.login), the
device grant (RFC 8628) and client credentials. Refresh tokens may rotate: the new one is on
disk before the token it came with is served, and an issuer that refuses a (reused, revoked)
refresh token means login required — never a retry storm.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from iapctl.urls import secure_url
from iapd.config import OidcSource
from iapd.errors import ConfigProblem, LoginRequired, UpstreamError, UpstreamUnavailable, ViaLoginRequired
from iapd.google_http import Answer, fetch, json_object, revoke
from iapd.jwt import MalformedToken, unverified_claims
from iapd.logins import Login
from iapd.sources.base import IdToken, SourceContext

ProxyToken = Callable[[], Awaitable[str]]
MAX_DEVICE_INTERVAL = 60.0


def device_interval(value: Any) -> float:
    """The device grant's polling interval: RFC 8628's default of 5 s unless the issuer said a
    number, clamped to 1–60 s. An issuer's NaN, -1 or 0 must not become a poll loop, nor its
    1e9 a login that never completes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return 5.0
    return min(max(float(value), 1.0), MAX_DEVICE_INTERVAL)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), (parts.netloc or "").lower()


class OidcCredential:
    kind = "oidc"

    def __init__(self, profile: str, config: OidcSource, login: Login, ctx: SourceContext,
                 proxy_token: ProxyToken | None = None) -> None:
        self.profile = profile
        self.config = config
        # Profiles of one client at one issuer (and token endpoint) share one login.
        self.login = login
        self.ctx = ctx
        self.proxy_token = proxy_token
        self.key = login.key
        self._metadata: dict[str, Any] | None = None
        self._metadata_lock = asyncio.Lock()

    # -- what the cache and status ask -----------------------------------------------------------

    def identity(self) -> str | None:
        if self.config.grant == "client_credentials":
            return f"client {self.config.client_id}"
        return self.login.identity()

    def logged_in(self) -> bool:
        return self.config.grant == "client_credentials" or self.login.logged_in()

    # -- talking to the issuer -------------------------------------------------------------------

    async def _headers(self, url: str) -> dict[str, str]:
        """Every request to the issuer carries the `via` profile's token, if the issuer sits
        behind a proxy (flyteadmin's authorization server behind IAP) — to the issuer's own
        origin only: that token opens the proxy, and an endpoint a discovery document names on
        another host is not behind it."""
        if self.proxy_token is None or _origin(url) != _origin(self.config.issuer):
            return {}
        try:
            token = await self.proxy_token()
        except LoginRequired as exc:
            # The `via` profile's login, not ours: ours stays, and the message names the one to fix.
            via = self.config.via
            raise ViaLoginRequired(f"the profile {via} (`via` of {self.profile}) needs a login: {exc.message}",
                                   profile=exc.extra.get("profile") or via) from None
        return {"Proxy-Authorization": f"Bearer {token}"}

    async def _call(self, method: str, url: str, what: str, **kwargs: Any) -> Answer:
        headers = {**(await self._headers(url)), **kwargs.pop("headers", {})}
        return await fetch(self.ctx.session, method, url, what=what, headers=headers, **kwargs)

    async def metadata(self) -> dict[str, Any]:
        """The discovery document (once), with the config's overrides on top."""
        async with self._metadata_lock:
            if self._metadata is None:
                self._metadata = {**await self._discover(), **{
                    name: value for name in ("authorization_endpoint", "token_endpoint",
                                             "device_authorization_endpoint", "revocation_endpoint")
                    if (value := getattr(self.config, name)) is not None}}
            return self._metadata

    async def _discover(self) -> dict[str, Any]:
        issuer = self.config.issuer.rstrip("/")
        parts = urlsplit(issuer)
        candidates = [f"{issuer}/.well-known/openid-configuration",
                      # RFC 8414 §3: the well-known segment goes between the host and the path.
                      f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}"]
        last: Exception | None = None
        for url in candidates:
            try:
                document = json_object(await self._call("GET", url, f"reading {url}"), f"reading {url}")
            except UpstreamError as exc:
                if last is None or exc.http_status != 404:  # say the telling failure, not the fallback's 404
                    last = exc
                continue
            # RFC 8414 §3.3, OpenID Connect Discovery §4.3: the document's issuer must be the one
            # asked for — else it may be another issuer's (a mix-up), and its endpoints too.
            named = document.get("issuer")
            if not isinstance(named, str) or named.rstrip("/") != issuer:
                raise UpstreamError(f"{url} is the discovery document of issuer {str(named)[:100]!r}, not of {issuer}: "
                                    f"refusing it (check the issuer in profile {self.profile})")
            if not isinstance(document.get("token_endpoint"), str) and self.config.token_endpoint is None:
                raise ConfigProblem(f"{url} names no token_endpoint; set token_endpoint in profile {self.profile}")
            return document
        if self.config.token_endpoint is not None:
            return {}  # everything needed is in the config
        raise ConfigProblem(f"no discovery document for issuer {issuer} ({last}); set its endpoints in "
                            f"profile {self.profile}")

    async def _endpoint(self, name: str) -> str:
        url = (await self.metadata()).get(name)
        if not isinstance(url, str):
            raise ConfigProblem(f"issuer {self.config.issuer} has no {name}; set it in profile {self.profile}")
        if not secure_url(url):
            raise UpstreamError(f"the issuer's {name} {url[:100]} is not https (nor loopback): refusing to send "
                                "credentials there")
        return url

    async def _client_auth(self, data: dict[str, str]) -> dict[str, str]:
        """Add client authentication to a token-endpoint request; return the extra headers."""
        if self.config.client_secret is None:
            data["client_id"] = self.config.client_id  # public client: PKCE is its proof
            return {}
        methods = (await self.metadata()).get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        if "client_secret_basic" in methods or "client_secret_post" not in methods:
            import base64

            # RFC 6749 §2.3.1: both parts form-urlencoded before the Basic encoding.
            pair = f"{quote(self.config.client_id, safe='')}:{quote(self.config.client_secret, safe='')}"
            return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        data.update(client_id=self.config.client_id, client_secret=self.config.client_secret)
        return {}

    async def _token_request(self, data: dict[str, str], what: str, url: str | None = None,
                             proxy_headers: dict[str, str] | None = None) -> tuple[dict, Answer]:
        for name in ("audience", "resource"):
            if getattr(self.config, name):
                data[name] = getattr(self.config, name)
        url = url or await self._endpoint("token_endpoint")
        headers = {**(proxy_headers if proxy_headers is not None else await self._headers(url)),
                   **(await self._client_auth(data))}
        answer = await fetch(self.ctx.session, "POST", url, what=what, data=data, headers=headers)
        return json_object(answer, what), answer

    def _check_id_token(self, body: dict) -> dict[str, Any]:
        """The claims of the answer's ID token, if it has one, after the checks a courier can
        afford without verifying signatures (the app verifies them): it is this issuer's
        (`iss`) and for this client (`aud`) — the mix-up defence, before it is served or a login
        is stored on its word."""
        if "id_token" not in body:
            return {}
        try:
            claims = unverified_claims(body["id_token"] if isinstance(body["id_token"], str) else "")
        except MalformedToken:
            raise UpstreamError("the issuer returned a malformed ID token") from None
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if str(claims.get("iss", "")).rstrip("/") != self.config.issuer.rstrip("/"):
            raise UpstreamError(f"the ID token was issued by {str(claims.get('iss'))[:100]!r}, not by "
                                f"{self.config.issuer}: refusing it")
        if self.config.client_id not in audiences:
            raise UpstreamError(f"the ID token is for {str(aud)[:100]!r}, not for client {self.config.client_id}: "
                                "refusing it")
        return claims

    def _served(self, body: dict, answer: Answer) -> IdToken:
        """The token the profile serves, and how long it lives: a JWT by its own `exp` (and
        `expires_in` for an access token); an opaque access token by `expires_in` alone."""
        self._check_id_token(body)
        value = body.get(self.config.token)
        if not isinstance(value, str) or not value:
            raise UpstreamError(f"the issuer returned no {self.config.token} (scopes: {' '.join(self.config.scopes)})")
        expires_in = body.get("expires_in") if self.config.token == "access_token" else None
        try:
            unverified_claims(value)
        except MalformedToken:
            if not isinstance(expires_in, (int, float)) or expires_in <= 0:
                raise UpstreamError("the issuer returned an opaque access token without expires_in") from None
            return IdToken.opaque(value, self.ctx.clock, float(expires_in))
        return IdToken.received(value, self.ctx.clock, answer.server_date,
                                float(expires_in) if isinstance(expires_in, (int, float)) else None)

    # -- tokens ----------------------------------------------------------------------------------

    async def fetch(self, audience: str | None) -> IdToken:
        if self.config.grant == "client_credentials":
            body, answer = await self._token_request(
                {"grant_type": "client_credentials", "scope": " ".join(self.config.scopes)}, "client credentials")
            return self._served(body, answer)
        if not self.login.logged_in():
            raise LoginRequired(self.login.record().get("login_reason") or "not logged in")
        url = await self._endpoint("token_endpoint")
        # The `via` token before the login's lock: waiting on another login while holding ours
        # would hold up every profile of this one.
        proxy = await self._headers(url)
        answers: list[Answer] = []

        async def exchange(refresh_token: str) -> dict:
            body, answer = await self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token},
                                                     "refreshing the token", url, proxy)
            answers.append(answer)
            return body

        # Refused (revoked, expired, a rotated token reused) means login required; rotation is
        # stored by the login, compare-and-swap, before anything is served.
        body = await self.login.refresh(url, exchange, self._revoke)
        return self._served(body, answers[-1])

    # -- logging in (authorization code + PKCE, through iapd.login) ------------------------------

    async def prepare_login(self) -> None:
        if self.config.grant == "client_credentials":
            raise ConfigProblem(f"profile {self.profile} uses client credentials: there is nothing to log in to")
        await self.metadata()

    def redirect(self) -> tuple[int, str]:
        """(port, path) of the loopback redirect: the configured one, else an ephemeral port."""
        if self.config.redirect_uri is None:
            return 0, "/oauth2/callback"
        parts = urlsplit(self.config.redirect_uri)
        return parts.port or 0, parts.path or "/"

    def redirect_uri(self, port: int) -> str:
        """The redirect URI sent, character for character as configured when it names a port:
        exact-match providers (Okta, Auth0, Keycloak without wildcards) refuse `127.0.0.1` for
        a registered `localhost`. Without a port, the listener's (ephemeral) one goes in."""
        if self.config.redirect_uri is None:
            return f"http://127.0.0.1:{port}/oauth2/callback"
        parts = urlsplit(self.config.redirect_uri)
        if parts.port:
            return self.config.redirect_uri
        return urlunsplit((parts.scheme, f"{parts.hostname}:{port}", parts.path or "/", parts.query, ""))

    async def authorization_url(self, redirect_uri: str, state: str, challenge: str) -> str:
        params = {"client_id": self.config.client_id, "redirect_uri": redirect_uri, "response_type": "code",
                  "scope": " ".join(self.config.scopes), "state": state, "code_challenge": challenge,
                  "code_challenge_method": "S256"}
        if "offline_access" in self.config.scopes:
            params["prompt"] = "consent"  # OIDC Core §11: offline access is granted on consent
        return f"{await self._endpoint('authorization_endpoint')}?{urlencode(params)}"

    async def exchange_code(self, code: str, redirect_uri: str, verifier: str) -> str:
        body, _ = await self._token_request({"grant_type": "authorization_code", "code": code,
                                             "redirect_uri": redirect_uri, "code_verifier": verifier},
                                            "completing the login")
        return await self._save_login(body)

    async def _save_login(self, body: dict) -> str:
        if not body.get("refresh_token"):
            raise UpstreamError("the issuer returned no refresh token (is `offline_access` in scopes?)")
        claims = self._check_id_token(body)
        email = claims.get("email") or claims.get("preferred_username") or claims.get("sub")
        record = {"refresh_token": body["refresh_token"], "email": email, "client_id": self.config.client_id,
                  # Bound: this refresh token goes to these URLs and no others, whatever the
                  # config or the discovery document says later.
                  "token_endpoint": await self._endpoint("token_endpoint")}
        if isinstance((await self.metadata()).get("revocation_endpoint"), str):
            record["revocation_endpoint"] = await self._endpoint("revocation_endpoint")
        await self.login.save(record, self._revoke)
        return email or "(unknown account)"

    # -- the device grant (RFC 8628) -------------------------------------------------------------

    async def start_device(self) -> dict[str, Any]:
        data = {"scope": " ".join(self.config.scopes)}
        headers = await self._client_auth(data)
        url = await self._endpoint("device_authorization_endpoint")
        answer = await self._call("POST", url, "starting the device login", data=data, headers=headers)
        return json_object(answer, "starting the device login")

    async def poll_device(self, device: dict[str, Any], deadline: float, sleep=asyncio.sleep) -> str:
        """Poll until the person approved: `authorization_pending` waits the interval,
        `slow_down` adds 5 seconds to it, a transient failure (5xx, a timeout) backs off and
        keeps polling (RFC 8628 §3.5); anything else ends the login."""
        interval = device_interval(device.get("interval"))
        backoff = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await sleep(interval + backoff)
            if loop.time() > deadline:
                raise LoginRequired("the device code expired before it was approved")
            data = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": device["device_code"]}
            headers = await self._client_auth(data)
            try:
                answer = await self._call("POST", await self._endpoint("token_endpoint"), "completing the device login",
                                          data=data, headers=headers)
            except UpstreamUnavailable:
                backoff = min(max(backoff * 2, interval), MAX_DEVICE_INTERVAL)
                continue
            except UpstreamError as exc:
                if "authorization_pending" in exc.message:
                    backoff = 0.0
                    continue
                if "slow_down" in exc.message:
                    interval = min(interval + 5, MAX_DEVICE_INTERVAL)
                    continue
                raise
            return await self._save_login(json_object(answer, "completing the device login"))

    # -- logging out -----------------------------------------------------------------------------

    async def _revoke(self, token: str) -> str | None:
        """At the revocation endpoint of the login's own issuer (recorded at login), never one a
        later discovery document or config names."""
        try:
            # (Checked like every endpoint a discovery document names: https or loopback only.)
            url = self.login.revocation_endpoint() or await self._endpoint("revocation_endpoint")
            data = {"token": token, "token_type_hint": "refresh_token"}
            headers = {**(await self._headers(url)), **(await self._client_auth(data))}
        except (ConfigProblem, UpstreamError, UpstreamUnavailable, LoginRequired) as exc:
            return exc.message
        return await revoke(self.ctx.session, url, token, data=data, headers=headers)

    async def logout(self) -> dict[str, Any]:
        return await self.login.logout(self._revoke)
