"""Any OpenID Connect issuer, from the same agent: the emulator's generic issuer (not Google-
shaped) end to end over the socket, with `iapctl` as a subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import self_signed_certificate, start_emulator, stop_process
from iapd.jwt import unverified_claims
from test_client import CURL_BROWSER, IAPCTL, failed, iapctl


def oidc_config(emulator, tmp_path, body: str, name: str = "oidc.toml") -> Path:
    path = tmp_path / name
    path.write_text(emulator.config_path.read_text() + body.replace("@ISSUER@", emulator.url("oidc_issuer")))
    return path


def bot_profile(emulator, name: str = "bot") -> str:
    secret = emulator.state()["oidc"]["client_secrets"]["ci-bot"]
    return (f'\n[profiles.{name}.oidc]\nissuer = "@ISSUER@"\nclient_id = "ci-bot"\nclient_secret = "{secret}"\n'
            'grant = "client_credentials"\nscopes = ["api"]\ntoken = "access_token"\naudience = "kubeflow"\n')


KF = '''
[profiles.kf.oidc]
issuer = "@ISSUER@"
client_id = "kubeflow-cli"
scopes = ["openid", "email", "offline_access"]
'''


def read_until(stream, needle: str) -> str:
    """What a process wrote on `stream` up to the line that holds `needle`."""
    said = ""
    while needle not in said:
        line = stream.readline()
        assert line, said
        said += line
    return said


def behind_front_iap(emulator, tmp_path, via: str, sa_profile: str = "demo-sa"):
    """flyteadmin's authorization server behind IAP: a second emulator whose IAP fronts the
    first one's issuer, and a config with its Google profiles (the service account named
    `sa_profile`) and `flyte`, reaching the issuer through that IAP with `via`."""
    front = start_emulator(tmp_path / "front", "--backend", emulator.info["secret_manager_url"])
    secret = emulator.state()["oidc"]["client_secrets"]["ci-bot"]
    config = tmp_path / "flyte.toml"
    config.write_text(front.config_path.read_text().replace("[profiles.demo-sa", f"[profiles.{sa_profile}") + f'''
[profiles.flyte.oidc]
issuer = "{front.url('iap_url')}/oidc"
client_id = "ci-bot"
client_secret = "{secret}"
grant = "client_credentials"
scopes = ["all"]
token = "access_token"
via = "{via}"
''')
    return front, config


def env_of(daemon, tmp_path, **extra) -> dict:
    return {**daemon.env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0", "XDG_STATE_HOME": str(tmp_path / "cs"),
            "DISPLAY": "", **extra}


@pytest.mark.parametrize("methods", [["client_secret_basic", "client_secret_post"], ["client_secret_post"],
                                     ["client_secret_basic"]])
def test_client_credentials_with_the_auth_method_discovery_offers(daemon_factory, emulator, tmp_path, methods):
    emulator._post("oidc", {"auth_methods": methods})
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, bot_profile(emulator)), name="cc")
    env = env_of(daemon, tmp_path)
    first = iapctl("token", "bot", env=env)
    assert first.returncode == 0 and first.stdout.startswith("opaque-"), first.stderr
    assert iapctl("token", "bot", env=env).stdout == first.stdout  # served from the cache
    assert emulator.counters()["oidc_token"] == 1
    status = daemon.profile_status("bot")
    assert status["state"] == "ready" and 3500 < status["expires_in"] <= 3600  # from expires_in: it is opaque
    assert status["identity"] == "client ci-bot" and status["mode"] == "oidc"


def test_authorization_code_with_pkce_then_rotation_with_reuse_detection(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, KF), name="kf")
    env = env_of(daemon, tmp_path)
    login = iapctl("login", "kf", env={**env, "BROWSER": CURL_BROWSER})
    assert login.returncode == 0 and login.stdout == "Logged in as alice@example.com (profile kf).\n", login.stderr
    claims = unverified_claims(iapctl("token", "kf", env=env).stdout.strip())
    assert claims["iss"] == emulator.url("oidc_issuer") and claims["aud"] == "kubeflow-cli"
    store = daemon.state_dir / "credentials.json"
    key = f"oidc:{emulator.url('oidc_issuer')}:kubeflow-cli"
    first_rt = json.loads(store.read_text())["credentials"][key]["refresh_token"]
    daemon.set_clock(3600)  # the ID token is over: a refresh, which rotates the refresh token
    assert iapctl("token", "kf", env=env).returncode == 0
    rotated = json.loads(store.read_text())["credentials"][key]["refresh_token"]
    assert rotated != first_rt  # the new one was stored
    # Someone replays the spent refresh token: the issuer revokes the whole family.
    secretless = {"grant_type": "refresh_token", "client_id": "kubeflow-cli", "refresh_token": first_rt}
    assert requests.post(emulator.url("oidc_issuer") + "/token", data=secretless, timeout=10).status_code == 400
    calls = emulator.counters()["oidc_token"]
    daemon.set_clock(7200)
    for _ in range(3):
        failed(iapctl("token", "kf", env=env), 4, "login required for profile kf", "iapctl login kf")
    assert emulator.counters()["oidc_token"] == calls + 1  # one refusal, then no retry storm


def test_device_grant_prints_the_code_and_completes_when_approved(daemon_factory, emulator, tmp_path):
    emulator._post("oidc", {"device_interval": 1, "slow_down_polls": 1})  # the first poll is told to slow down
    body = KF.replace("[profiles.kf.oidc]", "[profiles.tv.oidc]") + 'grant = "device_code"\n'
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, body), name="dev")
    proc = subprocess.Popen([IAPCTL, "login", "tv"], env=env_of(daemon, tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        said = read_until(proc.stderr, "enter the code")
        page = re.search(r"(http://\S+/device\?user_code=\S+)", said).group(1)
        code = re.search(r"enter the code (\d{4}-\d{4})", said).group(1)
        assert code in page
        assert requests.get(page, timeout=10).status_code == 200  # the person approves on their phone
        out, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    assert proc.returncode == 0 and out == "Logged in as alice@example.com (profile tv).\n", err
    assert unverified_claims(iapctl("token", "tv", env=env_of(daemon, tmp_path)).stdout.strip())["aud"] == "kubeflow-cli"
    gaps = emulator.state()["oidc"]["device_poll_gaps"]
    assert gaps and gaps[0] >= 5.9, gaps  # after slow_down: the interval (1 s) grew by 5 s


def test_logout_revokes_at_the_issuer(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, KF), name="out")
    env = env_of(daemon, tmp_path)
    assert iapctl("login", "kf", env={**env, "BROWSER": CURL_BROWSER}).returncode == 0
    live = emulator.state()["oidc"]["live_refresh_tokens"]
    out = iapctl("logout", "kf", env=env)
    assert out.returncode == 0 and "revoked at the issuer" in out.stdout, out.stdout
    assert emulator.state()["oidc"]["live_refresh_tokens"] == live - 1


def test_an_issuer_behind_iap_is_reached_via_another_profiles_token(emulator, daemon_factory, tmp_path):
    """flyteadmin's authorization server behind IAP: every request to the issuer carries
    Proxy-Authorization from the `via` profile — one agent, both tokens, no double login."""
    front, config = behind_front_iap(emulator, tmp_path, via="demo-sa")
    try:
        daemon = daemon_factory(config=config, name="via")
        out = iapctl("token", "flyte", env=env_of(daemon, tmp_path))
        assert out.returncode == 0 and out.stdout.startswith("opaque-"), out.stderr
        assert front.counters()["iap_admitted"] >= 2  # discovery and token, both through IAP
        assert emulator.counters()["oidc_token"] == 1
        # Without `via`, IAP stops it at the door.
        direct = daemon.config.read_text().split("[profiles.flyte.oidc]")[1].replace('via = "demo-sa"\n', "")
        with open(daemon.config, "a") as fh:
            fh.write("\n[profiles.direct.oidc]" + direct)
        assert daemon.request("POST", "/v1/reload").json()["reloaded"]
        failed(iapctl("token", "direct", env=env_of(daemon, tmp_path)), 5, "no discovery document")
    finally:
        stop_process(front.proc)


def test_the_config_refuses_a_via_loop_and_a_missing_profile(tmp_path):
    from iapd.config import ConfigError, load_config

    base = '[profiles.a.oidc]\nissuer = "https://a.example"\nclient_id = "a"\nvia = "{via}"\n'
    path = tmp_path / "c.toml"
    path.write_text(base.format(via="nope"))
    with pytest.raises(ConfigError, match="no profile named 'nope'"):
        load_config(path)
    path.write_text(base.format(via="b") + base.format(via="a").replace("profiles.a", "profiles.b"))
    with pytest.raises(ConfigError, match="is a loop"):
        load_config(path)


def test_token_formats_for_kubectl_and_other_callers(daemon_factory, emulator, tmp_path):
    import datetime

    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, bot_profile(emulator)), name="fmt")
    env = env_of(daemon, tmp_path)
    plain = iapctl("token", "bot", env=env).stdout.strip()
    assert iapctl("token", "bot", "--format", "header", env=env).stdout == f"Bearer {plain}\n"
    as_json = json.loads(iapctl("token", "bot", "--format", "json", env=env).stdout)
    assert as_json["token"] == plain and as_json["profile"] == "bot"
    cred = json.loads(iapctl("token", "bot", "--format", "exec-credential", env=env).stdout)
    # client.authentication.k8s.io/v1 ExecCredential, as kubectl's exec plugins return it
    assert cred["apiVersion"] == "client.authentication.k8s.io/v1" and cred["kind"] == "ExecCredential"
    assert set(cred["status"]) == {"token", "expirationTimestamp"} and cred["status"]["token"] == plain
    expiry = datetime.datetime.strptime(cred["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    left = expiry.replace(tzinfo=datetime.timezone.utc).timestamp() - time.time()
    assert 3000 < left <= 3600
    failed(iapctl("token", "nope", "--format", "json", env=env), 5, "no profile named 'nope'")


def test_the_flytekit_plugin_through_flytekits_own_get_authenticator(daemon, emulator, monkeypatch):
    from flytekit.clients.auth_helper import get_authenticator
    from flytekit.configuration import PlatformConfig

    for key in ("IAPD_SOCKET", "IAPD_CONFIG"):
        monkeypatch.setenv(key, daemon.env[key])
    monkeypatch.setenv("IAPD_AUTOSTART", "0")
    cfg = PlatformConfig(endpoint="dns:///flyte.example.com", auth_mode="iapd", command=["iapctl", "token", "demo-sa"])
    auth = get_authenticator(cfg, None)  # found through the flytekit.auth entry point
    assert type(auth).__name__ == "IapdAuthenticator"
    auth.refresh_credentials()  # in process: a request on the socket, no subprocess
    key, value = auth.fetch_grpc_call_auth_metadata()
    assert key == "authorization" and value.startswith("Bearer ")
    assert unverified_claims(value[7:])["email"] == "demo-ci@iapd-demo.iam.gserviceaccount.com"
    cfg = PlatformConfig(endpoint="dns:///flyte.example.com", auth_mode="iapd", command=["iapctl", "token", "nope"])
    from flytekit.clients.auth.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="no profile named 'nope'"):
        get_authenticator(cfg, None).refresh_credentials()


def test_flyte_behind_iap_without_the_double_login(emulator, daemon_factory, tmp_path, monkeypatch):
    """proxyCommand (IAP's token) and ExternalCommand (flyteadmin's, fetched through IAP with the
    first) both from iapd, through flytekit's own authenticators."""
    from flytekit.clients.auth_helper import get_authenticator, get_proxy_authenticator
    from flytekit.configuration import PlatformConfig

    front, config = behind_front_iap(emulator, tmp_path, via="flyte-iap", sa_profile="flyte-iap")
    try:
        daemon = daemon_factory(config=config, name="flyte")
        for key in ("IAPD_SOCKET", "IAPD_CONFIG"):
            monkeypatch.setenv(key, daemon.env[key])
        monkeypatch.setenv("IAPD_AUTOSTART", "0")
        cfg = PlatformConfig(endpoint="dns:///flyte.example.com", auth_mode="ExternalCommand",
                             command=[IAPCTL, "token", "flyte"], proxy_command=[IAPCTL, "token", "flyte-iap"])
        admin, proxy = get_authenticator(cfg, None), get_proxy_authenticator(cfg)
        admin.refresh_credentials()
        proxy.refresh_credentials()
        assert admin.fetch_grpc_call_auth_metadata()[1].startswith("Bearer opaque-")
        header, value = proxy.fetch_grpc_call_auth_metadata()
        assert header == "proxy-authorization"
        through = requests.get(front.url("iap_url") + "/oidc/.well-known/openid-configuration", timeout=10,
                               headers={"Proxy-Authorization": value,
                                        "Authorization": admin.fetch_grpc_call_auth_metadata()[1]})
        assert through.status_code == 200  # IAP let it through; flyteadmin's token rode along
        assert front.counters()["iap_admitted"] >= 3 and emulator.counters()["oidc_token"] == 1
    finally:
        stop_process(front.proc)


