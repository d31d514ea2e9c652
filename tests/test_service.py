"""Start at login: rendered units, socket activation, sd_notify, the launchd plist."""

from __future__ import annotations

import os
import plistlib
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from iapd.jwt import unverified_claims

IAPCTL = shutil.which("iapctl", path=os.path.dirname(sys.executable))
IAPD = shutil.which("iapd", path=os.path.dirname(sys.executable))


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_path(outside_tmp):
    """This module's folders are outside /tmp: the unit runs with a private /tmp, and `service
    install` rightly refuses a config or state dir there (which pytest's own tmp_path is in)."""
    return outside_tmp


def dry_run(env: dict, action: str = "install") -> str:
    out = subprocess.run([IAPCTL, "service", action, "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def rendered_units(tmp_path) -> dict[str, str]:
    from iapctl.service import systemd_plan

    return {path.name: text for path, text in systemd_plan("install").files.items()}


def test_install_dry_run_linux(tmp_path, monkeypatch):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "IAPD_CONFIG": str(tmp_path / "my config.toml")}
    out = dry_run(env)
    unit_dir = tmp_path / "cfg" / "systemd" / "user"
    assert f"# would write {unit_dir}/iapd.socket" in out and f"# would write {unit_dir}/iapd.service" in out
    assert f'ExecStart="{IAPD}" serve' in out
    assert f'Environment="IAPD_CONFIG={tmp_path}/my config.toml"' in out
    assert "ListenStream=%t/iapd/iapd.sock" in out and "SocketMode=0600" in out and "DirectoryMode=0700" in out
    assert "# would run: systemctl --user enable --now iapd.socket" in out
    assert "@" not in out.replace("%t", "")  # every placeholder filled
    assert not unit_dir.exists()  # a dry run writes nothing
    removal = dry_run(env, "uninstall")
    assert f"# would remove {unit_dir}/iapd.service" in removal and "disable --now iapd.socket" in removal


def test_install_refuses_a_config_the_services_private_tmp_would_hide(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "IAPD_CONFIG": "/tmp/emu/config.toml"}
    out = subprocess.run([IAPCTL, "service", "install", "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "cannot reach its config /tmp/emu/config.toml" in out.stderr, out


def test_the_launchd_plist_is_written_by_plistlib(tmp_path, monkeypatch):
    from iapctl.service import plan_for

    home = tmp_path / "R&D <home>"
    monkeypatch.setenv("HOME", str(home))
    ((_, text),) = plan_for("install", platform="darwin").files.items()
    assert plistlib.loads(text.encode())["StandardErrorPath"] == str(home / "Library" / "Logs" / "iapd.log")


def test_install_refuses_a_path_that_would_add_directives(tmp_path):
    """A newline in IAPD_CONFIG would write `ExecStartPre=…` into the unit."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "IAPD_CONFIG": f"{tmp_path}/c.toml\nExecStartPre=/bin/touch {tmp_path}/owned"}
    out = subprocess.run([IAPCTL, "service", "install", "--dry-run"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "control character" in out.stderr and "ExecStartPre" not in out.stdout, out


def test_paths_with_spaces_and_specials_are_quoted_in_the_unit(tmp_path, monkeypatch):
    state = tmp_path / "my state $HOME %h"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    service = rendered_units(tmp_path)["iapd.service"]
    assert f'ReadWritePaths="{str(state).replace("%", "%%")}/iapd"' in service
    if shutil.which("systemd-analyze") is not None:
        (tmp_path / "iapd.service").write_text(service)
        (tmp_path / "iapd.socket").write_text(rendered_units(tmp_path)["iapd.socket"])
        out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "iapd.socket"), str(tmp_path / "iapd.service")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_rendered_units_pass_systemd_analyze_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    for name, text in rendered_units(tmp_path).items():
        (tmp_path / name).write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "iapd.socket"), str(tmp_path / "iapd.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    # The check can fail: a typo in a key is reported.
    broken = (tmp_path / "iapd.service").read_text().replace("RestartSec=", "RestartSecs=")
    (tmp_path / "iapd.service").write_text(broken)
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "iapd.service")], capture_output=True, text=True,
                         timeout=60)
    assert "Unknown key" in out.stderr


def test_launchd_plist(tmp_path, monkeypatch):
    from iapctl.service import plan_for

    monkeypatch.setenv("HOME", str(tmp_path))
    plan = plan_for("install", platform="darwin")
    ((path, text),) = plan.files.items()
    assert path == tmp_path / "Library" / "LaunchAgents" / "dev.iapd.agent.plist"
    plist = plistlib.loads(text.encode())
    assert plist["Label"] == "dev.iapd.agent"
    assert plist["ProgramArguments"] == [IAPD, "serve"] and os.path.isabs(plist["ProgramArguments"][0])
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardErrorPath"] == str(tmp_path / "Library" / "Logs" / "iapd.log")
    assert set(plist["EnvironmentVariables"]) == {"IAPD_SOCKET", "IAPD_CONFIG"}
    assert plan.commands == [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)]]


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate is not installed")
def test_socket_activation_starts_the_daemon_on_first_token(emulator, tmp_path):
    sock = tmp_path / "run" / "iapd.sock"
    sock.parent.mkdir(mode=0o700)
    env = {"IAPD_CONFIG": str(emulator.config_path), "XDG_STATE_HOME": str(tmp_path / "state"), "HOME": str(tmp_path)}
    # systemd-socket-activate passes only the variables named with -E, as systemd does.
    activator = subprocess.Popen(["systemd-socket-activate", "-l", str(sock),
                                  *[f"-E{k}={v}" for k, v in env.items()], IAPD, "serve"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "Listening on" in activator.stdout.readline()  # systemd's socket is up; no iapd yet
        client_env = {**os.environ, **env, "IAPD_SOCKET": str(sock), "IAPD_AUTOSTART": "0"}
        out = subprocess.run([IAPCTL, "token", "demo-sa"], env=client_env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert unverified_claims(out.stdout.strip())["email"].startswith("demo-ci@")
        status = subprocess.run([IAPCTL, "status", "--json"], env=client_env, capture_output=True, text=True, timeout=30)
        import json

        daemon = json.loads(status.stdout)["daemon"]
        assert daemon["pid"] == activator.pid  # it exec'd into iapd, on the socket systemd made
        assert daemon["socket"] == str(sock)
    finally:
        activator.terminate()
        activator.wait(timeout=10)
    assert sock.exists()  # the service manager's socket: iapd leaves it to its owner


def test_notify_socket_gets_ready_status_and_stopping(emulator, tmp_path):
    notify_path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(30)
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "IAPD_SOCKET": str(tmp_path / "run" / "s.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "NOTIFY_SOCKET": notify_path}
    proc = subprocess.Popen([IAPD, "serve"], env=env, stderr=subprocess.DEVNULL)
    try:
        ready = listener.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready
        # demo-sa and demo-jwt need no login; demo-user, demo-oidc and demo-flyte do
        assert "STATUS=2 profiles idle, 3 login required" in ready
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_repository_units_are_the_shipped_templates():
    root = Path(__file__).resolve().parent.parent
    for link in ["systemd/iapd.socket", "systemd/iapd.service", "launchd/dev.iapd.agent.plist"]:
        assert (root / link).resolve().parent == root / "client" / "iapctl" / "units"
