"""An oauth2-proxy-like gateway in front of the echo app: what Kubeflow puts before its apps
(oauth2-proxy with `--skip-jwt-bearer-tokens`), so that programmatic clients send an ID token
from the issuer as `Authorization: Bearer`. It verifies the JWT — signature by the issuer's
JWKS, `iss`, `aud`, `exp` — and forwards with oauth2-proxy's `X-Auth-Request-*` headers; else 401.
With no token at all, a browser is redirected to the issuer's sign-in (a client that asks for
`Accept: application/json` gets the 401).
"""

from __future__ import annotations

import secrets
import time
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from google.auth import exceptions as auth_exceptions
from google.auth import jwt as google_jwt

from iapd.emulator.iap import HOP_BY_HOP
from iapd.emulator.issuer import IssuerState

GATEWAY_KEY = web.AppKey("gateway", "Gateway")


class Gateway:
    def __init__(self, issuer: IssuerState, issuer_url: str, audiences: list[str], backend_url: str) -> None:
        self.issuer = issuer
        self.issuer_url = issuer_url
        self.audiences = audiences
        self.backend_url = backend_url.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    def verify(self, token: str) -> dict:
        key = self.issuer.key
        claims = google_jwt.decode(token, certs={key.kid: key.cert_pem}, audience=self.audiences)
        if claims.get("iss") != self.issuer_url:
            raise ValueError(f"issuer {claims.get('iss')!r} is not trusted")
        if claims["exp"] <= time.time():
            raise ValueError("token expired")
        return claims

    async def handle(self, request: web.Request) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() != "bearer ":
            if "application/json" in request.headers.get("Accept", ""):
                return web.Response(status=401, text="401 Unauthorized: no bearer token\n")  # an API client
            # A browser goes to sign in at the issuer, for the gateway's client, as oauth2-proxy
            # with --skip-provider-button sends it.
            params = {"client_id": self.audiences[0], "response_type": "code", "scope": "openid email",
                      "redirect_uri": f"{request.scheme}://{request.host}/oauth2/callback",
                      "state": secrets.token_urlsafe(12)}
            raise web.HTTPFound(f"{self.issuer_url}/auth?{urlencode(params)}")
        try:
            claims = self.verify(header[7:].strip())
        except (auth_exceptions.GoogleAuthError, ValueError, KeyError) as exc:
            return web.Response(status=401, text=f"401 Unauthorized: {str(exc).splitlines()[0][:150]}\n")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"authorization"}}
        headers["X-Auth-Request-Email"] = str(claims.get("email", ""))
        headers["X-Auth-Request-User"] = str(claims.get("sub", ""))
        assert self.session is not None
        async with self.session.request(request.method, self.backend_url + request.path_qs, headers=headers,
                                        data=await request.read(), allow_redirects=False) as upstream:
            body = await upstream.read()
            return web.Response(status=upstream.status, body=body, content_type=upstream.content_type)


def make_gateway_app(gateway: Gateway) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application):
        gateway.session = aiohttp.ClientSession()
        yield
        await gateway.session.close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", gateway.handle)
    return app