def test_kubeflow_behind_an_oauth2_proxy_like_gateway(daemon_factory, emulator, tmp_path):
    """Programmatic access to Kubeflow: the issuer's ID token as a bearer, which the gateway
    verifies (JWKS signature, iss, aud, exp) — no scraped session cookie."""
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, KF), name="gw")
    env = env_of(daemon, tmp_path)
    assert iapctl("login", "kf", env={**env, "BROWSER": CURL_BROWSER}).returncode == 0
    header = iapctl("token", "kf", "--format", "header", env=env).stdout.strip()
    app = requests.get(emulator.url("gateway_url") + "/pipeline/apis/v2beta1/runs", headers={"Authorization": header},
                       timeout=10)
    assert app.status_code == 200 and app.json()["headers"]["X-Auth-Request-Email"] == "alice@example.com"
    assert requests.get(emulator.url("gateway_url"), headers={"Accept": "application/json"}, timeout=10).status_code == 401
    browser = requests.get(emulator.url("gateway_url"), allow_redirects=False, timeout=10)
    assert browser.status_code == 302 and browser.headers["Location"].startswith(emulator.url("oidc_issuer") + "/auth?")
    forged = header[:-4] + ("AAAA" if not header.endswith("AAAA") else "BBBB")
    assert requests.get(emulator.url("gateway_url"), headers={"Authorization": forged}, timeout=10).status_code == 401


