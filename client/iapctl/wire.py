"""The client's side of the socket API: one HTTP/1.1 request on a fresh unix-socket connection.

Written against `_socket` rather than `socket`/`http.client`: those import enum, selectors,
email and more, which would cost more than the whole rest of `iapctl token` (measured with
`python -X importtime`). The protocol needed here is tiny: one request with `Connection:
close`, read to EOF, split head from body.
"""

import _socket

# Connect fails fast (a missing or dead socket refuses at once); the overall deadline bounds a
# daemon that accepted but hangs. Both keep `iapctl token` from ever hanging flytekit.
CONNECT_TIMEOUT = 2.0
DEFAULT_TIMEOUT = 30.0


class Unreachable(Exception):
    """Nothing (or nothing that speaks HTTP) answers on the socket."""


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        import json

        return json.loads(self.body or b"{}")


def request(socket_path: str, method: str, target: str, body: bytes | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> Response:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        _connect(sock, socket_path)
        sock.settimeout(timeout)
        head = f"{method} {target} HTTP/1.1\r\nHost: iapd\r\nConnection: close\r\nUser-Agent: iapctl\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"\r\n" + (body or b""))
        chunks = []
        while True:
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
    import time

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
    if length is not None and length.isdigit():
        body = body[: int(length)]
    return Response(status, headers, body)
