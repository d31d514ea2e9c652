"""A local listener per profile that forwards to the app with the profile's token added — for
tools that cannot run `iapctl` (Vault Agent's API proxy, aws-vault's metadata server, the
cloud-sql-proxy pattern).

HTTP/1.1, bodies streamed both ways (never a whole upload or download in memory), WebSocket
upgrades relayed message by message. Only the user's own processes may use it: the listener is
behind the same gate as the login listener (the peer's uid from the kernel; where it cannot be
had, a TCP proxy does not start: use a unix socket), a foreign `Host` is refused (DNS rebinding
from a web page) and so is a browser's `Origin` unless allowed. The caller's own
`Proxy-Authorization` is never forwarded, nor any hop-by-hop header (RFC 9110 §7.6.1).

The proxy knows the agent through two callables — the profile's token, and a new one when the
upstream refused it — so the arrows stay one way: source → cache → served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Awaitable, Callable

import aiohttp
from aiohttp import web

from iapd.config import ProxySettings
from iapd.errors import IapdError, LoginRequired
from iapd.guard import MAX_HEADER_FIELD, Gate, GuardedSite, can_check_loopback_peers, loopback_peer_uid, unix_peer_uid
from iapd.sources.base import IdToken

log = logging.getLogger("iapd.proxy")

HOP_BY_HOP = frozenset({"connection", "proxy-connection", "keep-alive", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization"})
MAX_CONNECTIONS = 256
PROXY_IDLE_SECONDS = 300.0  # an upstream that sends nothing for this long is given up on
CHUNK = 256 * 1024
SMALL_BODY = 64 * 1024  # an answer this small (with a Content-Length) is relayed in one write
# A token refused by the upstream is replaced once — unless it is this fresh: then the refusal is
# not about the token's age (wrong audience, no access), and asking Google again would not help.
RENEW_IF_OLDER_THAN = 10.0

TokenOf = Callable[[], Awaitable[IdToken]]
Replace = Callable[[IdToken], Awaitable[IdToken]]


def _forwardable(headers, drop: set[str]) -> dict[str, str]:
    """End-to-end headers only: hop-by-hop ones, those the Connection header names, and `drop`."""
    named = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    out: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower in drop:
            continue
        out[name] = value if name not in out else f"{out[name]}, {value}"
    return out


def network_proxy_for(url: str) -> str | None:
    """The corporate proxy for `url` from HTTPS_PROXY / HTTP_PROXY / NO_PROXY (the daemon's
    environment, `[daemon] environment` applied), as aiohttp's trust_env would find it."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    if parts.hostname is None or proxy_bypass(parts.hostname):
        return None
    return getproxies().get(parts.scheme)


def _plain(status: int, line: str) -> web.Response:
    return web.Response(status=status, text=f"iapd proxy: {line}\n", headers={"Cache-Control": "no-store"})


