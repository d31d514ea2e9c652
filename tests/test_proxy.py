"""The local proxy that adds a profile's token, for tools that cannot run `iapctl`: curl, requests
and a WebSocket client through it to the emulated IAP's backend; who may use it; what is never
forwarded; a 5 GB download in flat memory."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess

import aiohttp
import pytest
import requests

from conftest import self_signed_certificate, wait_for

DEMO_CI = "demo-ci@iapd-demo.iam.gserviceaccount.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_proxy(emulator, tmp_path, profile: str = "demo-sa", upstream: str | None = None, extra: str = "",
               listen: str | None = None) -> tuple:
    port = free_port()
    listen = listen or f"127.0.0.1:{port}"
    config = tmp_path / "proxy.toml"
    config.write_text(emulator.config_path.read_text() + f'''
[profiles.{profile}.proxy]
listen = "{listen}"
upstream = "{upstream or emulator.url("iap_url")}"
{extra}''')
    return config, f"http://{listen}"


@pytest.fixture
def proxied(daemon_factory, emulator, tmp_path):
    config, url = with_proxy(emulator, tmp_path)
    daemon = daemon_factory(config=config, name="px")
    return daemon, url


def test_curl_and_requests_reach_the_app_behind_iap_through_the_proxy(proxied, emulator):
    daemon, url = proxied
    out = subprocess.run(["curl", "-sS", "-H", "Authorization: Bearer the-apps-own", f"{url}/api/v1/projects?x=1"],
                         capture_output=True, text=True, timeout=30)
    echo = json.loads(out.stdout)
    assert echo["user"] == f"accounts.google.com:{DEMO_CI}" and echo["path"] == "/api/v1/projects?x=1"
    # The token went in Proxy-Authorization (IAP strips it): the app's own Authorization is kept.
    assert echo["headers"]["Authorization"] == "Bearer the-apps-own" and "Proxy-Authorization" not in echo["headers"]

    def chunks():  # a streamed upload, chunked: never held whole by the proxy
        for _ in range(64):
            yield b"x" * 65536

    up = requests.post(f"{url}/_upload", data=chunks(), timeout=30)
    assert up.status_code == 200 and up.json() == {"received": 64 * 65536, "user": f"accounts.google.com:{DEMO_CI}",
                                                    "chunked": True}
    status = daemon.profile_status("demo-sa")["proxy"]
    assert status["state"] == "listening" and status["upstream"] == emulator.url("iap_url") and status["served"] >= 2


def test_a_websocket_goes_through_the_proxy_and_iap(proxied):
    _, url = proxied

    async def talk() -> list[str]:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{url}/_ws") as ws:
                said = [(await ws.receive()).data]
                await ws.send_str("ping over iap")
                said.append((await ws.receive()).data)
                return said

    assert asyncio.run(talk()) == [f"hello accounts.google.com:{DEMO_CI}", "ping over iap"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_another_uid_is_refused(proxied):
    _, url = proxied
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS", "-o",
                          "/dev/null", "-w", "%{http_code}", f"{url}/"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and out.stdout in ("", "000"), (out.returncode, out.stdout, out.stderr)
    assert requests.get(f"{url}/", timeout=10).status_code == 200  # and we are still let in


def test_a_foreign_host_and_a_browser_origin_are_refused(daemon_factory, emulator, tmp_path):
    config, url = with_proxy(emulator, tmp_path, extra='allow_origins = ["http://localhost:3000"]')
    daemon_factory(config=config, name="origin")
    rebinding = requests.get(f"{url}/", headers={"Host": "evil.example:80"}, timeout=10)
    assert rebinding.status_code == 421 and "not this proxy's own" in rebinding.text
    page = requests.get(f"{url}/", headers={"Origin": "https://evil.example"}, timeout=10)
    assert page.status_code == 403 and "allow_origins" in page.text
    assert requests.get(f"{url}/", headers={"Origin": "http://localhost:3000"}, timeout=10).status_code == 200
    # A page's <img src=…> sends no Origin, but its browser says it came from a page.
    embedded = requests.get(f"{url}/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, timeout=10)
    assert embedded.status_code == 403 and "Sec-Fetch-Site" in embedded.text
    assert requests.get(f"{url}/", headers={"Sec-Fetch-Site": "none"}, timeout=10).status_code == 200  # typed in
    assert requests.get(url.replace("127.0.0.1", "localhost") + "/", timeout=10).status_code == 200


@pytest.mark.parametrize("header", ["proxy-authorization", "authorization"])
def test_hop_by_hop_headers_and_the_callers_proxy_authorization_are_not_forwarded(daemon_factory, emulator, tmp_path,
                                                                                   header):
    config, url = with_proxy(emulator, tmp_path, upstream=emulator.url("backend_url"), extra=f'header = "{header}"')
    daemon_factory(config=config, name="hop")
    resp = requests.get(f"{url}/x", headers={"Proxy-Authorization": "Basic bWFsbG9yeQ==", "Connection": "X-Secret",
                                             "X-Secret": "1", "Keep-Alive": "timeout=5", "TE": "trailers"}, timeout=10)
    headers = resp.json()["headers"]
    token_header = "Proxy-Authorization" if header == "proxy-authorization" else "Authorization"
    assert headers[token_header].startswith("Bearer ey")
    # The caller's own never goes on, whichever header carries the token (the values are not shown).
    assert "bWFsbG9yeQ" not in json.dumps(headers), "the caller's Proxy-Authorization was forwarded"
    assert not {"X-Secret", "Keep-Alive", "TE"} & set(headers), sorted(headers)


def test_no_token_is_a_503_naming_the_login_and_no_upstream_a_502(daemon_factory, emulator, tmp_path):
    config, url = with_proxy(emulator, tmp_path, profile="demo-user")
    daemon_factory(config=config, name="nologin")
    resp = requests.get(f"{url}/", timeout=10)
    assert resp.status_code == 503 and "run `iapctl login demo-user`" in resp.text
    assert resp.text.count("\n") == 1  # one line
    config, url = with_proxy(emulator, tmp_path, upstream=f"http://127.0.0.1:{free_port()}")
    daemon_factory(config=config, name="down")
    resp = requests.get(f"{url}/", timeout=10)
    assert resp.status_code == 502 and "cannot reach" in resp.text


def test_a_token_the_app_refuses_early_is_renewed_once_and_the_request_retried(proxied, emulator):
    daemon, url = proxied
    assert requests.get(f"{url}/", timeout=10).status_code == 200
    calls = emulator.counters()["token"]
    # IAP's clock moves past the token's end while the daemon's still says it is good: the app
    # refuses it (as for a token revoked early). The token is 20 s old on the daemon's clock.
    emulator.settings(clock_offset=3700)
    daemon.set_clock(0, 20)
    assert requests.get(f"{url}/", timeout=10).status_code == 200  # a new token, one retry
    assert emulator.counters()["token"] == calls + 1
    # A request with a body is not replayed: the 401 is passed through (after a new token is due).
    emulator.settings(clock_offset=7400)
    daemon.set_clock(0, 40)
    refused = requests.post(f"{url}/", data=b"once", timeout=10)
    assert refused.status_code == 401 and "expired" in refused.text
    assert emulator.counters()["token"] == calls + 1


def test_a_proxy_starts_and_stops_with_its_profile_on_reload(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory(name="reload")
    port = free_port()
    with open(daemon.config, "a") as fh:
        fh.write(f'\n[profiles.demo-sa.proxy]\nlisten = "127.0.0.1:{port}"\nupstream = "{emulator.url("iap_url")}"\n')
    token_before = daemon.token("demo-sa")
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    assert daemon.token("demo-sa") == token_before  # adding a proxy kept the profile's token
    text = daemon.config.read_text()
    daemon.config.write_text(text[:text.index("\n[profiles.demo-sa.proxy]")] + "\n")
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=10)
    assert daemon.profile_status("demo-sa")["proxy"] is None


def test_a_unix_socket_proxy_is_private(daemon_factory, emulator, tmp_path):
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    path = folder / "app.sock"
    config, _ = with_proxy(emulator, tmp_path, listen=str(path))
    daemon_factory(config=config, name="unix")
    wait_for(lambda: path.exists(), what="the proxy's socket")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(path), "http://localhost/whoami"], capture_output=True,
                         text=True, timeout=30)
    assert json.loads(out.stdout)["user"] == f"accounts.google.com:{DEMO_CI}"


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def test_a_5_gb_download_streams_through_in_flat_memory(daemon_factory, emulator, tmp_path):
    """A generated body (no file), straight from the app (no IAP in between: the proxy is what is
    measured): the daemon's peak RSS grows by a few MiB, not by gigabytes."""
    config, url = with_proxy(emulator, tmp_path, upstream=emulator.url("backend_url"))
    daemon = daemon_factory(config=config, name="big")
    assert requests.get(f"{url}/_bytes/1048576", timeout=10).status_code == 200  # warm: buffers, TLS-free path
    before = peak_rss_kib(daemon.proc.pid)
    size = 5 * 1024 ** 3
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                          f"{url}/_bytes/{size}"], capture_output=True, text=True, timeout=600)
    assert out.stdout == f"200 {size}", (out.stdout, out.stderr)
    grown = peak_rss_kib(daemon.proc.pid) - before
    print(f"5 GB through the proxy: peak RSS +{grown} KiB")
    assert grown < 32 * 1024, f"peak RSS grew by {grown} KiB for a 5 GB download"


