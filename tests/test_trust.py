"""What iapd trusts: its config only when it is the user's, its caller's environment only by
name, and an issuer's answers only for what they may say. Each test failed on the code before
(the defect named in its docstring); the hostile issuer is a small HTTP server of the test's own."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import DaemonProcess, stop_process, wait_for
from test_client import failed, iapctl
from test_oidc import env_of

NOBODY = 65534


# -- a hostile (or merely wrong) issuer -----------------------------------------------------------

class Hostile(BaseHTTPRequestHandler):
    """Answers what the test sets in `Hostile.answers` (path → (status, headers, body)), and
    records every request (path, headers, body) in `Hostile.seen`. A discovery document is
    served for any issuer path that asks, with the server's own URL filled in."""

    answers: dict[str, tuple[int, dict, bytes]] = {}
    seen: list[tuple[str, dict, str]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
        Hostile.seen.append((self.path, dict(self.headers), body))
        status, headers, payload = Hostile.answers.get(self.path.split("?")[0], (404, {}, b"{}"))
        self.send_response(status)
        headers = dict(headers)
        unsized = headers.pop("X-Test-Unsized", None)  # no Content-Length: the body ends at close (HTTP/1.0)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        if not unsized:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


class HostileServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # iapd hanging up on an answer it refuses (one past its size cap) is the point of some
        # tests: not a traceback in the test output.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@pytest.fixture
def hostile():
    Hostile.answers, Hostile.seen = {}, []
    server = HostileServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def discovery(issuer: str, **fields) -> tuple[int, dict, bytes]:
    doc = {"issuer": issuer, "token_endpoint": f"{issuer}/token", "authorization_endpoint": f"{issuer}/auth",
           **fields}
    return 200, {}, json.dumps(doc).encode()


def jwt(claims: dict) -> str:
    """A JWT as an issuer would send it; the signature is not ours to check (the app does)."""
    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def bot(issuer: str, name: str = "bot", token: str = "access_token", extra: str = "") -> str:
    scopes = '["openid"]' if token == "id_token" else '["api"]'
    return (f'\n[profiles.{name}.oidc]\nissuer = "{issuer}"\nclient_id = "ci-bot"\nclient_secret = "bot-secret"\n'
            f'grant = "client_credentials"\nscopes = {scopes}\ntoken = "{token}"\n{extra}')


def start(daemon_factory, emulator, tmp_path, body: str, name: str = "t", settings: str = "") -> tuple:
    config = tmp_path / f"{name}.toml"
    config.write_text(emulator.config_path.read_text() + body)
    daemon = daemon_factory(config=config, name=name, daemon_settings=settings)
    return daemon, env_of(daemon, tmp_path)


def unstarted(folder: Path, config: Path) -> DaemonProcess:
    folder.mkdir()
    return DaemonProcess(folder, config)


def refused_at_start(daemon: DaemonProcess, code: int) -> str:
    """Start `daemon`, which must exit with `code`; its last log line (the one-line reason)."""
    daemon.start(expect_ready=False)
    try:
        assert daemon.proc.wait(timeout=30) == code
    finally:
        stop_process(daemon.proc)
    return daemon.logs().strip().splitlines()[-1]


# -- the config file ----------------------------------------------------------------------------

def test_a_config_in_a_directory_another_user_made_is_refused(emulator, tmp_path):
    """The README's walk-through (`--write-config /tmp/emu/config.toml`) where someone else made
    /tmp/emu first: they could swap the file and have the stored login sent to their endpoint."""
    theirs = tmp_path / "emu"
    theirs.mkdir(mode=0o777)
    os.chmod(theirs, 0o777)
    os.chown(theirs, NOBODY, NOBODY)
    daemon = unstarted(tmp_path / "d", emulator.config_path)
    (theirs / "config.toml").write_text(daemon.config.read_text())
    daemon.env["IAPD_CONFIG"] = str(theirs / "config.toml")
    line = refused_at_start(daemon, 2)
    assert "not safe to use" in line and f"belongs to uid {NOBODY}" in line, line


def test_a_config_that_others_can_write_is_refused_on_reload_and_the_old_one_serves(daemon, emulator):
    assert daemon.request("GET", "/v1/token/demo-sa").status == 200
    os.chmod(daemon.config, 0o666)
    answer = daemon.request("POST", "/v1/reload").json()
    assert answer["reloaded"] is False and "writable by other users" in answer["error"], answer
    assert daemon.request("GET", "/v1/token/demo-sa").status == 200  # the previous config keeps serving


def test_a_second_daemon_on_one_store_refuses_to_start(daemon_factory, emulator, tmp_path):
    """A config that moves the socket would start a second daemon on the user's store: two
    daemons refreshing one refresh token are what rotation punishes."""
    first = daemon_factory(name="one")
    second = unstarted(tmp_path / "two", emulator.config_path)
    second.config.write_text(second.config.read_text().replace(str(second.state_dir), str(first.state_dir)))
    line = refused_at_start(second, 1)
    assert f"another iapd (pid {first.proc.pid}, socket {first.socket})" in line, line
    assert first.request("GET", "/healthz").status == 200


# -- the caller's environment --------------------------------------------------------------------

def daemon_environ(env: dict) -> dict[str, str]:
    pid = json.loads(iapctl("status", "--json", env=env).stdout)["daemon"]["pid"]
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/environ")
def test_autostart_gives_the_daemon_only_what_it_needs(emulator, tmp_path):
    """One `HTTP_PROXY=… iapctl token` froze that proxy into every later refresh."""
    env = {k: v for k, v in os.environ.items() if k != "IAPD_AUTOSTART"}
    env.update(IAPD_CONFIG=str(emulator.config_path), IAPD_SOCKET=str(tmp_path / "run" / "iapd.sock"),
               XDG_STATE_HOME=str(tmp_path / "state"), IAPD_AUTO_LOGIN="0",
               HTTP_PROXY="http://127.0.0.1:9", PYTHONWARNINGS="ignore", GOOGLE_APPLICATION_CREDENTIALS="/nowhere")
    try:
        out = iapctl("token", "demo-sa", env=env)  # autostarts it; a proxy at port 9 would fail every refresh
        assert out.returncode == 0, out.stderr
        given = daemon_environ(env)
        assert not {"HTTP_PROXY", "PYTHONWARNINGS", "GOOGLE_APPLICATION_CREDENTIALS"} & set(given), sorted(given)
        assert given["IAPD_CONFIG"] == str(emulator.config_path) and given["HOME"] == env["HOME"]
    finally:
        iapctl("stop", env=env)


def test_the_daemons_network_settings_come_from_its_config(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory(name="env", daemon_settings='environment = { HTTP_PROXY = "http://127.0.0.1:9" }')
    resp = daemon.request("GET", "/v1/token/demo-sa")
    assert resp.status == 503 and "127.0.0.1:9" in resp.json()["message"], resp.body  # it went to the proxy


def test_the_daemons_environment_takes_only_network_and_credential_settings(tmp_path):
    from iapd.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text('[daemon]\nenvironment = { PYTHONPATH = "/tmp/x" }\n')
    with pytest.raises(ConfigError, match="daemon.environment: PYTHONPATH cannot be set here"):
        load_config(path)


# -- an issuer's answers -------------------------------------------------------------------------

def test_a_discovery_document_of_another_issuer_is_refused(daemon_factory, emulator, tmp_path, hostile):
    Hostile.answers["/.well-known/openid-configuration"] = discovery("https://idp.example.com")
    daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile))
    resp = daemon.request("GET", "/v1/token/bot")
    assert resp.status == 502 and "discovery document of issuer 'https://idp.example.com'" in resp.json()["message"]
    assert not [s for s in Hostile.seen if s[0] == "/token"]  # the client secret never went there


