"""The socket API: HTTP/1.1 on a unix socket, only for processes of the same user.

    GET  /healthz                      {"ok": true}
    GET  /v1/token/{profile}           the ID token, text/plain (nothing else)
    GET  /v1/token/{profile}?format=json  {"profile", "token", "expires_in", "expires_at"}
    POST /v1/adhoc/token               a profile given in the body ({"audience", "user"|"service_account"}),
                                       registered in memory; then its token, as above
    GET  /v1/status[?format=text]                    daemon and per-profile state, JSON (never a token)
    POST /v1/login/{profile}[?device=1] start (or join) a login → {"auth_url", ...} (device: "user_code")
    GET  /v1/login/{profile}?wait=S    long-poll the login's outcome
    DELETE /v1/login/{profile}         cancel the login in progress (Ctrl-C in the client)
    POST /v1/login/{profile}/complete  {"redirect_url": ...}: finish a login without a browser
    POST /v1/logout/{profile}          revoke (best effort), wipe, forget; POST /v1/logout: all
    POST /v1/reload                    re-read the config (as SIGHUP): {"reloaded", "profiles"|"error"}
    POST /v1/stop                      shut down (as SIGTERM)

Errors are JSON `{"error": CODE, "message": ...}` with a fitting status (see iapd.errors).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from iapd.agent import Agent
from iapd.errors import BadRequest, IapdError, without_message
from iapctl.paths import UnsafePath, ensure_private_dir

log = logging.getLogger("iapd.server")
AGENT = web.AppKey("agent", Agent)
STOP = web.AppKey("stop", Callable[[], None])

MAX_BODY = 64 * 1024
# sizeof(sockaddr_un.sun_path): 108 on Linux, 104 on macOS and the BSDs (with the final NUL).
MAX_SOCKET_PATH = 108 if sys.platform.startswith("linux") else 104


def error_response(code: str, message: str, status: int, **extra: object) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except IapdError as exc:
        return error_response(exc.code, exc.message, exc.status, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status, "bad_request")
        return error_response(code, exc.reason, exc.status)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error("internal error on %s %s: %s", request.method, request.path, without_message(exc))
        return error_response("internal", "internal error in iapd; see its log", 500)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def token(request: web.Request) -> web.Response:
    """The token as text/plain; with ?format=json, the token and when it expires (for kubectl's
    ExecCredential and other callers that cache it themselves)."""
    agent, name = request.app[AGENT], request.match_info["profile"]
    if request.query.get("format") == "json":
        served = await agent.token_info(name)
        # Advertised as good until the margin: a caller that caches it (kubectl) stops using it
        # when iapd itself would, not at the last second of its `exp`.
        left = max(served.remaining(agent.clock) - agent.cache.margin_of(served), 0.0)
        expires_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(agent.clock.wall() + left))
        return web.json_response({"profile": name, "token": served.value, "expires_in": int(left),
                                  "expires_at": expires_at}, headers={"Cache-Control": "no-store"})
    value = await agent.token(name)
    return web.Response(text=value, content_type="text/plain", headers={"Cache-Control": "no-store"})


async def adhoc_token(request: web.Request) -> web.Response:
    """A profile defined by the request itself (the flyte-iap drop-in flags), then its token."""
    agent = request.app[AGENT]
    name = agent.add_adhoc_profile(await _json_body(request))
    value = await agent.token(name)
    return web.Response(text=value, content_type="text/plain", headers={"Cache-Control": "no-store"})


async def status(request: web.Request) -> web.Response:
    answer = request.app[AGENT].status()
    if request.query.get("format") == "text":  # what `iapctl status` prints (iapctl.status_text)
        from iapctl.status_text import render

        return web.Response(text=render(answer), content_type="text/plain")
    return web.json_response(answer)


async def login_start(request: web.Request) -> web.Response:
    """?device=1: the device-authorization grant (RFC 8628), for an OpenID Connect profile."""
    device = request.query.get("device", "") in ("1", "true", "yes")
    return web.json_response(await request.app[AGENT].login(request.match_info["profile"], device))


async def login_poll(request: web.Request) -> web.Response:
    try:
        wait = float(request.query.get("wait", "0"))
        if not math.isfinite(wait):
            raise ValueError
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    wait = min(max(wait, 0.0), 120.0)
    return web.json_response(await request.app[AGENT].login_status(request.match_info["profile"], wait))


async def login_cancel(request: web.Request) -> web.Response:
    return web.json_response(request.app[AGENT].login_cancel(request.match_info["profile"]))


async def login_complete(request: web.Request) -> web.Response:
    url = (await _json_body(request)).get("redirect_url")
    if not isinstance(url, str) or not url:
        raise BadRequest("give the redirect URL as {\"redirect_url\": ...}")
    return web.json_response(await request.app[AGENT].login_complete(request.match_info["profile"], url))


async def logout(request: web.Request) -> web.Response:
    return web.json_response(await request.app[AGENT].logout(request.match_info.get("profile")))


async def set_clock(request: web.Request) -> web.Response:
    """Test-only (`iapd serve --test-clock`): shift the daemon's wall clock, as a suspend would."""
    body = await _json_body(request)
    agent = request.app[AGENT]
    try:
        agent.clock.wall_offset = float(body["wall_offset"])
        # A suspend moves CLOCK_BOOTTIME too; a clock set by hand or by NTP does not.
        agent.clock.mono_offset = float(body.get("mono_offset", agent.clock.mono_offset))
    except (KeyError, TypeError, ValueError):
        raise BadRequest("give {\"wall_offset\": seconds[, \"mono_offset\": seconds]}") from None
    agent.cache.wake()
    return web.json_response({"wall_offset": agent.clock.wall_offset, "mono_offset": agent.clock.mono_offset})


