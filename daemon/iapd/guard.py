"""Who may talk to our listeners, and for how long: the one gate in front of aiohttp.

Both listeners are reachable by other local users: the socket API by path (its file modes are
a first fence, not the last), the login listener by port (every local user can read its port in
/proc/net/tcp). So every connection is checked before a byte is read:

* the peer's uid, from the kernel: SO_PEERCRED on the unix socket; for the loopback TCP
  listener the owner of the peer's socket, asked of sock_diag by its exact address (else read
  from /proc/net/tcp; where neither can be had — macOS, a seccomp filter and a pid-only /proc —
  the login listener takes only a pasted redirect, see iapd.login);
* a cap on open connections per listener (an idle one is evicted to admit a new one), and a
  deadline for the request headers — so nobody can hold the daemon's file descriptors;
* for the socket API, a fast path for exactly what `iapctl token` sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import Callable

from aiohttp import web

from iapctl.wire import peer_uid

log = logging.getLogger("iapd.guard")

MAX_HEADER_FIELD = 8 * 1024
# iapctl's request is ~100 bytes in 5 lines; anything bigger gets aiohttp's full checks.
FAST_PATH_MAX = 4096
FAST_PATH_MAX_LINES = 16
PROC_NET_TCP = "/proc/net/tcp"
PROC_NET_TCP6 = "/proc/net/tcp6"
REFUSAL_LOG_EVERY = 10.0  # seconds: a flood of refused connections is one log line, not thousands


def unix_peer_uid(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    return peer_uid(sock) if sock is not None else None


_NATIVE = "little" if socket.htonl(1) != 1 else "big"
TCP_ESTABLISHED = "01"
TCP_STATE_ESTABLISHED = 1
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST = 4, 20, 1


def _hex_address(address: tuple) -> str:
    """127.0.0.1:8080 as /proc/net/tcp writes it: the IPv4 address as a native-endian 32-bit
    hex number (so reversed bytes on little-endian machines), the port as 4 hex digits."""
    number = int.from_bytes(socket.inet_aton(address[0]), _NATIVE)
    return f"{number:08X}:{address[1]:04X}"


def _hex_mapped(address: tuple) -> str:
    """The same IPv4 address as /proc/net/tcp6 writes it for an IPv6 socket that reached it as
    ::ffff:127.0.0.1 — a client of ours may use one: four native-endian 32-bit words."""
    packed = socket.inet_pton(socket.AF_INET6, f"::ffff:{address[0]}")
    words = "".join(f"{int.from_bytes(packed[i:i + 4], _NATIVE):08X}" for i in range(0, 16, 4))
    return f"{words}:{address[1]:04X}"


class NoSockDiag(Exception):
    """This process may not ask the kernel's sock_diag (seccomp, RestrictAddressFamilies, not Linux)."""