class LocalProxy:
    """One profile's proxy: its listener, and the forwarding."""

    def __init__(self, profile: str, settings: ProxySettings, header: str, token: TokenOf, replace: Replace,
                 session: aiohttp.ClientSession, clock_mono: Callable[[], float], header_timeout: float) -> None:
        self.profile = profile
        self.settings = settings
        self.header = header  # "Proxy-Authorization" or "Authorization"
        self.token = token
        self.replace = replace
        self.session = session
        self.mono = clock_mono
        self.header_timeout = header_timeout
        self.upstream = settings.upstream.rstrip("/")
        self.network_proxy = network_proxy_for(self.upstream)
        self.state = "starting"
        self.error: str | None = None
        self.served = 0
        self._runner: web.AppRunner | None = None
        # The Host names a TCP listener answers to (DNS rebinding: a page of evil.example whose
        # name now resolves to 127.0.0.1 sends Host: evil.example). None: a unix socket, which
        # no web page can reach.
        self._hosts: set[str] | None = set()

    # -- the listener -----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            sock, identify = self._bind()
        except (OSError, SystemExit, ValueError) as exc:
            self.state, self.error = "error", str(exc).removeprefix("iapd: ")
            log.error("proxy of profile %s: %s", self.profile, self.error)
            return
        app = web.Application(client_max_size=0)  # bodies stream through: no size cap of ours
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=30,
                                     max_line_size=MAX_HEADER_FIELD, max_field_size=MAX_HEADER_FIELD,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        gate = Gate(f"proxy {self.profile}", identify, self.header_timeout, max_connections=MAX_CONNECTIONS)
        await GuardedSite(self._runner, sock, gate).start()
        self.state = "listening"
        log.info("proxy of profile %s: listening on %s for %s", self.profile, self.settings.listen, self.upstream)

    def _bind(self) -> tuple[socket.socket, Callable]:
        listen = self.settings.listen
        if listen.startswith("/"):
            from iapd.server import bind_socket

            self._hosts = None
            return bind_socket(listen, own_dir=False), unix_peer_uid
        if not can_check_loopback_peers():
            raise ValueError("cannot tell who connects over TCP on this machine (no sock_diag, no /proc/net/tcp): "
                             "listen on a unix socket path instead")
        host, _, port = listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1" if host == "localhost" else host, int(port)))
            sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
        bound = sock.getsockname()[1]
        self._hosts = {f"{h}:{bound}" for h in ("127.0.0.1", "localhost", "[::1]")}
        return sock, loopback_peer_uid

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.settings.listen.startswith("/"):
            try:
                os.unlink(self.settings.listen)
            except OSError:
                pass
        self.state = "stopped"

    def status(self) -> dict:
        return {"listen": self.settings.listen, "upstream": self.upstream, "header": self.header.lower(),
                "state": self.state, "error": self.error, "served": self.served}

    # -- a request --------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._hosts is not None and request.host.lower() not in self._hosts:
            return _plain(421, f"Host {request.host!r} is not this proxy's own ({self.settings.listen}): refused")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.settings.allow_origins:
            return _plain(403, f"requests from web pages (Origin {origin}) are refused; the profile's "
                               "proxy.allow_origins can allow one")
        # A page's <img src> or link is a GET with no Origin, but a browser marks what it sends
        # on a page's behalf (Fetch Metadata): only one typed in its address bar ("none") passes.
        site = request.headers.get("Sec-Fetch-Site")
        if origin is None and site is not None and site != "none":
            return _plain(403, f"requests a web page makes (Sec-Fetch-Site: {site}) are refused")
        try:
            token = await self.token()
        except LoginRequired as exc:
            who = exc.extra.get("profile") or self.profile  # a `via` profile's login names that one
            return _plain(503, f"login required for profile {who} ({exc.message}): run `iapctl login {who}`")
        except IapdError as exc:
            return _plain(503, f"no token for profile {self.profile}: {exc.message}")
        self.served += 1
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, token)
        return await self._forward(request, token)

    def _headers(self, request: web.Request, token: IdToken) -> dict[str, str]:
        # Content-Length goes on as sent (a chunked upload stays chunked: Transfer-Encoding is hop-by-hop).
        headers = _forwardable(request.headers, {"host", self.header.lower()})
        headers[self.header] = f"Bearer {token.value}"
        return headers

    async def _forward(self, request: web.Request, token: IdToken) -> web.StreamResponse:
        url = self.upstream + request.raw_path
        has_body = request.body_exists
        for attempt in (1, 2):
            try:
                upstream = await self.session.request(
                    request.method, url, headers=self._headers(request, token), allow_redirects=False,
                    data=request.content if has_body else None, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                    proxy=self.network_proxy)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                return _plain(502, f"cannot reach {self.upstream}: {type(exc).__name__}: {str(exc)[:150]}")
            if upstream.status == 401 and attempt == 1 and not has_body \
                    and self.mono() - token.received_mono > RENEW_IF_OLDER_THAN:
                # Revoked early (a logout elsewhere, a key rotated): one new token, one retry.
                upstream.release()
                try:
                    token = await self.replace(token)
                except IapdError as exc:
                    return _plain(503, f"the upstream refused the token and no new one could be had: {exc.message}")
                continue
            break
        try:
            return await self._relay(request, upstream)
        finally:
            upstream.release()

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        headers = _forwardable(upstream.headers, {"content-length"})
        if upstream.content_length is not None and upstream.content_length <= SMALL_BODY:
            # Most API answers: read whole and written in one go (a third of the cost of streaming
            # a few hundred bytes chunk by chunk).
            return web.Response(status=upstream.status, reason=upstream.reason, headers=headers,
                                body=await upstream.read())
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        # Chunk by chunk: a 5 GB download costs CHUNK of memory, and the client's pace sets the
        # upstream's (write() waits for the client to drain).
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # The status has been sent: all that can be said now is to end the connection, so the
            # client sees a short body rather than a complete-looking one.
            log.info("proxy of profile %s: a streamed answer ended early (%s)", self.profile, type(exc).__name__)
            if request.transport is not None:
                request.transport.close()
        return response

    async def _websocket(self, request: web.Request, token: IdToken) -> web.StreamResponse:
        url = self.upstream + request.raw_path
        headers = _forwardable(request.headers, {"host", self.header.lower(), "sec-websocket-key",
                                                 "sec-websocket-version", "sec-websocket-extensions",
                                                 "sec-websocket-protocol", "content-length"})
        headers[self.header] = f"Bearer {token.value}"
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            upstream = await self.session.ws_connect(url, headers=headers, protocols=protocols, autoping=False,
                                                     proxy=self.network_proxy)
        except aiohttp.WSServerHandshakeError as exc:
            return _plain(exc.status if exc.status >= 400 else 502, f"the upstream refused the WebSocket: {exc.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return _plain(502, f"cannot reach {self.upstream}: {type(exc).__name__}")
        client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (), autoping=False)
        await client.prepare(request)

        async def pump(source, sink) -> None:
            async for message in source:
                if message.type == aiohttp.WSMsgType.TEXT:
                    await sink.send_str(message.data)
                elif message.type == aiohttp.WSMsgType.BINARY:
                    await sink.send_bytes(message.data)
                elif message.type == aiohttp.WSMsgType.PING:
                    await sink.ping(message.data)
                elif message.type == aiohttp.WSMsgType.PONG:
                    await sink.pong(message.data)
            await sink.close()

        tasks = [asyncio.create_task(pump(client, upstream)), asyncio.create_task(pump(upstream, client))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await upstream.close()
        return client


class Proxies:
    """The profiles' proxies, started and stopped to match the config (at start and each reload)."""

    def __init__(self, make: Callable[[str, ProxySettings], LocalProxy]) -> None:
        self.make = make
        self.running: dict[str, LocalProxy] = {}

    async def sync(self, wanted: dict[str, ProxySettings]) -> None:
        for name, proxy in list(self.running.items()):
            if wanted.get(name) != proxy.settings:
                await proxy.stop()
                del self.running[name]
        for name, settings in wanted.items():
            if name not in self.running:
                proxy = self.running[name] = self.make(name, settings)
                await proxy.start()

    async def close(self) -> None:
        await self.sync({})

    def status(self, name: str) -> dict | None:
        proxy = self.running.get(name)
        return proxy.status() if proxy is not None else None