def test_a_redirect_is_never_followed_with_credentials(daemon_factory, emulator, tmp_path, hostile):
    """aiohttp strips Authorization on a cross-origin redirect, not the body: a 307 would
    re-POST the client secret (and a refresh token) to wherever it points."""
    elsewhere = hostile + "/elsewhere"
    Hostile.answers["/.well-known/openid-configuration"] = discovery(hostile)
    Hostile.answers["/token"] = (307, {"Location": elsewhere}, b"")
    daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile, extra='audience = "x"\n'))
    resp = daemon.request("GET", "/v1/token/bot")
    assert resp.status == 502 and "redirect to" in resp.json()["message"], resp.body
    assert not [s for s in Hostile.seen if s[0].startswith("/elsewhere")]


def test_a_via_token_goes_only_to_the_issuers_origin(daemon_factory, emulator, tmp_path, hostile):
    """Discovery may name endpoints on other hosts; the `via` token opens the proxy in front of
    the issuer and goes nowhere else."""
    issuer = emulator.url("oidc_issuer")
    emulator_secret = emulator.state()["oidc"]["client_secrets"]["ci-bot"]
    body = bot(issuer, extra=f'via = "demo-sa"\ntoken_endpoint = "{hostile}/token"\n').replace(
        'client_secret = "bot-secret"', f'client_secret = "{emulator_secret}"')
    daemon, env = start(daemon_factory, emulator, tmp_path, body)
    daemon.request("GET", "/v1/token/bot")
    posts = [s for s in Hostile.seen if s[0] == "/token"]
    assert posts and not any("Proxy-Authorization" in headers for _, headers, _ in posts), posts