async def reload(request: web.Request) -> web.Response:
    return web.json_response(await request.app[AGENT].reload("asked over the socket"))


async def stop(request: web.Request) -> web.Response:
    """`iapctl stop`: shut down after this answer (as SIGTERM would)."""
    asyncio.get_running_loop().call_soon(request.app[STOP])
    return web.json_response({"stopping": True, "pid": os.getpid()})


def make_app(agent: Agent, test_clock: bool = False, on_stop: Callable[[], None] | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY)
    app[AGENT] = agent
    app[STOP] = on_stop or (lambda: None)
    r = app.router
    r.add_post("/v1/reload", reload)
    r.add_post("/v1/stop", stop)
    r.add_get("/healthz", healthz)
    r.add_get("/v1/token/{profile}", token)
    r.add_post("/v1/adhoc/token", adhoc_token)
    r.add_get("/v1/status", status)
    r.add_post("/v1/login/{profile}", login_start)
    r.add_get("/v1/login/{profile}", login_poll)
    r.add_delete("/v1/login/{profile}", login_cancel)
    r.add_post("/v1/login/{profile}/complete", login_complete)
    r.add_post("/v1/logout/{profile}", logout)
    r.add_post("/v1/logout", logout)
    if test_clock:
        r.add_post("/v1/test/clock", set_clock)
    return app


def _check_socket_dir(path: Path, ours: bool) -> None:
    try:
        ensure_private_dir(path, tighten=ours)
    except UnsafePath as exc:
        raise SystemExit(f"iapd: unsafe socket directory: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"iapd: cannot create socket directory {path}: {exc.strerror}") from None


SD_LISTEN_FDS_START = 3


def inherited_socket() -> socket.socket | None:
    """The listening socket systemd passed us (socket activation), if any.

    Protocol: LISTEN_PID is our pid, LISTEN_FDS ≥ 1, the first fd is 3. The variables are
    removed so that children (none today) do not think the fds are theirs."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SystemExit("iapd: the socket passed by the service manager is not a unix stream socket")
    sock.setblocking(False)
    return sock


def bind_socket(path: str, own_dir: bool = True) -> socket.socket:
    """Bind the listening socket: 0600 in a private directory (made 0700 when it is iapd's own:
    `own_dir`); replace a stale socket from a dead daemon, but never steal one a live daemon
    answers on."""
    target = Path(path)
    if len(os.fsencode(path)) >= MAX_SOCKET_PATH:
        raise SystemExit(f"iapd: the socket path {path} is {len(os.fsencode(path))} bytes; a unix socket path may "
                         f"have at most {MAX_SOCKET_PATH - 1}: set IAPD_SOCKET (or [daemon] socket) to a shorter one")
    _check_socket_dir(target.parent, own_dir)
    if os.path.lexists(target):
        mode = os.lstat(target).st_mode
        if not stat.S_ISSOCK(mode):
            raise SystemExit(f"iapd: {target} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(target))
        except (ConnectionRefusedError, FileNotFoundError):
            target.unlink(missing_ok=True)  # stale: its daemon is gone
        except OSError as exc:
            raise SystemExit(f"iapd: cannot tell whether {target} is in use: {exc}") from None
        else:
            raise SystemExit(f"iapd: another iapd is already serving on {target}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where it is wider
    try:
        sock.bind(str(target))
    finally:
        os.umask(old_umask)
    os.chmod(target, 0o600)
    sock.listen(1024)  # bursts of clients (flytekit fans out); the kernel caps it at somaxconn
    sock.setblocking(False)
    return sock


def remove_socket_if_ours(path: str, inode: int) -> None:
    """On shutdown: unlink the socket file unless another daemon has replaced it since."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
