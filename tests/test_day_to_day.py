"""Living with iapd after the first day: config edits, one socket truth, stop and restart, a safe
`service install`, small rough edges — each tested through the real commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import wait_for
from test_client import IAPCTL, failed, iapctl

IAP = "123456789012-iap.apps.googleusercontent.com"


def key_file_profile(emulator, name: str) -> str:
    key = emulator.config_path.parent / "emulator-sa-key.json"
    return f'\n[profiles.{name}]\naudience = "{IAP}"\n[profiles.{name}.service_account]\nkind = "key_file"\nkey_file = "{key}"\n'


@pytest.fixture
def env(daemon, tmp_path) -> dict:
    return {**daemon.env, "XDG_STATE_HOME": str(tmp_path / "client-state"), "IAPD_AUTOSTART": "0",
            "IAPD_AUTO_LOGIN": "0", "DISPLAY": ""}


def test_a_profile_added_while_the_daemon_runs_is_served_at_once(daemon, env, emulator):
    with open(daemon.config, "a") as fh:
        fh.write(key_file_profile(emulator, "new"))
    out = iapctl("token", "new", env=env)
    assert out.returncode == 0 and out.stdout.startswith("eyJ"), out.stderr
    assert "reloaded the config (the config file changed)" in daemon.logs()


def test_a_broken_edit_keeps_the_old_config_serving_and_unchanged_profiles_keep_their_tokens(daemon, env, emulator):
    assert daemon.login()["state"] == "done"
    daemon.token("demo-user")
    good = daemon.config.read_text()
    daemon.config.write_text(good + "\n[profiles.oops\n")
    out = iapctl("reload", env=env)
    line = failed(out, 5, "not valid TOML", str(daemon.config), "previous config keeps serving")
    assert iapctl("token", "demo-user", env=env).returncode == 0  # the old config serves
    assert daemon.status()["daemon"]["config_error"] in line
    assert "note: the config was changed but cannot be used" in iapctl("status", env=env).stdout
    daemon.config.write_text(good + key_file_profile(emulator, "extra"))
    daemon.proc.send_signal(signal.SIGHUP)  # what `systemctl --user reload iapd` sends
    wait_for(lambda: "extra" in {p["name"] for p in daemon.status()["profiles"]}, what="the reload")
    status = daemon.profile_status("demo-user")
    assert daemon.status()["daemon"]["config_error"] is None
    assert status["refresh_count"] == 1 and status["state"] == "ready"  # its token and login survived
    assert emulator.counters()[f"refresh:{IAP}"] == 1  # no new ID token was needed


def test_the_socket_set_only_in_the_config_is_found_by_iapctl_and_by_autostart(emulator, tmp_path):
    wanted = tmp_path / "sock" / "iapd.sock"
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nsocket = "{wanted}"\nstate_dir = "{tmp_path / "state"}"\n'
                      + emulator.config_path.read_text())
    env = {k: v for k, v in os.environ.items() if k != "IAPD_SOCKET"}
    env.update(IAPD_CONFIG=str(config), IAPD_AUTO_LOGIN="0", XDG_STATE_HOME=str(tmp_path / "client-state"))
    env.pop("IAPD_AUTOSTART", None)
    try:
        out = iapctl("token", "demo-sa", env=env)  # autostarts the daemon
        assert out.returncode == 0, out.stderr
        status = json.loads(iapctl("status", "--json", env=env).stdout)
        assert status["socket"] == str(wanted) and wanted.is_socket()
        assert f"on {wanted}" in iapctl("status", env=env).stdout
    finally:
        iapctl("stop", env=env)


def test_stop_and_restart_an_autostarted_daemon(emulator, tmp_path):
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "IAPD_AUTO_LOGIN": "0"}
    env.pop("IAPD_AUTOSTART", None)
    assert iapctl("token", "demo-sa", env=env).returncode == 0
    first = json.loads(iapctl("status", "--json", env=env).stdout)["daemon"]["pid"]
    out = iapctl("restart", env=env)
    assert out.returncode == 0 and out.stdout.startswith("Restarted iapd (pid "), out.stderr
    second = json.loads(iapctl("status", "--json", env=env).stdout)["daemon"]["pid"]
    assert second != first
    out = iapctl("stop", env=env)
    assert out.returncode == 0 and out.stdout == f"Stopped iapd (pid {second}).\n", out.stderr
    assert iapctl("status", env=env).returncode == 3
    assert iapctl("stop", env=env).stdout.startswith("iapd is not running")


@pytest.mark.skipif(subprocess.run(["sh", "-c", "systemctl --user show-environment"], capture_output=True).returncode == 0,
                    reason="this machine has a systemd user manager")
def test_service_install_without_a_user_manager_changes_nothing_and_says_why(emulator, tmp_path):
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "IAPD_AUTO_LOGIN": "0"}
    env.pop("IAPD_AUTOSTART", None)
    try:
        assert iapctl("token", "demo-sa", env=env).returncode == 0  # an autostarted daemon is running
        pid = json.loads(iapctl("status", "--json", env=env).stdout)["daemon"]["pid"]
        out = iapctl("service", "install", env=env)
        assert out.returncode == 1 and out.stdout == ""
        assert len(out.stderr.splitlines()) == 1 and "nothing was installed" in out.stderr, out.stderr
        assert not (tmp_path / "cfg" / "systemd").exists()  # no unit written
        assert json.loads(iapctl("status", "--json", env=env).stdout)["daemon"]["pid"] == pid  # not stopped
    finally:
        iapctl("stop", env=env)


def test_a_missing_config_file_is_named_as_missing(tmp_path):
    env = {**os.environ, "IAPD_CONFIG": str(tmp_path / "nowhere" / "config.toml"),
           "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "IAPD_AUTO_LOGIN": "0"}
    env.pop("IAPD_AUTOSTART", None)
    try:
        failed(iapctl("token", "flyte", env=env), 5, f"the config file {tmp_path}/nowhere/config.toml does not exist")
    finally:
        iapctl("stop", env=env)


def test_an_over_long_socket_path_is_one_clear_line(tmp_path, emulator):
    long_dir = tmp_path / ("d" * 100)
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "IAPD_SOCKET": str(long_dir / "iapd.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "IAPD_AUTO_LOGIN": "0"}
    env.pop("IAPD_AUTOSTART", None)
    line = failed(iapctl("token", "demo-sa", env=env), 3, "unix socket path may have at most 107")
    log = (tmp_path / "state" / "iapd" / "iapd.log").read_text()
    assert "Traceback" not in log and "Traceback" not in line


def test_status_into_a_pipe_that_closes_early(daemon, env):
    out = subprocess.run(["sh", "-c", f"'{IAPCTL}' status | head -1"], env=env, capture_output=True, text=True, timeout=30)
    assert out.stdout.startswith("iapd ") and out.stderr == "", out.stderr


def test_help_lists_every_variable_and_the_new_commands(env):
    out = iapctl("--help", env=env).stdout
    for word in ("IAPCTL_TIMEOUT", "IAPD_SOCKET", "IAPD_CONFIG", "BROWSER", "reload", "stop", "restart"):
        assert word in out, word


def test_iapctl_and_iapd_versions_agree(env):
    iapd = Path(IAPCTL).with_name("iapd")
    assert iapctl("--version", env=env).stdout.split()[1] == \
        subprocess.run([str(iapd), "--version"], capture_output=True, text=True).stdout.split()[1]


def test_doctor_says_what_is_well_and_what_to_fix(daemon, env, emulator):
    from test_iap_browser import COOKIE_BROWSER

    daemon.login()
    daemon.token("demo-user")
    for profile in ("demo-oidc", "demo-flyte"):  # the emulator's OpenID Connect profiles, logged in too
        assert iapctl("login", profile, env={**env, "BROWSER": COOKIE_BROWSER}).returncode == 0
    out = iapctl("doctor", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for line in ("ok       config: ", "ok       socket: ", "ok       daemon: iapd ", "ok       clock: within ",
                 "ok       profile demo-user: ready, demo@example.com", "ok       profile demo-sa: idle"):
        assert line in out.stdout, (line, out.stdout)
    assert out.stdout.endswith("All good.\n")
    emulator.settings(clock_offset=600)  # Google's clock and ours now disagree by ten minutes
    daemon.request("POST", "/v1/logout/demo-user")
    out = iapctl("doctor", env=env)
    assert out.returncode == 1
    assert "PROBLEM  clock: this machine's clock is 600s behind" in out.stdout or \
        "PROBLEM  clock: this machine's clock is 599s behind" in out.stdout, out.stdout
    assert "PROBLEM  profile demo-user: login_required: " in out.stdout and "`iapctl login demo-user`" in out.stdout
    assert out.stdout.endswith("2 problem(s).\n")
