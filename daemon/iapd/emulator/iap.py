"""Identity-Aware Proxy in front of a backend, and a small echo backend to stand behind it.

Programs: IAP takes the token from `Proxy-Authorization: Bearer` (so the app keeps
`Authorization`), else from `Authorization: Bearer` — a Google-issued ID token (signature, issuer,
audience, expiry: google-auth's own `verify_token` against our certs URL) or a JWT a service
account signed itself (its public keys from where Google publishes them; `aud` the URL asked for,
exactly or as `…/*`; at most an hour long). It strips `Proxy-Authorization`, adds the identity
headers, forwards. A bad token: 401 with HTML.

People: a request with no credentials is sent to Google's sign-in for IAP's own OAuth client
(302), which comes back through IAP's redirect URI to the app's `/_gcp_gatekeeper/authenticate`,
which sets IAP's session cookie and returns to the page. An AJAX request (`X-Requested-With:
XMLHttpRequest`) gets a 401 instead. `?gcp-iap-mode=IDENTITY` answers who is signed in;
`?gcp-iap-mode=CLEAR_LOGIN_COOKIE` drops the session. IAP's own answers carry
`X-Goog-IAP-Generated-Response: true`.
"""

from __future__ import annotations

import asyncio
import html
import secrets
from urllib.parse import urlencode

import aiohttp
import google.auth.transport.requests
from aiohttp import web
from google.auth import exceptions as google_exceptions
from google.auth import jwt as google_jwt
from google.oauth2 import id_token as google_id_token

from iapd.emulator.oauth import STATE_KEY, html_error
from iapd.emulator.state import IAP_CLIENT_ID, ISSUER, EmulatorState, subject_of

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
# The session cookie. Google's is `__Host-GCP_IAP_AUTH_TOKEN_<id>`; a browser keeps a `__Host-`
# cookie only from https, and the emulator speaks http, so the prefix is dropped here.
COOKIE_PREFIX = "GCP_IAP_AUTH_TOKEN_"
GATEKEEPER_PATH = "/_gcp_gatekeeper/authenticate"
SA_EMAIL_SUFFIXES = (".iam.gserviceaccount.com", "@developer.gserviceaccount.com", "@appspot.gserviceaccount.com")
MAX_JWT_LIFETIME = 3600  # IAP refuses a signed JWT whose exp is more than an hour after its iat


def _generated(response: web.StreamResponse) -> web.StreamResponse:
    """IAP marks what it answers itself (a refusal, a redirect to sign-in), so a client can tell
    IAP's 401/403 from the app's own."""
    response.headers["X-Goog-IAP-Generated-Response"] = "true"
    return response


def _unauthorized(reason: str) -> web.Response:
    body = f"<!DOCTYPE html><html><body>Invalid IAP credentials: {html.escape(reason)}</body></html>"
    return _generated(web.Response(status=401, text=body, content_type="text/html"))


def _forbidden(reason: str) -> web.Response:
    body = f"<!DOCTYPE html><html><body>Access denied. {html.escape(reason)}</body></html>"
    return _generated(web.Response(status=403, text=body, content_type="text/html"))


def bearer_of(request: web.Request) -> str | None:
    for header in ("Proxy-Authorization", "Authorization"):
        value = request.headers.get(header, "")
        if value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def jwt_covers(aud: str, url: str) -> bool:
    """A signed JWT's `aud` is the URL exactly, or a prefix ending in `/*`."""
    return aud == url or (aud.endswith("/*") and url.startswith(aud[:-1]))