def test_status_and_doctor_show_the_proxy_and_a_port_in_use(daemon_factory, emulator, tmp_path):
    from test_client import iapctl
    from test_oidc import env_of

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        config, _ = with_proxy(emulator, tmp_path, listen=f"127.0.0.1:{busy.getsockname()[1]}")
        daemon = daemon_factory(config=config, name="busy")
        env = env_of(daemon, tmp_path)
        out = iapctl("status", env=env).stdout
        assert f"proxy demo-sa: 127.0.0.1:{busy.getsockname()[1]} → {emulator.url('iap_url')} (error: cannot listen" in out
        doctor = iapctl("doctor", env=env)
        assert doctor.returncode == 1 and "PROBLEM  proxy demo-sa: cannot listen on" in doctor.stdout
        assert daemon.token("demo-sa")  # the rest of the daemon serves
    finally:
        busy.close()


def test_the_network_proxy_is_taken_from_the_environment_once(monkeypatch):
    from iapd.proxy import network_proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://corp-proxy:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example.com")
    assert network_proxy_for("https://app.example.com") == "http://corp-proxy:3128"
    assert network_proxy_for("https://internal.example.com") is None


def test_a_client_that_leaves_mid_download_costs_nothing(daemon_factory, emulator, tmp_path):
    config, url = with_proxy(emulator, tmp_path, upstream=emulator.url("backend_url"))
    daemon = daemon_factory(config=config, name="leave")
    with requests.get(f"{url}/_bytes/{1024 ** 3}", stream=True, timeout=10) as resp:
        assert resp.status_code == 200
        next(resp.iter_content(65536))
    # The daemon goes on serving, and said nothing worse than a line about it.
    assert requests.get(f"{url}/x", timeout=10).status_code == 200
    assert "Traceback" not in daemon.logs()


