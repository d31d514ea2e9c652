"""Another local user cannot impersonate, hijack or starve iapd.

The attacker really is another uid: `setpriv` runs its programs as nobody (65534) while the test
(the victim) runs as root, as in CI. Each test here failed on the code before the fix.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import browse, fill, stop_process, wait_for
from test_client import IAPCTL, failed, iapctl

SETPRIV = shutil.which("setpriv")
NOBODY = 65534
# The test's interpreter may live under /root, which nobody cannot read; the system one it can.
ATTACKER_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
two_users = pytest.mark.skipif(SETPRIV is None or os.getuid() != 0,
                               reason="needs setpriv, and root to act as another uid")


def as_nobody(*argv: str) -> list[str]:
    return [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


# A stand-in for iapd that answers every request with its own "token" and records what it got.
FAKE_IAPD = r'''
import os, socket, sys
path, record, drop = sys.argv[1], open(sys.argv[2], "ab"), len(sys.argv) > 3
os.makedirs(os.path.dirname(path), exist_ok=True)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
os.chmod(path, 0o777)
if drop:  # bound by root in a root-owned directory, then served by another uid (SO_PEERCRED is set at listen)
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(2)
    try:
        data = conn.recv(65536)
    except OSError:
        data = b""
    record.write(data); record.flush()
    body = b"ATTACKER-TOKEN"
    try:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    conn.close()
'''


@pytest.fixture
def shared_tmp():
    """A directory like /tmp: world-writable and sticky, reachable by the attacker."""
    folder = Path(tempfile.mkdtemp(prefix="iapd-shared-", dir="/tmp"))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def fake_iapd(folder: Path, socket_path: Path, *, attacker: bool, drop: bool = False) -> tuple[subprocess.Popen, Path]:
    script, record = folder / "fake_iapd.py", folder / "received"
    script.write_text(FAKE_IAPD)
    script.chmod(0o644)
    record.touch()
    record.chmod(0o666)
    argv = [ATTACKER_PYTHON, str(script), str(socket_path), str(record), *(["drop"] if drop else [])]
    proc = subprocess.Popen(as_nobody(*argv) if attacker else argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n", proc.stderr.read()
    return proc, record


def client_env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "IAPD_SOCKET")}
    return {**env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0", "XDG_STATE_HOME": str(tmp_path / "state"), **extra}


def kill_autostarted(env: dict) -> None:
    out = iapctl("status", "--json", env=env)
    if out.returncode == 0:
        os.kill(json.loads(out.stdout)["daemon"]["pid"], 15)


@two_users
def test_the_fallback_socket_cannot_be_claimed_by_another_user(shared_tmp, tmp_path, emulator):
    # No XDG_RUNTIME_DIR (SSH without pam_systemd, containers, su) and a shared TMPDIR: the old
    # fallback, TMPDIR/iapd-UID/iapd.sock, is a name anyone can create first.
    env = client_env(tmp_path, TMPDIR=str(shared_tmp), IAPD_CONFIG=str(emulator.config_path))
    attacker, received = fake_iapd(shared_tmp, shared_tmp / f"iapd-{os.getuid()}" / "iapd.sock", attacker=True)
    try:
        failed(iapctl("token", "demo-sa", env=env), 3, "iapd is not running")
        # ...and our own daemon starts (no denial of service), somewhere the attacker cannot reach.
        autostart = {**env, "IAPD_AUTOSTART": "1"}
        try:
            out = iapctl("token", "demo-sa", env=autostart)
            assert out.returncode == 0 and "ATTACKER" not in out.stdout, out.stderr
            socket_path = json.loads(iapctl("status", "--json", env=autostart).stdout)["daemon"]["socket"]
            assert not socket_path.startswith(str(shared_tmp)) and socket_path.startswith(str(tmp_path / "state"))
        finally:
            kill_autostarted(autostart)
        assert received.read_bytes() == b""
    finally:
        stop_process(attacker)


@two_users
def test_the_client_refuses_a_socket_served_by_another_uid(tmp_path):
    # A root-owned, private directory, so only the server's uid can be wrong.
    folder = tmp_path / "sockdir"
    folder.mkdir(mode=0o755)
    path = folder / "iapd.sock"
    server, received = fake_iapd(tmp_path, path, attacker=False, drop=True)
    env = client_env(tmp_path, IAPD_SOCKET=str(path))
    try:
        failed(iapctl("token", "demo-user", env=env), 3, f"served by uid {NOBODY}", "impersonating")
        # A pasted redirect URL carries the authorization code: it must never reach that server.
        out = iapctl("login", "demo-user", "--no-browser", env=env,
                     input="http://127.0.0.1:1/oauth2/callback?code=VICTIMS-CODE&state=s\n")
        assert out.returncode == 3 and f"served by uid {NOBODY}" in out.stderr
        assert received.read_bytes() == b""  # not a byte was sent
    finally:
        stop_process(server)


def test_the_client_refuses_a_socket_in_a_directory_others_can_write(shared_tmp, tmp_path):
    path = shared_tmp / "iapd.sock"
    server, received = fake_iapd(shared_tmp, path, attacker=False)
    try:
        failed(iapctl("token", "demo-user", env=client_env(tmp_path, IAPD_SOCKET=str(path))), 3,
               "writable by other users", "IAPD_SOCKET")
        assert received.read_bytes() == b""
    finally:
        stop_process(server)


def plant_modules(folder: Path, marker: Path) -> None:
    """What an untrusted checkout could hold: modules named like the standard library's."""
    folder.mkdir(exist_ok=True)
    for name in ("json", "typing", "logging", "base64"):
        (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name} ran\\n')\n")