class IAPProxy:
    """One IAP-protected app: programmatic callers bring a token; people bring IAP's session
    cookie, got by signing in with Google through IAP's own OAuth client."""

    def __init__(self, state: EmulatorState, google_url: str, backend_url: str) -> None:
        self.state = state
        self.google_url = google_url.rstrip("/")
        self.certs_url = f"{self.google_url}/oauth2/v1/certs"
        # Where Google publishes each service account's public keys (x509 PEM by key id).
        self.sa_certs_url = f"{self.google_url}/service_accounts/v1/metadata/x509"
        self.backend_url = backend_url.rstrip("/")
        self.cookie = COOKIE_PREFIX + secrets.token_hex(4)  # one per app: cookies ignore ports
        self._google_request = google.auth.transport.requests.Request()
        self.session: aiohttp.ClientSession | None = None

    def _verify(self, token: str) -> dict:
        # Sync (requests): runs in a thread, and fetches the certs from this same emulator.
        # The skew allowance only lets google-auth ignore our clock offset; expiry is then
        # checked against the emulated clock below, with no grace.
        skew = int(abs(self.state.clock_offset)) + 1
        # IAP's own client, and the clients in its programmatic allowlist (read per request: a
        # test takes one out).
        audiences = [IAP_CLIENT_ID, *sorted(self.state.allowlisted_clients)]
        return google_id_token.verify_token(token, self._google_request, audience=audiences,
                                            certs_url=self.certs_url, clock_skew_in_seconds=skew)

    async def _verify_signed_jwt(self, token: str, email: str, url: str) -> dict:
        """A JWT the service account signed: its keys from where Google publishes them, then
        `aud` against the URL asked for, and IAP's one-hour limit."""
        assert self.session is not None
        async with self.session.get(f"{self.sa_certs_url}/{email}") as resp:
            if resp.status != 200:
                raise ValueError(f"no public keys for {email}")
            certs = await resp.json()
        skew = int(abs(self.state.clock_offset)) + 1
        claims = google_jwt.decode(token, certs=certs, clock_skew_in_seconds=skew)  # kid, signature
        if claims.get("sub") != email:
            raise ValueError("sub must be the service account's email, as iss is")
        aud = claims.get("aud")
        if not isinstance(aud, str) or not jwt_covers(aud, url):
            raise ValueError(f"audience {aud!r} does not match {url}")
        if claims["exp"] - claims["iat"] > MAX_JWT_LIFETIME:
            raise ValueError("exp is more than an hour after iat")
        return claims

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.state.counters["iap"] += 1
        if request.path == GATEKEEPER_PATH:
            return self._complete_sign_in(request)
        mode = request.query.get("gcp-iap-mode")
        if mode == "CLEAR_LOGIN_COOKIE":
            self.state.iap_sessions.pop(request.cookies.get(self.cookie, ""), None)
            response = web.HTTPFound(request.path)
            response.del_cookie(self.cookie, path="/")
            raise _generated(response)
        token = bearer_of(request)
        if token:
            claims = await self._check_token(request, token)
            if isinstance(claims, web.Response):
                return claims
        else:
            claims = self._session(request)
            if claims is None:
                if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":
                    return _unauthorized("empty token")  # AJAX gets a 401, not a sign-in page
                raise self._sign_in(request)
        if mode == "IDENTITY":
            return _generated(web.json_response({"email": f"accounts.google.com:{claims['email']}",
                                                 "sub": f"accounts.google.com:{claims['sub']}"}))
        if token and self.state.iap_access_level and not claims.get("_service_account"):
            # A context-aware access level (device policy) checks the browser's device: a token
            # from a command line carries no device, so a person's token is refused.
            self.state.counters["iap_denied"] += 1
            return _forbidden("Your request does not meet the access levels required by this app "
                              "(a device or context-aware access policy).")
        self.state.counters["iap_admitted"] += 1
        return await self._forward(request, claims)

    async def _check_token(self, request: web.Request, token: str) -> dict | web.Response:
        try:
            unverified = google_jwt.decode(token, verify=False)
        except (google_exceptions.GoogleAuthError, ValueError):
            unverified = {}
        issuer = unverified.get("iss")
        now = self.state.now()
        try:
            if isinstance(issuer, str) and issuer.endswith(SA_EMAIL_SUFFIXES):
                url = f"{request.scheme}://{request.host}{request.path}"
                claims = await self._verify_signed_jwt(token, issuer, url)
                claims = {**claims, "email": issuer, "_service_account": True}
                self.state.counters["iap_signed_jwt"] += 1
            else:
                claims = await asyncio.to_thread(self._verify, token)
        except (google_exceptions.GoogleAuthError, ValueError, aiohttp.ClientError) as exc:
            self.state.counters["iap_denied"] += 1
            return _unauthorized(str(exc).splitlines()[0][:200])
        if not claims.get("_service_account") and claims.get("iss") not in (ISSUER, "accounts.google.com"):
            return _unauthorized("wrong issuer")
        if claims["exp"] <= now:
            self.state.counters["iap_denied"] += 1
            return _unauthorized("token expired")
        if claims["iat"] > now + 60:
            return _unauthorized("token used too early")
        if not claims.get("email"):
            return _unauthorized("token has no email claim")
        if claims.get("email", "").endswith(SA_EMAIL_SUFFIXES):
            claims["_service_account"] = True
        return claims

    # -- people: sign in with Google, then a session cookie ---------------------------------------

    def _session(self, request: web.Request) -> dict | None:
        session = self.state.iap_sessions.get(request.cookies.get(self.cookie, ""))
        if session is None or session["app"] != self.cookie or session["expires"] <= self.state.now():
            return None
        return session

    def _sign_in(self, request: web.Request) -> web.HTTPFound:
        """IAP's answer to a request with no credentials: Google's sign-in for IAP's own client,
        coming back to IAP's redirect URI (and from there to this page)."""
        nonce = secrets.token_urlsafe(16)
        self.state.iap_pending[nonce] = {"app": self.cookie, "base": f"{request.scheme}://{request.host}",
                                         "path": request.path_qs, "expires": self.state.now() + 600}
        params = {"client_id": IAP_CLIENT_ID, "response_type": "code", "scope": "openid email",
                  "redirect_uri": iap_redirect_uri(self.google_url), "state": nonce}
        return _generated(web.HTTPFound(f"{self.google_url}/o/oauth2/v2/auth?{urlencode(params)}"))

    def _complete_sign_in(self, request: web.Request) -> web.StreamResponse:
        ticket = self.state.iap_tickets.pop(request.query.get("ticket", ""), None)
        if ticket is None or ticket["app"] != self.cookie or ticket["expires"] <= self.state.now():
            return _unauthorized("the sign-in did not complete (unknown or expired ticket)")
        session = secrets.token_urlsafe(32)
        self.state.iap_sessions[session] = {"app": self.cookie, "email": ticket["email"], "sub": ticket["sub"],
                                            "expires": self.state.now() + self.state.token_lifetime}
        response = web.HTTPFound(ticket["path"])
        response.set_cookie(self.cookie, session, path="/", httponly=True, samesite="Lax")
        raise _generated(response)

    async def _forward(self, request: web.Request, claims: dict) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"cookie"}}
        # The app's own cookies go on; IAP's session cookie is IAP's business.
        cookies = "; ".join(f"{k}={v}" for k, v in request.cookies.items() if not k.startswith(COOKIE_PREFIX))
        if cookies:
            headers["Cookie"] = cookies
        headers["X-Forwarded-Host"], headers["X-Forwarded-Proto"] = request.host, request.scheme
        headers["X-Goog-Authenticated-User-Email"] = f"accounts.google.com:{claims['email']}"
        headers["X-Goog-Authenticated-User-Id"] = f"accounts.google.com:{claims['sub']}"
        assert self.session is not None
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, headers)
        # Streamed both ways, as Google's front end does: a large download is not held here.
        async with self.session.request(request.method, self.backend_url + request.path_qs, headers=headers,
                                        data=request.content if request.body_exists else None,
                                        allow_redirects=False) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
            response = web.StreamResponse(status=upstream.status, headers=out)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def _websocket(self, request: web.Request, headers: dict) -> web.StreamResponse:
        """IAP checks the Upgrade request like any GET, then relays the WebSocket (and checks
        nothing after: Google's documented behaviour)."""
        assert self.session is not None
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("sec-websocket")}
        async with self.session.ws_connect(self.backend_url + request.path_qs, headers=headers) as upstream:
            client = web.WebSocketResponse()
            await client.prepare(request)

            async def pump(source, sink) -> None:
                async for message in source:
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await sink.send_str(message.data)
                    elif message.type == aiohttp.WSMsgType.BINARY:
                        await sink.send_bytes(message.data)
                await sink.close()

            tasks = [asyncio.create_task(pump(client, upstream)), asyncio.create_task(pump(upstream, client))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return client


def iap_redirect_uri(google_url: str) -> str:
    """IAP's OAuth redirect URI (Google's is on iap.googleapis.com; here, the Google port)."""
    return f"{google_url.rstrip('/')}/iap/v1/oauth/clientIds/{IAP_CLIENT_ID}:handleRedirect"


async def handle_redirect(request: web.Request) -> web.Response:
    """GET …/clientIds/{client}:handleRedirect on the Google side: IAP exchanges the code with
    its own client, then sends the browser to the app's gatekeeper path with a one-time ticket
    (the session cookie must be set by the app's own host)."""
    state: EmulatorState = request.app[STATE_KEY]
    pending = state.iap_pending.pop(request.query.get("state", ""), None)
    if pending is None or pending["expires"] <= state.now():
        return html_error(400, "Error 400: invalid_request",
                          "The sign-in request is unknown or expired; open the app's page again.")
    if "error" in request.query:
        return html_error(403, "Sign-in was not completed", request.query["error"])
    grant = state.codes.pop(request.query.get("code", ""), None)
    if grant is None or grant.client_id != IAP_CLIENT_ID or grant.expires <= state.now():
        return html_error(400, "Error 400: invalid_grant", "The authorization code is unknown, used or expired.")
    ticket = secrets.token_urlsafe(24)
    state.iap_tickets[ticket] = {"app": pending["app"], "email": grant.email, "sub": subject_of(grant.email),
                                 "path": pending["path"], "expires": state.now() + 60}
    raise web.HTTPFound(f"{pending['base']}{GATEKEEPER_PATH}?{urlencode({'ticket': ticket})}")


def make_iap_app(proxy: IAPProxy) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):
        proxy.session = aiohttp.ClientSession(auto_decompress=True)
        yield
        await proxy.session.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def echo(request: web.Request) -> web.Response:
    """The app behind IAP: tells what reached it, so tests can see what IAP forwarded."""
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.path_qs,
        "headers": dict(request.headers),
        "body": body.decode(errors="replace"),
        "user": request.headers.get("X-Goog-Authenticated-User-Email"),
    })


