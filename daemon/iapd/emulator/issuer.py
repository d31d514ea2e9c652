"""A generic OpenID Connect issuer — not Google-shaped — at `/oidc` on the emulator's first port.

What a Dex, Keycloak or Okta does and Google does not: discovery with
`token_endpoint_auth_methods_supported`; PKCE required for every authorization code; refresh-
token *rotation* with reuse detection (a refresh token used twice revokes its whole family, as
RFC 6819 §5.2.2.3 and OAuth 2.1 recommend); opaque access tokens (no JWT, only `expires_in`);
client credentials; the device-authorization grant (RFC 8628) with `authorization_pending` and
`slow_down`; revocation (RFC 7009); scopes, `offline_access` for refresh tokens, `audience`.

Clients (ids are the secrets' names): `kubeflow-cli` (public: PKCE alone), `ci-bot`
(confidential), and whatever a test registers through `/_emulator/oidc_client`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web

from iapd.emulator.keys import SigningKey

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
PREFIX = "/oidc"
PLAIN_OAUTH_PREFIX = "/oauth-only"


@dataclass
class Client:
    client_id: str
    secret: str | None  # None: a public client
    grants: set[str]


@dataclass
class Grant:
    client_id: str
    subject: str
    scope: list[str]
    family: str  # refresh tokens rotated from one login share a family (reuse kills it)


@dataclass
class Device:
    client_id: str
    scope: list[str]
    user_code: str
    expires: float
    interval: int
    approved: bool = False
    last_poll: float = 0.0


@dataclass
class IssuerState:
    user: str = "alice@example.com"
    token_lifetime: int = 3600
    auth_methods: list[str] = field(default_factory=lambda: ["client_secret_basic", "client_secret_post"])
    device_interval: int = 5  # seconds between device-grant polls (RFC 8628's default)
    slow_down_polls: int = 0  # answer this many device-grant polls with slow_down, however spaced
    device_polls: list[float] = field(default_factory=list)  # when each poll came (for tests)
    key: SigningKey = field(default_factory=lambda: SigningKey.generate("oidc"))
    clients: dict[str, Client] = field(default_factory=dict)
    codes: dict[str, tuple[Grant, str, str, float]] = field(default_factory=dict)  # code -> grant, redirect, challenge, exp
    refresh: dict[str, Grant] = field(default_factory=dict)
    used_refresh: dict[str, str] = field(default_factory=dict)  # rotated-away token -> family
    dead_families: set[str] = field(default_factory=set)
    access: dict[str, float] = field(default_factory=dict)  # opaque access token -> exp
    devices: dict[str, Device] = field(default_factory=dict)  # device_code -> Device

    @classmethod
    def demo(cls) -> "IssuerState":
        state = cls()
        state.clients["kubeflow-cli"] = Client("kubeflow-cli", None, {"authorization_code", "refresh_token", DEVICE_GRANT})
        state.clients["ci-bot"] = Client("ci-bot", "ci-bot-" + secrets.token_urlsafe(16), {"client_credentials"})
        return state


ISSUER_KEY = web.AppKey("oidc_issuer", IssuerState)


def _error(error: str, description: str, status: int = 400) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status,
                             headers={"Cache-Control": "no-store"})


def issuer_url(request: web.Request) -> str:
    """The issuer's own URL — as its clients reach it: behind a proxy (IAP in front of
    flyteadmin), the proxy's host, as the proxy says in X-Forwarded-Host (as Keycloak or Dex
    configured for a proxy would)."""
    host = request.headers.get("X-Forwarded-Host") or request.host
    scheme = request.headers.get("X-Forwarded-Proto") or request.scheme
    return f"{scheme}://{host}{PREFIX}"


async def discovery(request: web.Request) -> web.Response:
    state, base = request.app[ISSUER_KEY], issuer_url(request)
    return web.json_response({
        "issuer": base,
        "authorization_endpoint": f"{base}/auth",
        "token_endpoint": f"{base}/token",
        "device_authorization_endpoint": f"{base}/device/code",
        "revocation_endpoint": f"{base}/revoke",
        "jwks_uri": f"{base}/keys",
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials", DEVICE_GRANT],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": state.auth_methods,
        "scopes_supported": ["openid", "email", "profile", "offline_access", "groups"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "subject_types_supported": ["public"],
    })


async def authorization_server_metadata(request: web.Request) -> web.Response:
    """RFC 8414 metadata for a plain OAuth issuer, `/oauth-only`, that has no OpenID discovery
    document: `/.well-known/oauth-authorization-server/oauth-only` (the well-known segment goes
    between host and path). Its endpoints are the /oidc ones."""
    document = json.loads((await discovery(request)).text)
    base = issuer_url(request).removesuffix(PREFIX)
    return web.json_response({**document, "issuer": f"{base}{PLAIN_OAUTH_PREFIX}"})


async def jwks(request: web.Request) -> web.Response:
    return web.json_response({"keys": [request.app[ISSUER_KEY].key.jwk]})


async def authorize(request: web.Request) -> web.Response:
    """Auto-approves as the emulated user; PKCE (S256) is required, as OAuth 2.1 has it."""
    state, q = request.app[ISSUER_KEY], request.query
    client = state.clients.get(q.get("client_id", ""))
    redirect = q.get("redirect_uri", "")
    if client is None or "authorization_code" not in client.grants or not redirect.startswith("http://127.0.0.1:"):
        return web.Response(status=400, text="invalid client or redirect_uri")
    params = {"state": q.get("state", "")}
    if q.get("code_challenge_method") != "S256" or not q.get("code_challenge"):
        params.update(error="invalid_request", error_description="PKCE with S256 is required")
    else:
        code = secrets.token_urlsafe(24)
        grant = Grant(client.client_id, state.user, q.get("scope", "").split(), secrets.token_hex(8))
        state.codes[code] = (grant, redirect, q["code_challenge"], time.time() + 300)
        params["code"] = code
    raise web.HTTPFound(f"{redirect}{'&' if '?' in redirect else '?'}{urlencode(params)}")


def _unauthorized(description: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(text=json.dumps({"error": "invalid_client", "error_description": description}),
                                content_type="application/json", headers={"Cache-Control": "no-store"})


def _authenticate(state: IssuerState, request: web.Request, form) -> Client:
    """client_secret_basic (Authorization: Basic, urlencoded id:secret) or client_secret_post,
    as discovery allows; a public client sends only client_id. Raises 401 invalid_client."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Basic "):
        if "client_secret_basic" not in state.auth_methods:
            raise _unauthorized("client_secret_basic is not supported here")
        from urllib.parse import unquote_plus

        client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    elif form.get("client_secret"):
        if "client_secret_post" not in state.auth_methods:
            raise _unauthorized("client_secret_post is not supported here")
        client_id, secret = str(form.get("client_id", "")), str(form["client_secret"])
    else:
        client_id, secret = str(form.get("client_id", "")), None
    client = state.clients.get(client_id)
    if client is None or (client.secret is not None and not secrets.compare_digest(secret or "", client.secret)):
        raise _unauthorized("client authentication failed")
    if client.secret is None and secret is not None:
        raise _unauthorized("a public client has no secret")
    return client