def test_autostart_never_imports_from_the_working_directory(emulator, tmp_path):
    checkout, marker = tmp_path / "untrusted-checkout", tmp_path / "planted-code-ran"
    plant_modules(checkout, marker)
    # The daemon runs in the home directory, and `python -m` would put *its* working directory
    # first on sys.path: only `-P` keeps modules lying there (a cloned repo in ~) out of it.
    home = tmp_path / "home-with-modules"
    plant_modules(home, marker)
    env = client_env(tmp_path, IAPD_AUTOSTART="1", IAPD_CONFIG=str(emulator.config_path),
                     IAPD_SOCKET=str(tmp_path / "run" / "iapd.sock"), HOME=str(home))
    try:
        out = subprocess.run([IAPCTL, "token", "demo-sa"], env=env, cwd=checkout, capture_output=True, text=True,
                             timeout=60, start_new_session=True)
        assert out.returncode == 0, out.stderr
    finally:
        kill_autostarted(env)
    assert not marker.exists(), marker.read_text()


async def test_the_secret_manager_child_never_imports_from_the_working_directory(emulator, tmp_path, monkeypatch):
    from iapd.config import Endpoints
    from iapd.emulator.state import DESKTOP_SECRET_NAME
    from iapd.secret_manager import read_secret

    checkout, marker = tmp_path / "untrusted", tmp_path / "planted-code-ran"
    plant_modules(checkout, marker)
    monkeypatch.chdir(checkout)
    endpoints = Endpoints(token_url=emulator.url("token_url"), secret_manager_url=emulator.url("secret_manager_url"))
    secret = await read_secret(DESKTOP_SECRET_NAME, str(emulator.config_path.parent / "emulator-adc.json"),
                               endpoints, 10)
    assert secret.startswith("GOCSPX-")
    assert not marker.exists(), marker.read_text()


