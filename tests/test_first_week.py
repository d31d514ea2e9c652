"""What a new user still tripped on in the first week (each of these failed before): exit codes
that disagree, a healthy autostart set-up called broken, doctor looking at another config than
the daemon's, service commands without a user manager, a clipped error, `-V`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from test_client import failed, iapctl
from test_service_accounts import SOURCES, profiles

IAPD = shutil.which("iapd", path=os.path.dirname(sys.executable))


@pytest.fixture
def env(daemon, tmp_path) -> dict:
    return {**daemon.env, "XDG_STATE_HOME": str(tmp_path / "client-state"), "IAPD_AUTOSTART": "0",
            "IAPD_AUTO_LOGIN": "0", "DISPLAY": ""}


def test_one_exit_code_per_cause_whichever_command(env, daemon_factory, emulator, tmp_path):
    failed(iapctl("token", "nosuch", env=env), 5, "no profile named 'nosuch'")
    failed(iapctl("token", "demo-user", env=env), 4, "run `iapctl login demo-user`")  # nobody logged in yet
    failed(iapctl("login", "nosuch", env=env), 5, "no profile named 'nosuch'")  # was 4
    failed(iapctl("login", "demo-sa", env=env), 5, "nothing to log in to")  # was 4
    sa = daemon_factory(config=profiles(emulator, tmp_path, SOURCES), name="sa")
    sa_env = {**env, "IAPD_SOCKET": sa.socket, "IAPD_CONFIG": str(sa.config)}
    # The README's CI section said 6 for this; the table says 5 (a profile that cannot work as
    # configured), and now both do — with the profile named.
    failed(iapctl("token", "key-missing", env=sa_env), 5, "profile key-missing", "/nonexistent/key.json")


def test_with_no_daemon_a_healthy_autostart_set_up_is_not_called_broken(emulator, tmp_path):
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("IAPD_AUTOSTART", None)
    status = iapctl("status", env=env)
    assert status.returncode == 3 and "starts by itself on the first `iapctl token`" in status.stdout, status
    assert "service install" not in status.stdout
    doctor = iapctl("doctor", env=env)
    assert "not running; it starts by itself" in doctor.stdout and "PROBLEM  daemon" not in doctor.stdout, doctor.stdout
    off = iapctl("doctor", env={**env, "IAPD_AUTOSTART": "0"})
    assert "PROBLEM  daemon" in off.stdout and off.returncode == 1  # with autostart off it is one


def test_doctor_says_when_the_daemon_serves_another_config(daemon, env, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text(daemon.config.read_text())
    out = iapctl("doctor", env={**env, "IAPD_CONFIG": str(mine)})
    assert out.returncode == 1 and f"the daemon on this socket serves {daemon.config}" in out.stdout, out.stdout
    assert "All good" not in out.stdout


@pytest.mark.parametrize("action", ["status", "uninstall"])
def test_service_commands_without_a_user_manager_say_so_in_one_line(tmp_path, action):
    if subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True).returncode == 0:
        pytest.skip("a systemd user manager runs here")
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    out = iapctl("service", action, env=env)
    assert out.returncode == 0 and "no service manager here" in out.stdout, out
    assert "Failed to connect" not in out.stdout + out.stderr  # systemctl's own words stay out


def test_status_clips_a_long_error_at_a_word(daemon, env, emulator):
    from iapctl.status_text import clipped as _clipped

    text = "the token endpoint returned an answer that nobody could possibly have expected to see here today"
    clipped = _clipped(text, 70)
    assert len(clipped) <= 70 and clipped.endswith("…") and text.startswith(clipped[:-1])
    assert text[len(clipped) - 1] == " "  # cut between words


def test_dash_v_prints_the_version(tmp_path):
    for command in ([shutil.which("iapctl", path=os.path.dirname(sys.executable))], [IAPD]):
        out = subprocess.run([*command, "-V"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and out.stdout.split()[1] == "0.1.0", out