async def generated_bytes(request: web.Request) -> web.StreamResponse:
    """GET /_bytes/N: N bytes, generated as they are sent (a 5 GB download without a 5 GB file),
    with a Content-Length; `?chunked=1` sends them chunked instead."""
    size = int(request.match_info["size"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if not request.query.get("chunked"):
        response.content_length = size
    await response.prepare(request)
    block = b"\xa5" * (1024 * 1024)
    left = size
    while left > 0:
        await response.write(block[:min(left, len(block))])
        left -= len(block)
    await response.write_eof()
    return response


async def counted_upload(request: web.Request) -> web.Response:
    """POST /_upload: reads the body as it streams in and says how much arrived (and who sent it)."""
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response({"received": total, "user": request.headers.get("X-Goog-Authenticated-User-Email"),
                              "chunked": "chunked" in request.headers.get("Transfer-Encoding", "")})


async def websocket_echo(request: web.Request) -> web.WebSocketResponse:
    """GET /_ws: a WebSocket that greets with who IAP said is calling, then echoes each message."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.send_str(f"hello {request.headers.get('X-Goog-Authenticated-User-Email')}")
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def make_backend_app() -> web.Application:
    app = web.Application(client_max_size=0)
    app.router.add_get("/_bytes/{size:\\d+}", generated_bytes)
    app.router.add_post("/_upload", counted_upload)
    app.router.add_get("/_ws", websocket_echo)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