def test_where_peers_cannot_be_told_apart_a_tcp_proxy_does_not_start(daemon_factory, emulator, tmp_path):
    """Fail closed: with neither sock_diag nor /proc/net/tcp (systemd's ProcSubset=pid and
    RestrictAddressFamilies=) nobody's uid can be told on TCP loopback, so the TCP proxy stays
    down and says why; a unix-socket proxy (0600) serves on."""
    from test_trust import NO_NETLINK, PROC_SUBSET_PID, confined

    unix = tmp_path / "px.sock"
    config, _ = with_proxy(emulator, tmp_path, extra=f'\n[profiles.demo-user.proxy]\nlisten = "{unix}"\n'
                                                     f'upstream = "{emulator.url("iap_url")}"\n')
    daemon = daemon_factory(config=config, name="closed", start=False)
    daemon.start(prefix=[*confined(*PROC_SUBSET_PID), *confined(*NO_NETLINK)])
    proxies = {p["name"]: p["proxy"] for p in daemon.status()["profiles"] if p["proxy"]}
    assert proxies["demo-sa"]["state"] == "error" and "cannot tell who connects over TCP" in proxies["demo-sa"]["error"]
    assert proxies["demo-user"]["state"] == "listening", proxies


# -- the upstream over TLS, through a corporate proxy -----------------------------------------