def _tokens(state: IssuerState, request: web.Request, grant: Grant, audience: str | None,
            refresh: bool) -> dict:
    now = int(time.time())
    access = "opaque-" + secrets.token_urlsafe(24)
    state.access[access] = now + state.token_lifetime
    body = {"access_token": access, "token_type": "Bearer", "expires_in": state.token_lifetime,
            "scope": " ".join(grant.scope)}
    if "openid" in grant.scope:
        # OIDC Core §2: an ID token's `aud` is the client id, whatever `audience` was asked for
        # (Auth0 and Okta put that one in the *access* token, as here).
        claims = {"iss": issuer_url(request), "sub": grant.subject, "aud": grant.client_id,
                  "azp": grant.client_id, "iat": now, "exp": now + state.token_lifetime}
        if "email" in grant.scope:
            claims.update(email=grant.subject, email_verified=True)
        body["id_token"] = state.key.sign(claims)
    if refresh and "offline_access" in grant.scope:
        token = "rt-" + secrets.token_urlsafe(24)
        state.refresh[token] = grant
        body["refresh_token"] = token
    return body


async def token(request: web.Request) -> web.Response:
    state, form = request.app[ISSUER_KEY], await request.post()
    client = _authenticate(state, request, form)
    kind = str(form.get("grant_type", ""))
    if kind not in client.grants:
        return _error("unauthorized_client", f"{kind} is not allowed for this client")
    audience = form.get("audience")
    if kind == "authorization_code":
        entry = state.codes.pop(str(form.get("code", "")), None)
        if entry is None or entry[3] < time.time() or entry[0].client_id != client.client_id:
            return _error("invalid_grant", "unknown, used or expired code")
        grant, redirect, challenge, _ = entry
        verifier = str(form.get("code_verifier", ""))
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if form.get("redirect_uri") != redirect or not secrets.compare_digest(digest, challenge):
            return _error("invalid_grant", "redirect_uri or code_verifier does not match")
        return web.json_response(_tokens(state, request, grant, audience, refresh=True))
    if kind == "refresh_token":
        presented = str(form.get("refresh_token", ""))
        grant = state.refresh.pop(presented, None)
        if grant is None:
            family = state.used_refresh.get(presented)
            if family is not None:  # reuse of a rotated token: someone has a copy; kill the family
                _kill_family(state, family)
            return _error("invalid_grant", "refresh token is invalid, expired, revoked or already used")
        if grant.client_id != client.client_id or grant.family in state.dead_families:
            return _error("invalid_grant", "refresh token is invalid")
        state.used_refresh[presented] = grant.family  # rotation: the old one is spent
        return web.json_response(_tokens(state, request, grant, audience, refresh=True))
    if kind == "client_credentials":
        scope = str(form.get("scope", "")).split()
        grant = Grant(client.client_id, f"service-account-{client.client_id}", scope, "none")
        return web.json_response(_tokens(state, request, grant, audience, refresh=False))
    if kind == DEVICE_GRANT:
        device = state.devices.get(str(form.get("device_code", "")))
        if device is None or device.client_id != client.client_id:
            return _error("invalid_grant", "unknown device code")
        now = time.time()
        state.device_polls.append(now)
        if device.expires < now:
            return _error("expired_token", "the device code expired")
        too_soon = now - device.last_poll < device.interval - 0.05
        device.last_poll = now
        if too_soon or state.slow_down_polls > 0:
            state.slow_down_polls = max(state.slow_down_polls - 1, 0)
            device.interval += 5  # RFC 8628 §3.5: slow down by 5 seconds
            return _error("slow_down", "polling too fast")
        if not device.approved:
            return _error("authorization_pending", "the user has not approved yet")
        del state.devices[str(form["device_code"])]
        grant = Grant(client.client_id, state.user, device.scope, secrets.token_hex(8))
        return web.json_response(_tokens(state, request, grant, audience, refresh=True))
    return _error("unsupported_grant_type", kind)


