"""`iapctl service install | uninstall | status`: start iapd at login, the platform's way.

Linux: systemd user units with socket activation (systemd owns the socket from login on and
starts iapd on the first connection). macOS: a LaunchAgent; iapd binds its own socket. The unit
files are templates shipped in this package (also linked from systemd/ and launchd/ in the
repository), rendered with the absolute path of the `iapd` installed beside this `iapctl`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from iapctl import paths
from iapctl.cli import ERROR, OK, USAGE, Failure

UNITS = Path(__file__).with_name("units")
LABEL = "dev.iapd.agent"


@dataclass
class Plan:
    files: dict[Path, str]
    commands: list[list[str]]
    remove: list[Path]


def iapd_executable() -> str:
    """The `iapd` of this installation (pipx, venv or system), as an absolute path."""
    here = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else None
    for folder in filter(None, [here, Path(sys.executable).parent]):
        candidate = folder / "iapd"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("iapd")
    if found is None:
        raise Failure("cannot find the `iapd` executable of this installation", ERROR)
    return os.path.abspath(found)


def render(name: str, values: dict[str, str]) -> str:
    """Fill `@KEY@` placeholders; a line that is only an empty placeholder disappears."""
    lines = []
    for line in (UNITS / name).read_text().splitlines(keepends=True):
        for key, value in values.items():
            if line.strip() == f"@{key}@" and not value:
                line = ""
            line = line.replace(f"@{key}@", value)
        lines.append(line)
    return "".join(lines)


def render_plist(name: str, values: dict[str, str]) -> str:
    """The launchd template, its `@KEY@` strings replaced in the parsed plist and written back by
    plistlib: XML escaping is plistlib's (a path with `&` or `<` stays a path)."""
    import plistlib

    def fill(node):
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if isinstance(node, str) and node.startswith("@") and node.endswith("@"):
            return values[node.strip("@")]
        return node

    return plistlib.dumps(fill(plistlib.loads((UNITS / name).read_bytes()))).decode()


def _printable_in_unit(value: str) -> str:
    """`value`, which goes into a unit file: a control character there (a newline would start a
    directive of its own, `ExecStartPre=`) has no safe spelling, so it is refused."""
    if not value.isprintable():
        raise Failure(f"cannot write a systemd unit for {value!r}: it has a control character", USAGE)
    return value


def systemd_specifiers(value: str) -> str:
    """systemd expands `%x` specifiers in unit settings: a literal `%` (in a path) is `%%`."""
    return value.replace("%", "%%")


def systemd_quote(value: str, command: bool = False) -> str:
    """One word of a unit file, quoted by systemd's rules: specifiers (%) doubled, backslashes
    and quotes escaped, and in a command line `$` doubled (systemd expands $VAR there). A
    control character — a newline would start a directive of its own (`ExecStartPre=`) — has
    no safe spelling: refused."""
    quoted = systemd_specifiers(_printable_in_unit(value)).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + (quoted.replace("$", "$$") if command else quoted) + '"'


def systemd_listen_path() -> str:
    """Where the socket unit listens: where iapctl looks (paths.socket_path). The default
    runtime location is written as systemd's own `%t`, anything else literally."""
    chosen = paths.socket_path()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and chosen == os.path.join(runtime, "iapd", "iapd.sock"):
        return "%t/iapd/iapd.sock"
    return systemd_specifiers(_printable_in_unit(chosen))  # ListenStream= takes the rest of the line


def _systemd_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "systemd" / "user"


def systemd_plan(action: str) -> Plan:
    folder = _systemd_dir()
    socket_unit, service_unit = folder / "iapd.socket", folder / "iapd.service"
    if action == "install":
        # The config location is baked in if the user has moved it; the socket is systemd's (%t).
        env_lines = [f"Environment={systemd_quote(f'{k}={os.environ[k]}')}" for k in ("IAPD_CONFIG",) if os.environ.get(k)]
        values = {"IAPD": systemd_quote(iapd_executable(), command=True), "STATE_DIR": systemd_quote(paths.state_dir()),
                  "ENVIRONMENT": "\n".join(env_lines), "LISTEN": systemd_listen_path()}
        files = {socket_unit: render("iapd.socket", values), service_unit: render("iapd.service", values)}
        return Plan(files, [["systemctl", "--user", "daemon-reload"],
                            ["systemctl", "--user", "enable", "--now", "iapd.socket"]], [])
    if action == "uninstall":
        return Plan({}, [["systemctl", "--user", "disable", "--now", "iapd.socket", "iapd.service"],
                         ["systemctl", "--user", "daemon-reload"]], [socket_unit, service_unit])
    return Plan({}, [["systemctl", "--user", "status", "--no-pager", "iapd.socket", "iapd.service"]], [])


def launchd_plan(action: str) -> Plan:
    home = Path(os.path.expanduser("~"))
    plist = home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    domain = f"gui/{os.getuid()}"
    if action == "install":
        values = {"IAPD": iapd_executable(), "SOCKET": paths.socket_path(), "CONFIG": paths.config_path(),
                  "LOG": str(home / "Library" / "Logs" / "iapd.log")}
        return Plan({plist: render_plist(f"{LABEL}.plist", values)}, [["launchctl", "bootstrap", domain, str(plist)]],
                    [])
    if action == "uninstall":
        return Plan({}, [["launchctl", "bootout", f"{domain}/{LABEL}"]], [plist])
    return Plan({}, [["launchctl", "print", f"{domain}/{LABEL}"]], [])


