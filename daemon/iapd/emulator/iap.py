"""Identity-Aware Proxy in front of a backend, and a small echo backend to stand behind it.

IAP takes the ID token from `Proxy-Authorization: Bearer` (so the app keeps `Authorization`),
else from `Authorization: Bearer`; checks signature, issuer, audience and expiry; strips
`Proxy-Authorization`; adds the identity headers; forwards. Otherwise it answers 401 with HTML.
Signature and audience are checked by google-auth's own `verify_token` against our certs URL.
"""

from __future__ import annotations

import asyncio
import html

import aiohttp
import google.auth.transport.requests
from aiohttp import web
from google.auth import exceptions as google_exceptions
from google.oauth2 import id_token as google_id_token

from iapd.emulator.state import ISSUER, EmulatorState

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
IAP_KEY = web.AppKey("iap", "IAPProxy")


def _unauthorized(reason: str) -> web.Response:
    body = f"<!DOCTYPE html><html><body>Invalid IAP credentials: {html.escape(reason)}</body></html>"
    return web.Response(status=401, text=body, content_type="text/html")


def bearer_of(request: web.Request) -> str | None:
    for header in ("Proxy-Authorization", "Authorization"):
        value = request.headers.get(header, "")
        if value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


class IAPProxy:
    def __init__(self, state: EmulatorState, certs_url: str, backend_url: str, audiences: list[str]) -> None:
        self.state = state
        self.certs_url = certs_url
        self.backend_url = backend_url.rstrip("/")
        self.audiences = audiences
        self._google_request = google.auth.transport.requests.Request()
        self.session: aiohttp.ClientSession | None = None

    def _verify(self, token: str) -> dict:
        # Sync (requests): runs in a thread, and fetches the certs from this same emulator.
        # The skew allowance only lets google-auth ignore our clock offset; expiry is then
        # checked against the emulated clock below, with no grace.
        skew = int(abs(self.state.clock_offset)) + 1
        return google_id_token.verify_token(token, self._google_request, audience=self.audiences,
                                            certs_url=self.certs_url, clock_skew_in_seconds=skew)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.state.counters["iap"] += 1
        token = bearer_of(request)
        if not token:
            return _unauthorized("empty token")
        try:
            claims = await asyncio.to_thread(self._verify, token)
        except (google_exceptions.GoogleAuthError, ValueError) as exc:
            self.state.counters["iap_denied"] += 1
            return _unauthorized(str(exc).splitlines()[0][:200])
        now = self.state.now()
        if claims.get("iss") not in (ISSUER, "accounts.google.com"):
            return _unauthorized("wrong issuer")
        if claims["exp"] <= now:
            self.state.counters["iap_denied"] += 1
            return _unauthorized("token expired")
        if claims["iat"] > now + 60:
            return _unauthorized("token used too early")
        if not claims.get("email"):
            return _unauthorized("token has no email claim")
        self.state.counters["iap_admitted"] += 1
        return await self._forward(request, claims)

    async def _forward(self, request: web.Request, claims: dict) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-Forwarded-Host"], headers["X-Forwarded-Proto"] = request.host, request.scheme
        headers["X-Goog-Authenticated-User-Email"] = f"accounts.google.com:{claims['email']}"
        headers["X-Goog-Authenticated-User-Id"] = f"accounts.google.com:{claims['sub']}"
        assert self.session is not None
        async with self.session.request(request.method, self.backend_url + request.path_qs, headers=headers,
                                        data=await request.read(), allow_redirects=False) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP | {"content-encoding"}}
            return web.Response(status=upstream.status, body=body, headers=out)


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


def make_backend_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app