@pytest.mark.skipif(__import__("shutil").which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_takes_its_credential_from_iapctl(daemon_factory, emulator, tmp_path):
    """kubectl's exec credential plugin is `iapctl token P --format exec-credential`, against a
    stub API server that records what kubectl sends."""
    import http.server
    import ssl
    import threading

    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, bot_profile(emulator)), name="kube")
    seen: list[str] = []

    class APIServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps({"major": "1", "minor": "30", "gitVersion": "v1.30.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    # client-go runs exec plugins only for TLS servers: a self-signed certificate for 127.0.0.1.
    cert, key = self_signed_certificate(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), APIServer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": f"https://127.0.0.1:{server.server_address[1]}",
                                               "certificate-authority": str(cert)}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "me"}}],
        "users": [{"name": "me", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": IAPCTL,
            "args": ["token", "bot", "--format", "exec-credential"], "interactiveMode": "Never",
            "env": [{"name": k, "value": daemon.env[k]} for k in ("IAPD_SOCKET", "IAPD_CONFIG")]}}}],
    }))
    try:
        out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "get", "--raw", "/version"],
                             capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                              "HOME": str(tmp_path)})
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    token = iapctl("token", "bot", env=env_of(daemon, tmp_path)).stdout.strip()
    assert seen and seen[-1] == f"Bearer {token}"


def test_an_issuer_without_openid_discovery_is_found_by_rfc_8414(daemon_factory, emulator, tmp_path):
    plain = bot_profile(emulator).replace('issuer = "@ISSUER@"', f'issuer = "{emulator.url("secret_manager_url")}/oauth-only"')
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, plain), name="8414")
    out = iapctl("token", "bot", env=env_of(daemon, tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("opaque-"), out.stderr
    counters = emulator.counters()
    assert counters["oauth_metadata"] == 1 and counters.get("oidc_discovery", 0) == 0