@pytest.fixture
def tls_app(tmp_path):
    """An HTTPS app on localhost that answers with the headers it got, and a CONNECT proxy that
    records what it sees in the clear (a corporate proxy): (app port, proxy port, CA file, seen)."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from socketserver import StreamRequestHandler, ThreadingTCPServer

    cert, key = self_signed_certificate(tmp_path, "localhost")

    class App(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(dict(self.headers)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    app = ThreadingHTTPServer(("127.0.0.1", 0), App)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    # The handshake in the handler's thread, not in accept(): a stalled one must not stall the server.
    app.socket = context.wrap_socket(app.socket, server_side=True, do_handshake_on_connect=False)
    seen: list[bytes] = []

    class Connect(StreamRequestHandler):
        def handle(self):
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = self.rfile.readline()
                if not line:
                    return
                head += line
            seen.append(head)
            target = head.split()[1].decode()
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection(("127.0.0.1" if host == "localhost" else host, int(port)), timeout=10)
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()

            def pipe(src, dst):
                try:
                    while chunk := src.recv(65536):
                        dst.sendall(chunk)
                except OSError:
                    pass
                finally:
                    dst.close()

            threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True).start()
            pipe(self.connection, upstream)

    ThreadingTCPServer.allow_reuse_address = True
    proxy = ThreadingTCPServer(("127.0.0.1", 0), Connect)
    proxy.daemon_threads = True
    for server in (app, proxy):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield app.server_address[1], proxy.server_address[1], cert, seen
    for server in (app, proxy):
        server.shutdown()


def test_a_tls_upstream_is_verified_and_reached_through_the_daemons_corporate_proxy(daemon_factory, emulator,
                                                                                  tmp_path, tls_app):
    """The upstream over TLS, its certificate checked against the trust store `[daemon]
    environment` names (SSL_CERT_FILE), through the HTTPS_PROXY it names: the corporate proxy
    sees a CONNECT and no token; the app sees the token. With the system's trust store alone the
    test CA's certificate is refused: a 502, no token sent."""
    app_port, proxy_port, ca, seen = tls_app
    config, url = with_proxy(emulator, tmp_path, upstream=f"https://localhost:{app_port}")
    network = f'HTTPS_PROXY = "http://127.0.0.1:{proxy_port}", NO_PROXY = "127.0.0.1"'
    daemon = daemon_factory(f'environment = {{ SSL_CERT_FILE = "{ca}", {network} }}\n', config=config, name="tls")
    resp = requests.get(f"{url}/app", timeout=20)
    assert resp.status_code == 200, resp.text
    token = daemon.token("demo-sa")
    # Compared as booleans: a failing comparison must not print a token into the test output.
    app_got_the_token = resp.json().get("Proxy-Authorization") == f"Bearer {token}"
    assert app_got_the_token, "the app behind the proxy did not get the profile's token"
    assert len(seen) == 1 and seen[0].startswith(f"CONNECT localhost:{app_port} HTTP/1.1".encode()), len(seen)
    proxy_saw_a_token = b"Bearer" in seen[0] or token.encode() in seen[0]
    assert not proxy_saw_a_token, "the corporate proxy saw the token in the clear"

    config, url = with_proxy(emulator, tmp_path, upstream=f"https://localhost:{app_port}")  # a port of its own
    daemon_factory(f"environment = {{ {network} }}\n", config=config, name="tls-untrusted")
    refused = requests.get(f"{url}/app", timeout=20)
    assert refused.status_code == 502 and "certificate" in refused.text.lower(), refused.text
