"""`iapd serve`: put the pieces together, run until SIGTERM/SIGINT, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from iapd.agent import Agent, default_state_dir
from iapd.config import Config
from iapctl.paths import UnsafePath
from iapd.google_http import new_session
from iapd.clock import Clock
from iapd.guard import MAX_HEADER_FIELD, Gate, GuardedSite, unix_peer_uid
from iapd.server import bind_socket, inherited_socket, make_app, remove_socket_if_ours
from iapd.notify import notify
from iapd.store import CredentialStore, StoreInUse

log = logging.getLogger("iapd")


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a malformed request with a traceback (whose text quotes the raw bytes — which
    could be anything a confused client sent). Make it one line naming the kind of error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args, record.exc_info = "rejected a malformed request (%s)", (type(exc).__name__,), None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def setup_logging(level: str) -> None:
    # Under systemd (JOURNAL_STREAM set) journald adds timestamps; elsewhere we do.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    # Libraries stay at WARNING whatever our level: aiohttp's access log is noise, and google-auth
    # and urllib3 at DEBUG log request bodies and URLs that can carry tokens and secrets.
    for name in ("aiohttp.access", "google", "urllib3", "grpc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestFilter())


def expand(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else None


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (systemd and most shells start us at 1024): the
    daemon's descriptors are its capacity to answer, and other local users can open connections
    to the login listener. macOS refuses a soft limit above OPEN_MAX whatever the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 10240):
        if target == resource.RLIM_INFINITY or target <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return
        except (ValueError, OSError):
            continue


async def serve(config_path: str, config: Config, socket_path: str | None, test_clock: bool = False) -> int:
    """Run the agent on `config` (read from `config_path`, which reloads read again)."""
    from iapctl.paths import default_socket_path

    raise_fd_limit()
    sock = inherited_socket()
    if sock is not None:
        path, inode = sock.getsockname(), None  # systemd's socket: systemd removes it, not us
    else:
        # The client's precedence (iapctl.paths.socket_path), with --socket first.
        default = default_socket_path()
        path = socket_path or os.environ.get("IAPD_SOCKET") or expand(config.daemon.socket) or default
        sock = bind_socket(path, own_dir=path == default)
        inode = os.lstat(path).st_ino
    try:
        store = await CredentialStore.open(default_state_dir(config), owner=f"pid {os.getpid()}, socket {path}",
                                           kind=config.daemon.store)
    except (UnsafePath, OSError, StoreInUse) as exc:
        if inode is not None:
            remove_socket_if_ours(path, inode)
        print(f"iapd: cannot use the state directory: {exc}", file=sys.stderr)
        return 1
    session = new_session(config.daemon.http_timeout_seconds)
    clock = Clock()
    agent = Agent(config, config_path, store, session, clock, path)
    # Who manages us: `iapctl stop|restart` go through the service manager when there is one.
    agent.service = "systemd" if inode is None else ("launchd" if os.environ.get("XPC_SERVICE_NAME") else None)
    stop = asyncio.Event()
    runner = web.AppRunner(make_app(agent, test_clock, stop.set), access_log=None, handle_signals=False,
                           keepalive_timeout=15, max_line_size=MAX_HEADER_FIELD, max_field_size=MAX_HEADER_FIELD,
                           max_headers=64, shutdown_timeout=5.0,
                           # A client that goes away cancels its request: a login's long-poll
                           # then tells the login manager that its waiter is gone.
                           handler_cancellation=True)
    await runner.setup()
    gate = Gate("socket API", unix_peer_uid, config.daemon.header_timeout_seconds, fast_token=agent.cached_token)
    site = GuardedSite(runner, sock, gate)
    await site.start()
    agent.cache.start()
    await agent.sync_proxies()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # `systemctl --user reload iapd`, kill -HUP
    loop.add_signal_handler(signal.SIGHUP, agent.reload_soon, "SIGHUP")
    notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={status_line(agent)}")
    reporter = asyncio.create_task(report_status(agent))
    log.info("iapd ready on %s (%d profiles, config %s, store %s)", path, len(config.profiles), config_path, store.path)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        notify("STOPPING=1")
        reporter.cancel()
        await agent.close_proxies()
        await agent.cache.stop()
        await agent.accounts.close()  # a rotation already at the issuer is finished and stored
        await agent.logins.close()
        await runner.cleanup()
        await session.close()
        if inode is not None:
            remove_socket_if_ours(path, inode)
    return 0


def status_line(agent: Agent) -> str:
    """What `systemctl --user status iapd` shows, e.g. "2 profiles ready, 1 login required"."""
    counts: dict[str, int] = {}
    for profile in agent.status()["profiles"]:
        counts[profile["state"].replace("_", " ")] = counts.get(profile["state"].replace("_", " "), 0) + 1
    if not counts:
        return f"no profiles in {agent.config_path}"
    return ", ".join(f"{n} profile{'s' if n > 1 else ''} {state}" if i == 0 else f"{n} {state}"
                     for i, (state, n) in enumerate(sorted(counts.items())))


async def report_status(agent: Agent, every: float = 5.0) -> None:
    last = None
    while True:
        await asyncio.sleep(every)
        line = status_line(agent)
        if line != last:
            notify(f"STATUS={line}")
            last = line