def test_an_id_token_of_another_issuer_or_client_is_not_served(daemon_factory, emulator, tmp_path, hostile):
    import time

    Hostile.answers["/.well-known/openid-configuration"] = discovery(hostile)
    now = int(time.time())
    for claims, needle in [({"iss": "https://idp.example.com", "aud": "ci-bot"}, "issued by 'https://idp.example.com'"),
                           ({"iss": hostile, "aud": "another-client"}, "not for client ci-bot")]:
        token = jwt({**claims, "sub": "x", "iat": now, "exp": now + 3600})
        Hostile.answers["/token"] = (200, {}, json.dumps({"id_token": token, "access_token": "a",
                                                          "expires_in": 3600}).encode())
        daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile, token="id_token"), name=f"mix{len(needle)}")
        resp = daemon.request("GET", "/v1/token/bot")
        assert resp.status == 502 and needle in resp.json()["message"], resp.body


def test_impossible_numbers_from_an_issuer_are_refused_and_status_still_answers(daemon_factory, emulator, tmp_path,
                                                                              hostile):
    Hostile.answers["/.well-known/openid-configuration"] = discovery(hostile)
    payload = '{"iss": "%s", "aud": "ci-bot", "sub": "x", "iat": 1, "exp": NaN}' % hostile
    token = "eyJhbGciOiJSUzI1NiJ9." + base64.urlsafe_b64encode(payload.encode()).rstrip(b"=").decode() + ".c2ln"
    Hostile.answers["/token"] = (200, {}, json.dumps({"id_token": token}).encode())
    daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile, token="id_token"))
    resp = daemon.request("GET", "/v1/token/bot")
    assert resp.status == 502 and "impossible exp" in resp.json()["message"], resp.body
    assert daemon.request("GET", "/v1/status").status == 200
    assert iapctl("doctor", env=env).returncode in (0, 1)  # it reports; it does not crash
    # An opaque access token says how long it lives only in expires_in: none (or a string) is no lifetime.
    for expires_in in (None, "3600"):
        answer = {"access_token": "opaque-token", **({} if expires_in is None else {"expires_in": expires_in})}
        Hostile.answers["/token"] = (200, {}, json.dumps(answer).encode())
        daemon, _ = start(daemon_factory, emulator, tmp_path, bot(hostile), name=f"opaque{expires_in}")
        resp = daemon.request("GET", "/v1/token/bot")
        assert resp.status == 502 and "without expires_in" in resp.json()["message"], resp.body


