"""Starting iapd when nothing answers: the first `pyflyte` call after a reboot just works.

Rules: never when a service manager owns the socket (then say how to start that instead);
never when switched off (`IAPD_AUTOSTART=0` or `[client] autostart = false`); one daemon however
many clients start at once (a lock file — the first starts it, the rest wait and then find it).
We learn the daemon is ready from its own READY=1 on a notify socket, as systemd would.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time

from iapctl import paths
from iapctl.cli import BAD_PROFILE, UNREACHABLE, Failure, request_timeout

START_TIMEOUT = 15.0
SYSTEMD_SOCKET_UNIT = "iapd.socket"
LAUNCHD_LABEL = "dev.iapd.agent"


def systemd_user_manager_reachable() -> bool:
    """Is there a systemd user manager to own the socket? Its private socket answers. (Not in
    containers, WSL, or SSH sessions without a user session: there units cannot start.)"""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isabs(runtime):
        return False
    return _answers(os.path.join(runtime, "systemd", "private"))


def service_manager_unit() -> str | None:
    """The installed login service that owns the socket, if any (then we must not start our own).
    A unit installed where no service manager can run it does not count: we autostart instead."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    unit = os.path.join(config_home, "systemd", "user", SYSTEMD_SOCKET_UNIT)
    if sys.platform.startswith("linux") and os.path.exists(unit) and systemd_user_manager_reachable():
        return (f"the systemd user unit {SYSTEMD_SOCKET_UNIT} is installed but not listening: run `systemctl --user "
                f"restart {SYSTEMD_SOCKET_UNIT}` (see `systemctl --user status iapd`), or `iapctl service uninstall`")
    plist = os.path.join(os.path.expanduser("~"), "Library", "LaunchAgents", f"{LAUNCHD_LABEL}.plist")
    if sys.platform == "darwin" and os.path.exists(plist):
        return f"the launchd agent {LAUNCHD_LABEL} is installed: run `launchctl kickstart gui/{os.getuid()}/{LAUNCHD_LABEL}`"
    return None


def when_not_running() -> str | None:
    """What to do about a daemon that is not running: None when nothing need be done (autostart
    starts it on the first `iapctl token`), else how to start it."""
    manager = service_manager_unit()
    if manager is not None:
        return manager
    return None if autostart_enabled() else "start it with `iapd serve` (autostart is off)"


def autostart_enabled() -> bool:
    env = os.environ.get("IAPD_AUTOSTART")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    try:
        import tomllib

        with open(paths.config_path(), "rb") as fh:
            client = tomllib.load(fh).get("client", {})
        return bool(client.get("autostart", True)) if isinstance(client, dict) else True
    except (OSError, ValueError):
        return True  # a missing or broken config: the daemon will say what is wrong with it


def _answers(socket_path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def ensure_daemon(socket_path: str, why: str) -> None:
    """Return once a daemon answers on `socket_path`, or raise Failure saying what to do."""
    manager = service_manager_unit()
    if manager is not None:
        raise Failure(f"iapd is not running on {socket_path} ({why}); {manager}", UNREACHABLE)
    if not autostart_enabled():
        raise Failure(f"iapd is not running on {socket_path} ({why}): start it with `iapd serve` "
                      "(autostart is off)", UNREACHABLE)
    deadline = time.monotonic() + request_timeout()
    state = paths.state_dir()
    try:
        paths.ensure_private_dir(state)
    except paths.UnsafePath as exc:
        raise Failure(f"cannot start iapd: unsafe state directory: {exc}", UNREACHABLE) from None
    lock = _open_private(os.path.join(state, "autostart.lock"))
    try:
        _lock(lock, deadline)  # released when the file closes, even if we crash
        if _answers(socket_path):
            return  # another client started it while we waited for the lock
        _start(socket_path, os.path.join(state, "iapd.log"), deadline)
    finally:
        os.close(lock)


def _open_private(path: str) -> int:
    """Open (or create, 0600) a file of ours for appending, never through a symlink: a link
    planted in the state directory must not make us chmod or write another file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise Failure(f"cannot start iapd: cannot open {path}: {exc.strerror}", UNREACHABLE) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        os.close(fd)
        raise Failure(f"cannot start iapd: {path} is not a regular file of yours; remove it", UNREACHABLE)
    os.fchmod(fd, 0o600)
    return fd


def _lock(fd: int, deadline: float) -> None:
    """The autostart lock, waited for no longer than the client's own deadline: whoever holds
    it (a client starting the daemon, or a stuck process) must not hang `iapctl token`."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Failure("another iapctl has been starting iapd for too long (the autostart lock is held); "
                              "try again, or start it with `iapd serve`", UNREACHABLE) from None
            time.sleep(0.02)


