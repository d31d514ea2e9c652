"""iapctl as a real subprocess against a real daemon (or none), the emulator behind it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from iapd.jwt import unverified_claims

IAPCTL = shutil.which("iapctl", path=os.path.dirname(sys.executable))
IAP = "123456789012-iap.apps.googleusercontent.com"
DESKTOP = "123456789012-desktop.apps.googleusercontent.com"
CURL_BROWSER = "curl -sSL -o /dev/null %s"


def iapctl(*args: str, env: dict, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    # A new session: no controlling terminal, as under flytekit in CI (and so no /dev/tty).
    return subprocess.run([IAPCTL, *args], env=env, capture_output=True, text=True, input=input, timeout=timeout,
                          start_new_session=True)


def failed(out: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The failure contract: nothing on stdout, one line on stderr, the documented code."""
    assert out.stdout == "", out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("iapctl: "), out.stderr
    assert out.returncode == code, (out.returncode, out.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def env(daemon, tmp_path) -> dict:
    """A client environment pointed at a running daemon; autostart and auto-login off."""
    return {**daemon.env, "XDG_STATE_HOME": str(tmp_path / "client-state"), "IAPD_AUTOSTART": "0",
            "IAPD_AUTO_LOGIN": "0", "DISPLAY": ""}


def test_token_prints_the_token_and_a_newline_only(daemon, env, emulator):
    daemon.login()
    out = iapctl("token", "demo-user", env=env)
    assert out.returncode == 0 and out.stderr == ""
    # Exactly the token and one newline: a proxyCommand's caller takes stdout as it is.
    assert re.fullmatch(r"[A-Za-z0-9_.-]+\n", out.stdout), repr(out.stdout[-20:])
    token = out.stdout[:-1]
    assert unverified_claims(token)["aud"] == IAP
    assert requests.get(emulator.url("iap_url"), headers={"Proxy-Authorization": f"Bearer {token}"},
                        timeout=10).status_code == 200


def test_usage_errors(env):
    out = iapctl("token", env=env)
    assert out.returncode == 2 and out.stdout == "" and "iapctl: " in out.stderr
    failed(iapctl("token", "bad/name", env=env), 2, "invalid profile name")
    out = iapctl("frobnicate", env=env)
    assert out.returncode == 2 and out.stdout == ""


def test_unreachable_daemon(tmp_path):
    env = {**os.environ, "IAPD_SOCKET": str(tmp_path / "none.sock"), "IAPD_AUTOSTART": "0",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    failed(iapctl("token", "demo-user", env=env), 3, "iapd is not running", "iapd serve")


def test_login_required_unknown_profile_and_upstream(daemon, env, emulator):
    failed(iapctl("token", "demo-user", env=env), 4, "login required for profile demo-user", "iapctl login demo-user")
    failed(iapctl("token", "nope", env=env), 5, "no profile named 'nope'")
    daemon.login()
    emulator.fault("500", count=20)
    daemon.set_clock(3600)  # the cached token has expired: a refresh is needed, and Google fails
    failed(iapctl("token", "demo-user", env=env), 6, "Google is not answering", "try again")


def test_service_account_key_missing_is_a_config_problem_not_traceback(daemon_factory, emulator, tmp_path, env):
    config = tmp_path / "sa.toml"
    config.write_text(f'[profiles.ci]\naudience = "{IAP}"\n[profiles.ci.service_account]\n'
                      f'kind = "key_file"\nkey_file = "{tmp_path}/missing.json"\n')
    daemon = daemon_factory(config=config, name="sa")
    out = iapctl("token", "ci", env={**env, **{k: daemon.env[k] for k in ("IAPD_SOCKET", "IAPD_CONFIG")}})
    failed(out, 5, "missing.json does not exist")


def test_garbage_and_hanging_servers_are_bounded(tmp_path):
    path = str(tmp_path / "fake.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(8)
    held = []

    def serve(reply: bytes | None):
        conn, _ = server.accept()
        conn.recv(1024)
        if reply is None:
            held.append(conn)  # accept and never answer
        else:
            conn.sendall(reply)
            conn.close()

    env = {**os.environ, "IAPD_SOCKET": path, "IAPD_AUTOSTART": "0", "IAPCTL_TIMEOUT": "1",
           "XDG_STATE_HOME": str(tmp_path / "state")}
    thread = threading.Thread(target=serve, args=(b"SSH-2.0-OpenSSH\r\n",))
    thread.start()
    failed(iapctl("token", "x", env=env), 3, "not HTTP")
    thread.join()
    thread = threading.Thread(target=serve, args=(None,))
    thread.start()
    failed(iapctl("token", "x", env=env, timeout=20), 3, "no answer within 1s")
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_token_path_imports_only_the_standard_library(daemon, env):
    daemon.login()
    probe = ("import sys\nfrom iapctl.cli import main\nrc = main(['token', sys.argv[1]])\n"
             "sys.stdout.flush()\nprint('MODULES', sorted(m.split('.')[0] for m in sys.modules))")
    for profile in ("demo-user", "nope"):  # success, and a failure (which may import json)
        out = subprocess.run([sys.executable, "-c", probe, profile], env=env, capture_output=True, text=True, timeout=30)
        modules = json.loads(out.stdout.split("MODULES ", 1)[1].replace("'", '"'))
        foreign = sorted({m for m in modules if m not in sys.stdlib_module_names and m != "iapctl"}
                         - {"__editable___iapd_0_1_0_finder", "__editable___iapctl_0_1_0_finder", "_distutils_hack", "sitecustomize", "__main__"})
        assert foreign == [], foreign
    # And on success, not even the stdlib's heavier modules: the socket module pulls in enum and
    # selectors, json and http.client more still.
    out = subprocess.run([sys.executable, "-X", "importtime", IAPCTL, "token", "demo-user"], env=env,
                         capture_output=True, text=True, timeout=30)
    names = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    imported = set(names[names.index("site") + 1:])  # what the command imported, not Python's start-up
    assert {"iapctl.cli", "iapctl.wire", "_socket"} <= imported
    assert not imported & {"socket", "json", "http.client", "argparse", "enum", "selectors", "urllib.parse"}


def test_launcher_is_not_the_generic_console_wrapper():
    text = Path(IAPCTL).read_text()
    assert "import re" not in text and "from iapctl.cli import main" in text


def test_concurrent_first_calls_start_one_daemon(emulator, tmp_path):
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("IAPD_AUTOSTART", None)
    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(lambda _: iapctl("token", "demo-sa", env=env), range(20)))
        for out in results:
            assert out.returncode == 0 and out.stdout.count(".") == 2, out.stderr
        assert len({out.stdout for out in results}) == 1
        log = (tmp_path / "state" / "iapd" / "iapd.log").read_text()
        assert log.count("iapd ready on") == 1, log
    finally:
        status = iapctl("status", "--json", env=env)
        if status.returncode == 0:
            os.kill(json.loads(status.stdout)["daemon"]["pid"], 15)


def test_autostart_reports_a_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[profiles.x.user]\nclient_id = 1\n")
    env = {**os.environ, "IAPD_CONFIG": str(config), "IAPD_SOCKET": str(tmp_path / "s" / "iapd.sock"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("IAPD_AUTOSTART", None)
    failed(iapctl("token", "x", env=env), 5, f"config error: {config}: profiles.x.user.client_id")


def test_autostart_stays_away_from_an_installed_systemd_socket(tmp_path, emulator):
    units = tmp_path / "config" / "systemd" / "user"
    units.mkdir(parents=True)
    (units / "iapd.socket").write_text("[Socket]\n")
    runtime = tmp_path / "runtime"
    (runtime / "systemd").mkdir(parents=True, mode=0o700)
    env = {**os.environ, "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"), "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_RUNTIME_DIR": str(runtime),
           "IAPD_CONFIG": str(emulator.config_path)}
    env.pop("IAPD_AUTOSTART", None)
    # A user manager is there (its private socket answers): the unit owns the socket.
    manager = socket.socket(socket.AF_UNIX)
    manager.bind(str(runtime / "systemd" / "private"))
    manager.listen(1)
    try:
        failed(iapctl("token", "demo-sa", env=env), 3, "systemctl --user restart iapd.socket")
    finally:
        manager.close()
    # No user manager (a container, WSL, SSH without a session): the unit can never start, so
    # iapctl starts iapd itself rather than send the person to a dead end.
    try:
        out = iapctl("token", "demo-sa", env=env)
        assert out.returncode == 0 and out.stdout.startswith("eyJ"), out.stderr
    finally:
        status = iapctl("status", "--json", env={**env, "IAPD_AUTOSTART": "0"})
        if status.returncode == 0:
            os.kill(json.loads(status.stdout)["daemon"]["pid"], 15)


class TestLoginWhenNeeded:
    def test_no_browser_without_a_display_or_terminal(self, daemon, env, emulator, tmp_path):
        marker = tmp_path / "browser-opened"
        browser = tmp_path / "browser"
        browser.write_text(f"#!/bin/sh\ntouch {marker}\nexec curl -sSL -o /dev/null \"$1\"\n")
        browser.chmod(0o755)
        quiet = {**env, "IAPD_AUTO_LOGIN": "1", "BROWSER": f"{browser} %s"}  # a $BROWSER, but no display
        failed(iapctl("token", "demo-user", env=quiet), 4, "iapctl login demo-user")
        assert not marker.exists() and emulator.counters().get("auth", 0) == 0

    def test_opens_the_browser_with_a_display_and_serves_the_token(self, daemon, env, emulator):
        seen = {**env, "IAPD_AUTO_LOGIN": "1", "DISPLAY": ":0", "BROWSER": CURL_BROWSER}
        out = iapctl("token", "demo-user", env=seen)
        assert out.returncode == 0, out.stderr
        assert unverified_claims(out.stdout.strip())["email"] == "demo@example.com"
        # No terminal: one line on stderr, who we are logged in as; nothing else (no URL, no noise).
        assert out.stderr == "iapctl: logged in as demo@example.com (profile demo-user)\n"
        assert emulator.counters()["auth"] == 1

    def test_switched_off(self, daemon, env, emulator):
        off = {**env, "IAPD_AUTO_LOGIN": "0", "DISPLAY": ":0", "BROWSER": CURL_BROWSER}
        failed(iapctl("token", "demo-user", env=off), 4)
        assert emulator.counters().get("auth", 0) == 0

    def test_cooldown_after_a_failed_login(self, daemon, env, emulator):
        emulator.settings(approve="deny")
        seen = {**env, "IAPD_AUTO_LOGIN": "1", "DISPLAY": ":0", "BROWSER": CURL_BROWSER}
        failed(iapctl("token", "demo-user", env=seen), 4, "did not complete", "access_denied", "--no-browser")
        failed(iapctl("token", "demo-user", env=seen), 4, "abandoned or failed recently")
        assert emulator.counters()["auth"] == 1  # the second call opened no second browser flow


def test_login_command_with_browser(daemon, env):
    out = iapctl("login", "demo-user", env={**env, "BROWSER": CURL_BROWSER})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Logged in as demo@example.com (profile demo-user).\n"


def test_login_command_without_browser(daemon, env):
    proc = subprocess.Popen([IAPCTL, "login", "demo-user", "--no-browser"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = None
    while url is None:
        line = proc.stderr.readline()
        assert line, "iapctl ended before printing the URL"
        if line.strip().startswith("http"):
            url = line.strip()
    location = requests.get(url, allow_redirects=False, timeout=10).headers["Location"]
    out, err = proc.communicate(location + "\n", timeout=30)
    assert proc.returncode == 0, err
    assert "Logged in as demo@example.com" in out


def test_status_table_json_and_not_running(daemon, env, tmp_path):
    daemon.login()
    iapctl("token", "demo-user", env=env)
    table = iapctl("status", env=env)
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.startswith("demo-user"))
    assert "demo@example.com" in row and "ready" in row and IAP in row and re.search(r"\d+m\d\ds", row)
    header = next(line for line in table.stdout.splitlines() if line.startswith("PROFILE"))
    assert "NEXT RENEWAL" in header and "LAST ERROR" in header
    data = json.loads(iapctl("status", "--json", env=env).stdout)
    assert data["running"] is True and {p["name"] for p in data["profiles"]} >= {"demo-user", "demo-sa"}
    down = {**env, "IAPD_SOCKET": str(tmp_path / "none.sock")}
    out = iapctl("status", env=down)
    assert out.returncode == 3 and "iapd is not running" in out.stdout
    assert json.loads(iapctl("status", "--json", env=down).stdout) == {"running": False, "socket": down["IAPD_SOCKET"]}


def test_logout_says_what_was_revoked(daemon, env):
    daemon.login()
    out = iapctl("logout", "demo-user", env=env)
    assert out.returncode == 0
    assert out.stdout == "demo-user: demo@example.com: revoked at Google; wiped from the store; cached tokens dropped.\n"
    assert iapctl("logout", env=env).returncode == 2
    everything = iapctl("logout", "--all", env=env)
    assert everything.returncode == 0 and "demo-sa" in everything.stdout


def test_flyte_iap_drop_in_user(daemon_factory, tmp_path, emulator):
    # flyte-iap reads the desktop client's secret with the user's application-default
    # credentials (`gcloud auth application-default login`): so does its drop-in.
    adc = str(emulator.config_path.parent / "emulator-adc.json")
    daemon = daemon_factory(name="dropin", env={"GOOGLE_APPLICATION_CREDENTIALS": adc})
    env = {**daemon.env, "XDG_STATE_HOME": str(tmp_path / "client-state"), "IAPD_AUTOSTART": "0",
           "IAPD_AUTO_LOGIN": "0", "DISPLAY": ""}
    args = ["generate-user-id-token", "--desktop_client_id", DESKTOP,
            "--desktop_client_secret_gcp_secret_name", "iap-desktop-client-secret",
            "--webapp_client_id", IAP, "--project", "iapd-demo"]
    seen = {**env, "IAPD_AUTO_LOGIN": "1", "DISPLAY": ":0", "BROWSER": CURL_BROWSER}
    first = iapctl(*args, env=seen)
    assert first.returncode == 0, first.stderr
    claims = unverified_claims(first.stdout.strip())
    assert claims["aud"] == IAP and claims["azp"] == DESKTOP and first.stdout.count("\n") == 1
    again = iapctl(*args, env=env)  # same flags: same ad-hoc profile, the cached token, no new login
    assert again.stdout == first.stdout and emulator.counters()["auth"] == 1


def test_flyte_iap_drop_in_service_account(daemon, env, emulator):
    key = str(emulator.config_path.parent / "emulator-sa-key.json")
    out = iapctl("generate-service-account-id-token", "--webapp_client_id", IAP, "--service_account_key", key, env=env)
    assert out.returncode == 0, out.stderr
    assert unverified_claims(out.stdout.strip())["email"] == "demo-ci@iapd-demo.iam.gserviceaccount.com"
    via_env = iapctl("generate-service-account-id-token", "--webapp_client_id", IAP,
                     env={**env, "GOOGLE_APPLICATION_CREDENTIALS": key})
    assert via_env.returncode == 0, via_env.stderr
    # $GOOGLE_APPLICATION_CREDENTIALS maps to an `adc` profile: another cache entry, same identity.
    assert unverified_claims(via_env.stdout.strip())["email"] == "demo-ci@iapd-demo.iam.gserviceaccount.com"
    failed(iapctl("generate-service-account-id-token", "--webapp_client_id", IAP, "--service_account_key",
                  "/nonexistent.json", env=env), 5, "does not exist")


def test_help_documents_exit_codes(env):
    out = iapctl("--help", env=env)
    assert out.returncode == 0
    for code, words in [(3, "not running"), (4, "login required"), (5, "unknown profile"), (6, "Google")]:
        assert re.search(rf"^\s+{code}\s+.*{words}", out.stdout, re.M), (code, out.stdout)


def test_autostart_waits_for_its_lock_no_longer_than_the_clients_timeout(tmp_path):
    """Whoever holds the autostart lock (a stuck iapctl) cannot hang `iapctl token`: it gives up
    at its own deadline and says what happened."""
    import fcntl

    state = tmp_path / "state" / "iapd"
    state.mkdir(parents=True, mode=0o700)
    env = {**os.environ, "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "IAPD_CONFIG": str(tmp_path / "none.toml"), "IAPCTL_TIMEOUT": "1", "IAPD_AUTO_LOGIN": "0", "DISPLAY": ""}
    env.pop("IAPD_AUTOSTART", None)
    with open(state / "autostart.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        out = iapctl("token", "p", env=env, timeout=30)
    failed(out, 3, "the autostart lock is held")