def test_a_token_with_a_line_break_is_refused(daemon_factory, emulator, tmp_path, hostile):
    Hostile.answers["/.well-known/openid-configuration"] = discovery(hostile)
    Hostile.answers["/token"] = (200, {}, json.dumps({"access_token": "x\r\nX-Injected: yes",
                                                      "expires_in": 3600}).encode())
    daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile))
    out = iapctl("token", "bot", "--format", "header", env=env)
    assert "X-Injected" not in out.stdout
    failed(out, 6, "characters no token has")


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "read-to-the-end"])
def test_an_oversized_answer_is_refused(daemon_factory, emulator, tmp_path, hostile, sized):
    """Refused by its Content-Length, and — where it gives none — while it is read."""
    headers = {} if sized else {"X-Test-Unsized": "1"}
    Hostile.answers["/.well-known/openid-configuration"] = (200, headers, b" " * (5 * 1024 * 1024) + b"{}")
    daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile))
    resp = daemon.request("GET", "/v1/token/bot")
    message = resp.json()["message"]
    assert "more than the 4194304" in message and "accepted" in message, resp.body
    if sized:  # refused before a byte of the body is read
        assert f"the answer is {5 * 1024 * 1024 + 2} bytes" in message, message


def test_a_device_interval_that_is_not_a_small_positive_number_is_clamped():
    from iapd.sources.oidc import device_interval

    assert [device_interval(v) for v in (-1, 0, float("nan"), float("inf"), "5", None, True, 7)] == \
        [1.0, 1.0, 5.0, 60.0, 5.0, 5.0, 5.0, 7.0]


def test_a_non_loopback_http_issuer_is_a_config_error(tmp_path):
    from iapd.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text('[profiles.x.oidc]\nissuer = "http://idp.example.com"\nclient_id = "c"\n')
    with pytest.raises(ConfigError, match="issuer must be https"):
        load_config(path)


def test_logout_all_revokes_each_unreadable_token_only_where_it_came_from(daemon_factory, emulator, tmp_path,
                                                                          hostile):
    """A store set aside as unreadable held another issuer's refresh token: it went to Google's
    revoke URL (here: the configured one) with the rest."""
    daemon = daemon_factory(name="aside", start=False)
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace(f'revoke_url = "{emulator.url("revoke_url")}"',
                                          f'revoke_url = "{hostile}/revoke"'))
    daemon.state_dir.mkdir(mode=0o700)
    record = {"refresh_token": "rt-of-another-issuer", "client_id": "c"}
    (daemon.state_dir / "credentials.json").write_text(
        json.dumps({"version": 1, "credentials": {"oidc:https://idp.example.com:c": record}})[:-2])
    daemon.start()
    results = daemon.request("POST", "/v1/logout").json()["results"]
    aside = next(r for r in results if r["credential"].startswith("unreadable store"))
    assert aside["revoked"] is False and "not known" in aside["revoke_error"], aside
    assert not any("rt-of-another-issuer" in body for _, _, body in Hostile.seen)


def test_a_request_target_with_a_line_break_never_reaches_the_socket(daemon):
    from iapctl import wire

    with pytest.raises(ValueError):
        wire.request(daemon.socket, "GET", "/v1/token/demo-sa HTTP/1.1\r\n\r\nPOST /v1/reload")
    assert "reloaded the config" not in daemon.logs()


def test_text_from_an_issuer_reaches_the_terminal_escaped(daemon_factory, emulator, tmp_path):
    """An `email` claim with OSC 52 (a clipboard write) and a title set in it."""
    from test_client import CURL_BROWSER
    from test_oidc import KF, oidc_config

    emulator._post("oidc", {"user": "alice\x1b]52;c;ZXZpbA==\x07\x1b]0;owned\x07@example.com"})
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, KF), name="esc")
    env = env_of(daemon, tmp_path)
    login = iapctl("login", "kf", env={**env, "BROWSER": CURL_BROWSER})
    assert login.returncode == 0, login.stderr
    assert "alice\\x1b]52;c;ZXZpbA==\\x07" in login.stdout
    for out in (login, iapctl("status", env=env), iapctl("doctor", env=env)):
        assert "\x1b" not in out.stdout + out.stderr and "\x07" not in out.stdout + out.stderr, out


# systemd's ProcSubset=pid (no /proc/net/tcp) and RestrictAddressFamilies= without AF_NETLINK
# (no sock_diag), for real: a procfs mounted with subset=pid, and a seccomp filter.
PROC_SUBSET_PID = ["unshare", "-m", "sh", "-c", 'mount -t proc -o subset=pid proc /proc && exec "$@"', "sh"]
NO_NETLINK = [sys.executable, str(Path(__file__).parent / "no_netlink.py")]