@two_users
def test_another_user_cannot_take_over_a_login_from_the_browsers_argv(daemon, emulator, shared_tmp, tmp_path):
    """The browser's argv is world-readable (/proc/PID/cmdline). Another user who follows it,
    signed in as herself, must not become the account behind our tokens."""
    argv_file = shared_tmp / "browser-argv"
    browser = shared_tmp / "browser"
    # A browser that is slow to start: it only records its argv, as /proc would show it.
    browser.write_text(f"#!/bin/sh\nprintf '%s' \"$1\" > {argv_file}\nchmod 644 {argv_file}\n")
    browser.chmod(0o755)
    env = {**daemon.env, "BROWSER": f"{browser} %s", "IAPD_AUTOSTART": "0", "XDG_STATE_HOME": str(tmp_path / "cs")}
    login = subprocess.Popen([IAPCTL, "login", "demo-user"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        url = wait_for(lambda: argv_file.exists() and argv_file.read_text(), what="the browser's argv")
        assert "state=" not in url and "code_challenge" not in url
        emulator.settings(user_email="mallory@example.com")
        subprocess.run(as_nobody("curl", "-sSL", "-o", "/dev/null", "--max-time", "20", url), timeout=30)
        emulator.settings(user_email="demo@example.com")
        browse(url)  # now the victim's browser
        out, err = login.communicate(timeout=30)
    finally:
        stop_process(login)
    assert login.returncode == 0, err
    assert "Logged in as demo@example.com" in out
    assert daemon.profile_status("demo-user")["identity"] == "demo@example.com"
    assert "login listener: refused" in daemon.logs()


def test_the_login_listener_drops_a_connection_that_sends_nothing(daemon_factory):
    """A connection to the listener that sends no request is closed after header_timeout_seconds
    (1 s here; 10 by default) — awaited as the close itself — and the login goes on."""
    from urllib.parse import urlsplit

    daemon = daemon_factory("header_timeout_seconds = 1\n", name="drops")
    started = daemon.request("POST", "/v1/login/demo-user").json()
    with socket.create_connection(("127.0.0.1", urlsplit(started["browser_url"]).port), timeout=15) as idle:
        opened = time.monotonic()
        assert idle.recv(1) == b""  # the listener hung up (15 s without it: socket.timeout)
        held = time.monotonic() - opened
    assert 0.5 <= held < 8, held
    browse(started["browser_url"])
    assert daemon.request("GET", "/v1/login/demo-user?wait=20").json()["state"] == "done"


def test_the_login_start_url_works_once(daemon):
    """The browser's argv is readable by every local user: the start URL in it opens the login
    once (302 to the sign-in), and is refused after that (409) — the login itself goes on."""
    started = daemon.request("POST", "/v1/login/demo-user").json()

    def status_of_start_url() -> str:
        return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                               started["browser_url"]], capture_output=True, text=True, timeout=30).stdout

    assert status_of_start_url() == "302"
    assert status_of_start_url() == "409"
    browse(started["auth_url"])  # the browser that opened it signs in
    assert daemon.request("GET", "/v1/login/demo-user?wait=20").json()["state"] == "done"


def test_a_login_pinned_to_an_account_refuses_another(daemon_factory, emulator, tmp_path):
    config = tmp_path / "pinned.toml"
    config.write_text(emulator.config_path.read_text().replace(
        "[profiles.demo-user.user]\n", '[profiles.demo-user.user]\naccount = "alice@example.com"\n'))
    daemon = daemon_factory(config=config, name="pinned")
    started = daemon.request("POST", "/v1/login/demo-user").json()
    assert "login_hint=alice%40example.com" in started["auth_url"]
    browse(started["browser_url"])
    outcome = daemon.request("GET", "/v1/login/demo-user?wait=20").json()
    assert outcome["state"] == "failed"
    assert "signed in as demo@example.com, but this profile is for alice@example.com" in outcome["message"]
    assert daemon.profile_status("demo-user")["state"] == "login_required"
    assert emulator.counters()["revoked"] == 1  # the grant we refused to keep is not left alive


def open_connections(port: int, count: int, attacker: bool) -> subprocess.Popen:
    """A process that opens `count` connections to the port and holds them, silently."""
    code = ("import socket,sys,time\nheld=[]\n"
            f"for _ in range({count}):\n"
            " s=socket.socket()\n try:\n  s.connect(('127.0.0.1',%d)); held.append(s)\n except OSError: pass\n"
            "print(len(held),flush=True)\ntime.sleep(120)\n") % port
    argv = [ATTACKER_PYTHON, "-c", code]
    return subprocess.Popen(as_nobody(*argv) if attacker else argv, stdout=subprocess.PIPE, text=True)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@two_users