def sock_diag_peer_uid(peer: tuple, ours: tuple) -> int | None:
    """The owner of the peer's socket, asked of the kernel by its exact 4-tuple over netlink
    (sock_diag, what `ss` uses): one answer for one socket, however many others there are —
    where /proc/net/tcp costs a parse of every row, 36k TIME_WAIT rows an attacker makes for
    free included. Works where /proc is a pid-only subset. None: no such established socket."""
    if not hasattr(socket, "AF_NETLINK"):
        raise NoSockDiag
    sockid = (struct.pack("!HH", peer[1], ours[1]) + socket.inet_aton(peer[0]) + bytes(12)
              + socket.inet_aton(ours[0]) + bytes(12) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))  # no cookie
    request = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 1 << TCP_STATE_ESTABLISHED) + sockid
    message = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as link:
            link.settimeout(1.0)
            link.sendto(message, (0, 0))
            answer = link.recv(4096)
    except OSError as exc:
        raise NoSockDiag from exc
    if len(answer) < 88 or struct.unpack_from("=H", answer, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: no such socket (it closed already)
    state = answer[17]
    uid, inode = struct.unpack_from("=II", answer, 80)
    # A socket that is closing, or orphaned (inode 0, uid 0), belongs to nobody we can name.
    return uid if state == TCP_STATE_ESTABLISHED and inode != 0 else None


def loopback_peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The uid that owns the other end of a loopback TCP connection: from sock_diag, else from
    /proc/net/tcp and tcp6 (the peer's socket is listed with its local address = our peer,
    remote = us). Only an established socket with an inode counts: TIME_WAIT and orphaned rows
    show uid 0 and inode 0, and a quick close would otherwise pass for root. Where nothing says
    (or nothing can be asked), None — refused."""
    peer, ours = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
    if not peer or not ours:
        return None
    try:
        return sock_diag_peer_uid(peer, ours)
    except NoSockDiag:
        pass
    for table_path, wanted in ((PROC_NET_TCP, (_hex_address(peer), _hex_address(ours))),
                               (PROC_NET_TCP6, (_hex_mapped(peer), _hex_mapped(ours)))):
        try:
            with open(table_path, encoding="ascii") as table:
                next(table, None)  # the header line
                for line in table:
                    fields = line.split()
                    if len(fields) > 9 and (fields[1], fields[2]) == wanted and fields[3] == TCP_ESTABLISHED \
                            and fields[9] != "0":
                        return int(fields[7])
        except OSError:
            continue
    return None


def can_check_loopback_peers() -> bool:
    """Whether the kernel can tell us who a loopback peer is: sock_diag, else /proc/net/tcp
    (neither on macOS; not /proc under ProcSubset=pid; not netlink under a seccomp filter)."""
    try:
        probe = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        probe.close()
        return True
    except (OSError, AttributeError):
        pass
    try:
        with open(PROC_NET_TCP, "rb") as table:
            table.read(1)
    except OSError:
        return False
    return True


class Gate:
    """The policy of one listener, shared by its connections."""

    def __init__(self, what: str, identify: Callable[[asyncio.BaseTransport], int | None], header_timeout: float,
                 max_connections: int | None = None, fast_token: Callable[[str], str | None] | None = None) -> None:
        self.what = what
        self.identify = identify
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.fast_token = fast_token
        self.connections: dict["GuardedProtocol", None] = {}  # insertion order: oldest first
        self.refused = 0
        self._refusals_unlogged = 0
        self._last_refusal_log = float("-inf")

    def refuse(self, why: str) -> None:
        self.refused += 1
        self._refusals_unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_refusal_log >= REFUSAL_LOG_EVERY:
            log.warning("%s: refused %d connection(s): %s", self.what, self._refusals_unlogged, why)
            self._refusals_unlogged, self._last_refusal_log = 0, now

    def admit(self, conn: "GuardedProtocol") -> bool:
        """Room for one more connection? At the cap, the oldest connection that has not yet sent
        its request gives way (an idle connection costs its holder nothing; a working one does)."""
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            idle = next((c for c in self.connections if c.waiting_for_headers), None)
            if idle is None:
                self.refuse(f"{self.max_connections} connections are busy")
                return False
            idle.evict()
        self.connections[conn] = None
        return True


class GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: the gate's checks, then aiohttp (or, for
    `GET /v1/token/P` with `Connection: close` in one segment — exactly what iapctl sends — for a
    token that can be served as it is, an answer written here: about half the time aiohttp takes
    to the first byte, ~0.2 ms against ~0.45 ms measured here)."""

    def __init__(self, inner: asyncio.Protocol, gate: Gate) -> None:
        self.inner = inner
        self.gate = gate
        self.timer: asyncio.TimerHandle | None = None
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.first = True

    @property
    def waiting_for_headers(self) -> bool:
        return self.timer is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        uid = self.gate.identify(transport)
        if uid != os.getuid():
            self.gate.refuse(f"uid {uid} is not the daemon's own (uid {os.getuid()})")
            transport.abort()
            return
        if not self.gate.admit(self):
            transport.abort()
            return
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(self.gate.header_timeout, self._too_slow)
        self.inner.connection_made(transport)

    def evict(self) -> None:
        log.debug("%s: closed an idle connection to make room", self.gate.what)
        if self.transport is not None:
            self.transport.abort()

    def _fast_path(self, data: bytes) -> bool:
        if self.gate.fast_token is None or len(data) > FAST_PATH_MAX or not data.startswith(b"GET /v1/token/") \
                or not data.endswith(b"\r\n\r\n"):
            return False
        lines = data[:-4].split(b"\r\n")
        if len(lines) > FAST_PATH_MAX_LINES:
            return False  # aiohttp applies its limits (64 headers) and answers
        method, target, version = (lines[0].split(b" ") + [b"", b""])[:3]
        headers = [line.lower() for line in lines[1:]]
        if version != b"HTTP/1.1" or b"connection: close" not in headers \
                or any(h.startswith((b"content-length:", b"transfer-encoding:")) for h in headers):
            return False
        profile = target[len(b"/v1/token/"):]
        if not profile or b"/" in profile or b"%" in profile or b"?" in profile:
            return False
        token = self.gate.fast_token(profile.decode("ascii", "replace"))
        if token is None:
            return False
        body = token.encode()
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Cache-Control: no-store\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()
        return True

    def _too_slow(self) -> None:
        if self.transport is not None:
            log.info("%s: closed a connection that sent no complete request within %.0fs",
                     self.gate.what, self.gate.header_timeout)
            self.transport.abort()

    def _headers_done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer, self.head = None, b""

    def data_received(self, data: bytes) -> None:
        if self.first:
            self.first = False
            if self._fast_path(data):
                self._headers_done()
                return
        if self.timer is not None:
            self.head = (self.head + data)[-(MAX_HEADER_FIELD * 4):]
            if b"\r\n\r\n" in self.head:
                self._headers_done()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.gate.connections.pop(self, None)
        if self.transport is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """An aiohttp site on an already-bound, listening socket (unix or TCP) behind a Gate."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: Gate) -> None:
        super().__init__(runner)
        self._sock = sock
        self._gate = gate

    @property
    def name(self) -> str:
        return f"{self._gate.what} on {self._sock.getsockname()}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()

        def factory() -> GuardedProtocol:
            return GuardedProtocol(server(), self._gate)

        if self._sock.family == socket.AF_UNIX:
            self._server = await loop.create_unix_server(factory, sock=self._sock)
        else:
            self._server = await loop.create_server(factory, sock=self._sock)