def plan_for(action: str, platform: str = sys.platform) -> Plan:
    if platform == "darwin":
        return launchd_plan(action)
    if platform.startswith("linux"):
        return systemd_plan(action)
    raise Failure(f"no login service for {platform}: run `iapd serve` from your session's start-up instead", USAGE)


def _stop_unmanaged_daemon() -> None:
    """A daemon started by autostart holds the socket path; the service takes over from it."""
    from iapctl.cli import call

    try:
        resp = call("GET", "/v1/status", autostart=False, timeout=2)
        pid = resp.json()["daemon"]["pid"]
    except (Failure, OSError, ValueError, KeyError):
        return
    if pid != os.getpid():
        os.kill(pid, 15)
        print(f"stopped the iapd started earlier by iapctl (pid {pid}); the service takes over")


def manager_unreachable(platform: str = sys.platform) -> str | None:
    """Why the service manager cannot take units here, in a few words, or None if it can."""
    if platform.startswith("linux"):
        command = ["systemctl", "--user", "show-environment"]
    elif platform == "darwin":
        command = ["launchctl", "print", f"gui/{os.getuid()}"]
    else:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except FileNotFoundError:
        return f"`{command[0]}` is not available here"
    except subprocess.TimeoutExpired:
        return f"`{shlex.join(command)}` did not answer"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[0]
        return f"the service manager is not reachable (`{shlex.join(command)}`: {why})"
    return None


def preflight(platform: str = sys.platform) -> None:
    """Check that the service manager can take the units, before anything is touched: without a
    systemd user manager (containers, WSL, some SSH sessions) `enable` fails half-way, and units
    that can never start would be left behind."""
    why = manager_unreachable(platform)
    if why is not None:
        raise Failure(f"{why}; nothing was installed. iapctl starts iapd by itself when needed (autostart), "
                      "which needs no service", ERROR)


def _install(plan: Plan) -> None:
    """Write the files and run the commands; if any step fails, put back what was there."""
    before = {path: path.read_text() if path.exists() else None for path in plan.files}
    try:
        for path, text in plan.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        for command in plan.commands:
            print("running: " + shlex.join(command))
            done = subprocess.run(command)
            if done.returncode != 0:
                raise Failure(f"`{shlex.join(command)}` failed (exit status {done.returncode}); "
                              "the previous state was restored", ERROR)
    except BaseException:
        for path, text in before.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)
        if sys.platform.startswith("linux"):
            subprocess.run(["systemctl", "--user", "daemon-reload"], capture_output=True)
        raise


def check_reachable() -> None:
    """The unit runs with PrivateTmp=yes: a config or state under /tmp would be another /tmp
    there, and the service would start without its profiles or logins. Refuse, saying so."""
    for what, where in (("config", paths.config_path()), ("state directory", paths.state_dir())):
        real = os.path.realpath(where)
        if real == "/tmp" or real.startswith(("/tmp/", "/var/tmp/")):
            raise Failure(f"the service cannot reach its {what} {where}: the unit has a private /tmp "
                          "(PrivateTmp=yes); move it under your home directory first", USAGE)


def run_service(action: str, dry_run: bool) -> int:
    plan = plan_for(action)
    if action == "install" and sys.platform.startswith("linux") and dry_run:
        check_reachable()
    if dry_run:
        for path, text in plan.files.items():
            print(f"# would write {path}\n{text}")
        for path in plan.remove:
            print(f"# would remove {path}")
        for command in plan.commands:
            print("# would run: " + shlex.join(command))
        return OK
    if action == "status":
        for path in plan_for("uninstall").remove:
            print(f"{path}: {'installed' if path.exists() else 'not installed'}")
    why = manager_unreachable() if action in ("status", "uninstall") else None
    if why is not None:
        # No service manager to ask (or to tell): say so in one line, not in systemctl's
        # words; an uninstall still removes the files, which is all there is to undo.
        if action == "status":
            print("no service manager here; iapctl starts iapd by itself when needed")
            return OK
        for path in plan.remove:
            if path.exists():
                path.unlink()
                print(f"removed {path}")
        print("no service manager here, so there was nothing to stop or disable")
        return OK
    if action == "install":
        preflight()
        if sys.platform.startswith("linux"):
            check_reachable()
        _stop_unmanaged_daemon()
        # The sandbox makes the home read-only but for this directory, which must exist.
        os.makedirs(paths.state_dir(), mode=0o700, exist_ok=True)
        _install(plan)
        return OK
    for path, text in plan.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    status = OK
    for command in plan.commands:
        if action != "status":
            print("running: " + shlex.join(command))
        try:
            done = subprocess.run(command)
        except FileNotFoundError:
            raise Failure(f"`{command[0]}` is not available on this machine", ERROR) from None
        if done.returncode != 0 and action != "status":
            status = ERROR
        elif done.returncode != 0:
            status = done.returncode
    for path in plan.remove:
        if path.exists():
            path.unlink()
            print(f"removed {path}")
    return status