# What the daemon is given of its starter's environment, by name. It outlives the command that
# started it, so one `HTTPS_PROXY=… iapctl token` (or a PYTHONPATH, an SSL_CERT_FILE, another
# GOOGLE_APPLICATION_CREDENTIALS) must not become every later refresh's: network settings
# and credential files come from the config's `[daemon] environment`, for autostart and units alike.
PASSED_TO_DAEMON = ("HOME", "USER", "LOGNAME", "PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "XDG_CONFIG_HOME",
                    "XDG_STATE_HOME", "XDG_RUNTIME_DIR", "XDG_CACHE_HOME", "XDG_DATA_HOME", "IAPD_CONFIG",
                    # the session bus, where the Secret Service is (`store = "keyring"`)
                    "DBUS_SESSION_BUS_ADDRESS")


def _daemon_env(socket_path: str, notify_path: str) -> dict[str, str]:
    """The daemon's environment: only what it needs, every path it reads made absolute (it
    runs in the home directory, not in the caller's, possibly untrusted, working directory)."""
    env = {name: value for name, value in os.environ.items()
           if name in PASSED_TO_DAEMON or name.startswith("LC_")}
    env.update(NOTIFY_SOCKET=notify_path, IAPD_SOCKET=os.path.abspath(socket_path))
    if env.get("IAPD_CONFIG"):
        env["IAPD_CONFIG"] = os.path.abspath(env["IAPD_CONFIG"])
    return env


def _start(socket_path: str, log_path: str, deadline: float) -> None:
    with tempfile.TemporaryDirectory(prefix="iapctl-") as tmp:
        notify_path = os.path.join(tmp, "notify")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(notify_path)
        listener.settimeout(0.2)
        log = _open_private(log_path)
        try:
            offset = os.lseek(log, 0, os.SEEK_END)
            # -P: `python -m` would otherwise put the working directory first on sys.path, and a
            # `json.py` in an untrusted checkout would run inside the daemon. A new session: the
            # daemon outlives this command and the terminal it ran in.
            proc = subprocess.Popen([sys.executable, "-P", "-m", "iapd", "serve"],
                                    env=_daemon_env(socket_path, notify_path), cwd=os.path.expanduser("~"),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                    close_fds=True)
        finally:
            os.close(log)
        limit = min(deadline, time.monotonic() + START_TIMEOUT)
        try:
            while time.monotonic() < limit:
                try:
                    if b"READY=1" in listener.recv(4096):
                        return
                except TimeoutError:
                    pass
                if proc.poll() is not None:
                    raise _start_failure(proc.returncode, log_path, offset)
        finally:
            listener.close()
        raise Failure(f"started iapd but it did not become ready in time; see {log_path}", UNREACHABLE)


def _start_failure(returncode: int, log_path: str, offset: int) -> Failure:
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else f"exit status {returncode}"
    if returncode == 2:  # the daemon's code for a config it cannot use
        return Failure(last.removeprefix("iapd: "), BAD_PROFILE)
    return Failure(f"could not start iapd: {last} (log: {log_path})", UNREACHABLE)