def confined(*prefix: str) -> list[str]:
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip(f"cannot run {prefix[0]} here (needs root, Linux ≥ 5.8, x86_64 or aarch64)")
    return list(prefix)


def test_the_login_listener_tells_users_apart_where_proc_is_pid_only(daemon_factory, emulator, tmp_path):
    """Under ProcSubset=pid the kernel is asked over sock_diag instead: a login still completes
    from the browser, and another uid's connection is still refused."""
    daemon = daemon_factory(name="pidonly", start=False)
    daemon.start(prefix=confined(*PROC_SUBSET_PID))
    started = daemon.request("POST", "/v1/login/demo-user").json()
    assert started["paste_required"] is False
    stranger = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "curl", "-s",
                               "-o", "/dev/null", "-w", "%{http_code}", started["browser_url"]],
                              capture_output=True, text=True, timeout=30)
    assert stranger.stdout in ("000", ""), stranger  # refused before a byte was read
    subprocess.run(["curl", "-sSL", "-o", "/dev/null", started["browser_url"]], check=True, timeout=30)
    assert daemon.request("GET", "/v1/login/demo-user?wait=20").json()["state"] == "done"


def test_where_peers_cannot_be_told_apart_the_browser_alone_completes_no_login(daemon_factory, emulator, tmp_path):
    """With neither /proc/net/tcp (ProcSubset=pid) nor sock_diag (a seccomp filter), the peer
    check said "everyone is us", and whoever reached the callback first logged the user in as
    themselves."""
    daemon = daemon_factory(name="subset", start=False)
    daemon.start(prefix=[*confined(*PROC_SUBSET_PID), *confined(*NO_NETLINK)])
    started = daemon.request("POST", "/v1/login/demo-user").json()
    assert started["paste_required"] is True
    # Someone — anyone, here — follows the login to the listener's callback...
    landed = subprocess.run(["curl", "-sSL", "-o", "/dev/null", "-w", "%{url_effective}", started["browser_url"]],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert "code=" in landed
    # ...and that completes nothing by itself.
    assert daemon.request("GET", "/v1/login/demo-user?wait=1").json()["state"] == "pending"
    # The person pastes the address through the uid-checked socket: that completes it.
    done = daemon.request("POST", "/v1/login/demo-user/complete", {"redirect_url": landed}).json()
    assert done["state"] == "done", done


def test_an_ipv4_mapped_ipv6_client_of_ours_is_served_by_the_login_listener(daemon):
    """A browser (or curl) with an IPv6 socket reaches 127.0.0.1 as ::ffff:127.0.0.1; it is ours."""
    import re
    import socket

    started = daemon.request("POST", "/v1/login/demo-user").json()
    port = int(re.search(r"127\.0\.0\.1:(\d+)/", started["browser_url"]).group(1))
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(("::ffff:127.0.0.1", port))
        client.sendall(b"GET /nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = client.recv(4096)
    assert answer.startswith(b"HTTP/1.1 404"), answer  # served (its not-found page), not refused
    daemon.request("DELETE", "/v1/login/demo-user")


def test_a_symlinked_config_pointing_into_another_users_directory_is_refused(tmp_path):
    """Dotfile managers link ~/.config/iapd/config.toml elsewhere: where it points is judged too."""
    from iapd.config import ConfigError, load_config

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.toml").write_text("")
    os.chown(theirs, NOBODY, NOBODY)
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (mine / "config.toml").symlink_to(theirs / "config.toml")
    with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
        load_config(mine / "config.toml")


def test_a_discovery_document_that_names_a_plain_http_endpoint_elsewhere_is_refused(daemon_factory, emulator,
                                                                                   tmp_path, hostile):
    Hostile.answers["/.well-known/openid-configuration"] = discovery(hostile, token_endpoint="http://idp.invalid/token")
    daemon, env = start(daemon_factory, emulator, tmp_path, bot(hostile))
    resp = daemon.request("GET", "/v1/token/bot")
    assert resp.status == 502 and "is not https (nor loopback)" in resp.json()["message"], resp.body