def test_a_flood_on_the_login_listener_starves_nothing(daemon_factory, emulator, tmp_path):
    # soft = hard = 256: raising the limit cannot help, only the listener's own limits can.
    daemon = daemon_factory(prefix=["prlimit", "--nofile=256:256", "--"])
    env = {**daemon.env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0", "XDG_STATE_HOME": str(tmp_path / "cs")}
    started = daemon.request("POST", "/v1/login/demo-user").json()
    port = int(started["redirect_uri"].split(":")[2].split("/")[0])
    floods = [open_connections(port, 600, attacker=True), open_connections(port, 300, attacker=False)]
    try:
        for flood in floods:
            flood.stdout.readline()  # its connections are open (or were refused)
        assert open_fds(daemon.proc.pid) < 100
        out = iapctl("token", "demo-sa", env=env)
        assert out.returncode == 0, out.stderr
        browse(started["browser_url"])  # the real browser still gets through
        assert daemon.request("GET", "/v1/login/demo-user?wait=20").json()["state"] == "done"
    finally:
        for flood in floods:
            stop_process(flood)
    assert "login listener: refused" in daemon.logs()


def test_the_daemon_raises_its_soft_descriptor_limit(daemon_factory):
    daemon = daemon_factory(prefix=["prlimit", "--nofile=256:4096", "--"])
    limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


def test_a_browser_never_writes_into_our_stdout(daemon, tmp_path):
    browser = tmp_path / "chatty-browser"
    browser.write_text("#!/bin/sh\necho 'Opening in existing browser session.'\necho 'gio: noise' >&2\n"
                       "exec curl -sSL -o /dev/null \"$1\"\n")
    browser.chmod(0o755)
    env = {**daemon.env, "BROWSER": f"{browser} %s", "DISPLAY": ":99", "IAPD_AUTOSTART": "0",
           "XDG_STATE_HOME": str(tmp_path / "cs")}
    out = iapctl("token", "demo-user", env=env)  # auto-login through the "browser"
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and out.stdout.startswith("eyJ"), out.stdout
    assert "Opening in existing" not in out.stderr and "gio:" not in out.stderr


def serve_once(path: Path, answer) -> tuple[socket.socket, threading.Thread]:

    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def run():
        conn, _ = server.accept()
        conn.recv(65536)
        try:
            answer(conn)
        except OSError:
            pass
        conn.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return server, thread


def test_one_deadline_per_request_and_no_short_bodies(tmp_path):
    (tmp_path / "srv").mkdir(mode=0o700)
    path = tmp_path / "srv" / "slow.sock"
    env = client_env(tmp_path, IAPD_SOCKET=str(path), IAPCTL_TIMEOUT="1")

    def trickle(conn):  # a byte every 0.2 s, for a minute
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + b"x" * 300:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)

    server, thread = serve_once(path, trickle)
    failed(iapctl("token", "p", env=env, timeout=20), 3, "no answer within 1s")
    server.close()
    path.unlink()

    server, thread = serve_once(path, lambda conn: conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\neyJhbGciOi"))
    failed(iapctl("token", "p", env=env), 3, "cut short")
    thread.join(5)
    server.close()


def test_a_store_of_the_wrong_shape_is_set_aside_not_a_crash_loop(daemon_factory):
    daemon = daemon_factory(start=False)
    daemon.state_dir.mkdir(mode=0o700)
    (daemon.state_dir / "credentials.json").write_text(json.dumps(
        {"version": 1, "credentials": {"user:123456789012-desktop.apps.googleusercontent.com": ["not", "a", "record"]}}))
    daemon.start()
    assert daemon.profile_status("demo-user")["state"] == "login_required"
    assert len(daemon.status()["daemon"]["unreadable_stores"]) == 1
    assert "unreadable" in daemon.logs()


def test_logout_all_revokes_the_logins_of_an_unreadable_store(daemon, emulator):
    assert daemon.login()["state"] == "done"
    live = emulator.state()["live_refresh_tokens"]
    daemon.stop()
    store = daemon.state_dir / "credentials.json"
    store.write_bytes(store.read_bytes()[:-3])  # no longer JSON, the refresh token still in it
    daemon.start()
    assert daemon.profile_status("demo-user")["state"] == "login_required"
    [aside] = daemon.status()["daemon"]["unreadable_stores"]
    results = daemon.request("POST", "/v1/logout").json()["results"]
    assert any(r["credential"].startswith("unreadable store") and r["revoked"] for r in results), results
    assert emulator.state()["live_refresh_tokens"] == live - 1
    assert not Path(aside).exists() and daemon.status()["daemon"]["unreadable_stores"] == []


def test_a_full_disk_fails_the_login_at_once_and_leaves_no_temp_file(daemon_factory, tiny_disk):
    daemon = daemon_factory(start=False)
    daemon.config.write_text(daemon.config.read_text().replace(f'state_dir = "{daemon.state_dir}"',
                                                               f'state_dir = "{tiny_disk}"'))
    daemon.start()
    fill(tiny_disk)
    started = daemon.request("POST", "/v1/login/demo-user").json()
    browse(started["browser_url"])
    outcome = daemon.request("GET", "/v1/login/demo-user?wait=20", timeout=30).json()
    assert outcome["state"] == "failed" and "could not be saved" in outcome["message"], outcome
    assert "No space left on device" in outcome["message"]
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "iapd.lock"]  # no temp file left
    assert "Traceback" not in daemon.logs()