async def device_code(request: web.Request) -> web.Response:
    state, form = request.app[ISSUER_KEY], await request.post()
    client = _authenticate(state, request, form)
    code, user_code = secrets.token_urlsafe(24), f"{secrets.randbelow(10**4):04d}-{secrets.randbelow(10**4):04d}"
    interval = state.device_interval
    state.devices[code] = Device(client.client_id, str(form.get("scope", "")).split(), user_code,
                                 time.time() + 600, interval)
    base = issuer_url(request)
    return web.json_response({"device_code": code, "user_code": user_code, "verification_uri": f"{base}/device",
                              "verification_uri_complete": f"{base}/device?user_code={user_code}",
                              "expires_in": 600, "interval": interval})


async def device_page(request: web.Request) -> web.Response:
    """Where the person types the user code; approves at once (the emulator's auto-approve)."""
    state, user_code = request.app[ISSUER_KEY], request.query.get("user_code", "")
    for device in state.devices.values():
        if device.user_code == user_code:
            device.approved = True
            return web.Response(text="Device approved. You can close this page.")
    return web.Response(status=400, text="unknown user code")


def _kill_family(state: IssuerState, family: str) -> None:
    """The whole grant a rotation family belongs to is revoked, every live token of it with it."""
    state.dead_families.add(family)
    for live, other in list(state.refresh.items()):
        if other.family == family:
            del state.refresh[live]


async def revoke(request: web.Request) -> web.Response:
    state, form = request.app[ISSUER_KEY], await request.post()
    _authenticate(state, request, form)  # 401 unless the client is who it says
    value = str(form.get("token", ""))
    grant = state.refresh.pop(value, None)
    if grant is not None:
        state.dead_families.add(grant.family)
    family = state.used_refresh.get(value)
    if family is not None:  # a spent token of a rotation family: revoking it revokes the grant
        _kill_family(state, family)
    state.access.pop(value, None)
    return web.Response(status=200)  # RFC 7009: 200 whether or not the token was known


def add_routes(app: web.Application, state: IssuerState) -> None:
    app[ISSUER_KEY] = state
    r = app.router
    r.add_get(f"{PREFIX}/.well-known/openid-configuration", discovery, name="oidc_discovery")
    r.add_get(f"{PREFIX}/keys", jwks, name="oidc_jwks")
    r.add_get(f"/.well-known/oauth-authorization-server{PLAIN_OAUTH_PREFIX}", authorization_server_metadata,
              name="oauth_metadata")
    r.add_get(f"{PREFIX}/auth", authorize, name="oidc_auth")
    r.add_post(f"{PREFIX}/token", token, name="oidc_token")
    r.add_post(f"{PREFIX}/device/code", device_code, name="oidc_device_code")
    r.add_get(f"{PREFIX}/device", device_page, name="oidc_device")
    r.add_post(f"{PREFIX}/revoke", revoke, name="oidc_revoke")
