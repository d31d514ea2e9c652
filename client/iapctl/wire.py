"""The client's side of the socket API: one HTTP/1.1 request on a fresh unix-socket connection.

Written against `_socket` rather than `socket`/`http.client`: those import enum, selectors,
email and more, which would cost more than the whole rest of `iapctl token` (measured with
`python -X importtime`). The protocol needed here is tiny: one request with `Connection:
close`, read to EOF, split head from body.

Trust: whatever answers at the socket path gets our request (a pasted redirect URL carries an
authorization code) and we print whatever token it sends. So before a byte is sent we check
that the socket's directory is ours and not writable by others, and that the process listening
is of our own uid (the kernel says, SO_PEERCRED / LOCAL_PEERCRED) — as the daemon checks us.
"""

import _socket
import posix  # not os: see iapctl.paths
import sys
import time

from iapctl.paths import unsafe_dir

# Connect fails fast (a missing or dead socket refuses at once); the overall deadline bounds a
# daemon that accepted but hangs. Both keep `iapctl token` from ever hanging flytekit.
CONNECT_TIMEOUT = 2.0
DEFAULT_TIMEOUT = 30.0

# macOS/BSD: getsockopt(SOL_LOCAL, LOCAL_PEERCRED) fills a struct xucred
# { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; } (76 bytes).
_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE = 0, 0x001, 76


class Unreachable(Exception):
    """Nothing (or nothing that speaks HTTP) answers on the socket."""


class Untrusted(Exception):
    """Something answers, or could, that is not ours: refuse it (and do not start a daemon)."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        import json

        return json.loads(self.body or b"{}")


def peer_uid(sock) -> int | None:
    """The uid of the process at the other end of a connected unix socket, or None when the
    platform cannot say (callers then refuse). Works on `_socket` and `socket` objects alike."""
    try:
        if hasattr(_socket, "SO_PEERCRED"):  # Linux: struct ucred { pid_t pid; uid_t uid; gid_t gid; }
            raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            return int.from_bytes(raw[4:8], sys.byteorder)
        if sys.platform == "darwin" or "bsd" in sys.platform:
            raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE)
            return int.from_bytes(raw[4:8], sys.byteorder)
    except OSError:
        return None
    return None


def request(socket_path: str, method: str, target: str, body: bytes | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> Response:
    """One request, bounded as a whole by `timeout` (not per read: a server that trickles a
    byte at a time must not keep us past it)."""
    if not all("!" <= c <= "~" for c in target):
        # A CR/LF (or a space) in a profile name would put a second request on the socket.
        raise ValueError(f"refusing a request target with a space or control character: {target[:60]!r}")
    deadline = time.monotonic() + timeout
    folder = socket_path.rpartition("/")[0] or "/"
    reason = unsafe_dir(folder)
    if reason is not None:
        raise Untrusted(f"refusing the socket {socket_path}: {reason}")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        _connect(sock, socket_path)
        uid = peer_uid(sock)
        if uid != posix.getuid():
            raise Untrusted(f"refusing the socket {socket_path}: it is served by uid {uid}, not by you "
                            f"(uid {posix.getuid()}); another user may be impersonating iapd")
        head = f"{method} {target} HTTP/1.1\r\nHost: iapd\r\nConnection: close\r\nUser-Agent: iapctl\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(head.encode() + b"\r\n" + (body or b""))
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise Unreachable(f"no answer within {timeout:.0f}s") from None
    except OSError as exc:
        raise Unreachable(exc.strerror or str(exc)) from None
    finally:
        sock.close()
    return _parse(b"".join(chunks))


def _connect(sock, socket_path: str) -> None:
    """Connect within CONNECT_TIMEOUT. Trap: a unix socket whose listen backlog is full answers
    a connect with EAGAIN at once (it does not wait, as TCP would): retry until the deadline."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    sock.settimeout(CONNECT_TIMEOUT)
    while True:
        try:
            sock.connect(socket_path)
            return
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise Unreachable(exc.strerror or str(exc)) from None
        except TimeoutError:
            raise Unreachable("connect timed out") from None
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise Unreachable("the daemon's connection queue stayed full") from None
            time.sleep(0.005)


def _parse(raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        if not sep:
            raise ValueError
        status = int(lines[0].split(b" ", 2)[1])
    except (ValueError, IndexError):
        raise Unreachable("the answer on the socket is not HTTP (is it iapd?)") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Unreachable("the answer on the socket has an invalid Content-Length")
        if len(body) < int(length):
            # A cut-short body must never be printed as a token.
            raise Unreachable(f"the answer was cut short ({len(body)} of {length} bytes)")
        body = body[: int(length)]
    return Response(status, headers, body)