def test_wait_must_be_a_finite_number(daemon):
    for bad in ("nan", "inf", "-inf", "soon"):
        resp = daemon.request("GET", f"/v1/login/demo-user?wait={bad}")
        assert resp.status == 400 and resp.json()["error"] == "bad_request", (bad, resp.body)


def test_the_fast_path_keeps_the_header_limits(daemon):
    daemon.login()
    daemon.token("demo-user")  # cached: servable on the fast path
    # 70 short headers: more than aiohttp's limit of 64, in one small segment, as the fast path sees it.
    huge = "GET /v1/token/demo-user HTTP/1.1\r\nConnection: close\r\n" + \
        "".join(f"X-{i}: a\r\n" for i in range(70)) + "\r\n"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(daemon.socket)
        sock.sendall(huge.encode())
        answer = sock.recv(100)
    # aiohttp's answer to too many headers — not silence, not a token (a crashed daemon says nothing).
    assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer
    assert daemon.proc.poll() is None and daemon.request("GET", "/healthz").status == 200


def test_a_percent_in_a_path_is_escaped_for_systemd(outside_tmp, monkeypatch):
    tmp_path = outside_tmp  # the service's private /tmp would hide pytest's own
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "100%state"))
    monkeypatch.setenv("IAPD_CONFIG", str(tmp_path / "50%off" / "config.toml"))
    out = subprocess.run([IAPCTL, "service", "install", "--dry-run"], capture_output=True, text=True,
                         env={**os.environ}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "100%%state" in out.stdout and "50%%off" in out.stdout
    assert "100%state" not in out.stdout.replace("100%%state", "")


def test_the_emulator_on_ipv6_loopback_prints_usable_urls(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    proc = subprocess.Popen([sys.executable, "-m", "iapd", "emulator", "--host", "::1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.skip(f"cannot bind ::1 here: {proc.stderr.read()[:200]}")
        info = json.loads(line)
        assert info["token_url"].startswith("http://[::1]:")
        import urllib.request

        with urllib.request.urlopen(info["discovery_url"], timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop_process(proc)


def test_error_text_from_the_callback_has_its_control_characters_escaped(daemon):
    started = daemon.request("POST", "/v1/login/demo-user").json()
    state = started["auth_url"].split("state=")[1].split("&")[0]
    import requests

    hostile = "\x1b]0;owned\x07\x1b[2J"  # retitles and clears a terminal when printed raw
    requests.get(started["redirect_uri"], params={"state": state, "error": "access_denied",
                                                  "error_description": hostile}, timeout=10)
    outcome = daemon.request("GET", "/v1/login/demo-user").json()
    assert outcome["state"] == "failed" and "\x1b" not in outcome["message"] and "\x07" not in outcome["message"]
    assert "\\x1b]0;owned\\x07" in outcome["message"]


@pytest.mark.parametrize("domain, refused", [("corp.example", True), ("example.com", False)])
def test_a_login_pinned_to_a_workspace_domain_refuses_an_account_of_another(daemon_factory, emulator, tmp_path,
                                                                           domain, refused):
    config = tmp_path / "hd.toml"
    config.write_text(emulator.config_path.read_text().replace(
        "[profiles.demo-user.user]\n", f'[profiles.demo-user.user]\nhosted_domain = "{domain}"\n'))
    daemon = daemon_factory(config=config, name="hd")
    started = daemon.request("POST", "/v1/login/demo-user").json()
    assert f"hd={domain}" in started["auth_url"]  # Google's account chooser is told, too
    browse(started["browser_url"])
    outcome = daemon.request("GET", "/v1/login/demo-user?wait=20").json()
    if refused:  # demo@example.com's `hd` is example.com
        assert outcome["state"] == "failed" and f"which is not in {domain}" in outcome["message"], outcome
        assert emulator.counters()["revoked"] == 1
    else:
        assert outcome["state"] == "done", outcome
