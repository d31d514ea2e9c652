"""A login is one thing: rotation, reuse detection, reloads and `via` never lose or leak it.
Each test here failed on the code before iapd.logins. They run the real daemon against issuers
that rotate refresh tokens and revoke the whole grant when a spent one comes back — as Okta,
Auth0 and Keycloak are usually set up for a CLI: the emulator's, and (the rotation cases) an
independent one, node-oidc-provider with rotation and reuse detection on."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import unquote_plus

import pytest

from conftest import OP_DIR, fill, wait_for
from iapd.jwt import unverified_claims
from test_client import CURL_BROWSER, DESKTOP, failed, iapctl
from test_emulator import desktop_secret
from test_oidc import KF, env_of, oidc_config

# Two profiles on one login: the ID token for one app, the access token for another.
TWO = KF + '''
[profiles.kf-api.oidc]
issuer = "@ISSUER@"
client_id = "kubeflow-cli"
scopes = ["openid", "email", "offline_access"]
token = "access_token"
'''


@dataclass
class Issuer:
    """A rotating issuer as the tests drive it: the emulator's, or node-oidc-provider."""

    name: str
    url: str
    client_id: str
    browser: str
    delay_next_token: Callable[[float], None]
    in_flight: Callable[[], int]
    max_in_flight: Callable[[], int]
    sign_in_as: Callable[[str], dict]  # the next login's person → extra environment for the browser

    def body(self, text: str) -> str:
        return text.replace("kubeflow-cli", self.client_id).replace("@ISSUER@", self.url)


def _emulated(emulator) -> Issuer:
    def sign_in_as(email: str) -> dict:
        emulator._post("oidc", {"user": email})
        return {}

    return Issuer("emulator", emulator.url("oidc_issuer"), "kubeflow-cli", CURL_BROWSER,
                  lambda s: emulator.fault("delay", endpoint="oidc_token", delay=s),
                  lambda: emulator.counters().get("in_flight:oidc_token", 0),
                  lambda: emulator.counters().get("max_in_flight:oidc_token", 0), sign_in_as)


def _node(op: str) -> Issuer:
    def hook(action: str, **query) -> dict:
        url = f"{op}/_test/{action}" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    hook("reset")
    return Issuer("node-oidc-provider", op, "public-cli", f"{sys.executable} {OP_DIR / 'person.py'} %s",
                  lambda s: hook("delay", ms=int(s * 1000)), lambda: hook("state")["inFlight"],
                  lambda: hook("state")["maxInFlight"],
                  lambda email: {"PERSON_LOGIN": email.split("@")[0]})


@pytest.fixture(params=["emulator", "node-oidc-provider"])
def issuer(request, emulator) -> Issuer:
    if request.param == "emulator":
        return _emulated(emulator)
    return _node(request.getfixturevalue("independent_op"))


def rotating_daemon(daemon_factory, emulator, tmp_path, issuer: Issuer | None = None, body: str = TWO,
                    name: str = "rot", settings: str = "", start: bool = True):
    issuer = issuer or _emulated(emulator)
    config = tmp_path / f"{name}.toml"
    config.write_text(emulator.config_path.read_text() + issuer.body(body))
    daemon = daemon_factory(config=config, name=name, daemon_settings=settings)
    env = env_of(daemon, tmp_path)
    login = iapctl("login", "kf", env={**env, "BROWSER": issuer.browser})
    assert login.returncode == 0, login.stderr
    return daemon, env


def oidc_record(daemon) -> dict:
    return daemon.record("oidc:")


def at_once(env, *profiles: str) -> list:
    with ThreadPoolExecutor(len(profiles)) as pool:
        return list(pool.map(lambda p: iapctl("token", p, env=env), profiles))


def test_two_profiles_on_one_rotating_login_asked_at_once_keep_it(daemon_factory, emulator, tmp_path, issuer):
    daemon, env = rotating_daemon(daemon_factory, emulator, tmp_path, issuer)
    # Right after the login, and twice more when both tokens are over: both at once.
    for offset in (0, 3600, 7200):
        daemon.set_clock(offset)
        outs = at_once(env, "kf", "kf-api", "kf", "kf-api")
        assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    assert daemon.profile_status("kf")["state"] == daemon.profile_status("kf-api")["state"] == "ready"
    # One refresh at a time per login: the issuer never saw two at once.
    assert issuer.max_in_flight() == 1


def test_a_clock_jump_that_makes_every_renewal_due_at_once_keeps_the_login(daemon_factory, emulator, tmp_path,
                                                                         issuer):
    daemon, env = rotating_daemon(daemon_factory, emulator, tmp_path, issuer)
    assert all(o.returncode == 0 for o in at_once(env, "kf", "kf-api"))
    # A suspend: both renewals are due together, in the background, with nobody waiting.
    daemon.set_clock(3000, mono_offset=3000)
    wait_for(lambda: daemon.profile_status("kf")["refresh_count"] == 2 and
             daemon.profile_status("kf-api")["refresh_count"] == 2, what="both background renewals")
    states = {daemon.profile_status(p)["state"] for p in ("kf", "kf-api")}
    assert states == {"ready"}, [daemon.profile_status(p) for p in ("kf", "kf-api")]
    daemon.set_clock(7200, mono_offset=7200)
    assert all(o.returncode == 0 for o in at_once(env, "kf", "kf-api"))


def test_a_login_during_a_renewal_wins(daemon_factory, emulator, tmp_path, issuer):
    live = emulator.state()["oidc"]["live_refresh_tokens"]  # the emulated issuer is shared with other tests
    daemon, env = rotating_daemon(daemon_factory, emulator, tmp_path, issuer, body=KF)
    assert iapctl("token", "kf", env=env).returncode == 0
    person = issuer.sign_in_as("bob@example.com")
    issuer.delay_next_token(2)  # the renewal's answer comes late
    daemon.set_clock(3600)
    renewal = threading.Thread(target=lambda: iapctl("token", "kf", env=env))
    renewal.start()
    wait_for(lambda: issuer.in_flight() == 1, what="the renewal to be at the issuer")
    login = iapctl("login", "kf", env={**env, **person, "BROWSER": issuer.browser})  # bob, during alice's renewal
    renewal.join(30)
    assert login.returncode == 0 and "bob@example.com" in login.stdout, login.stderr
    assert daemon.profile_status("kf")["identity"] == "bob@example.com"
    daemon.set_clock(7200)  # whatever is cached now is refreshed from the stored login: bob's
    out = iapctl("token", "kf", env=env)
    assert out.returncode == 0, out.stderr
    assert unverified_claims(out.stdout.strip())["email"] == "bob@example.com"
    if issuer.name == "emulator":  # alice's grant, which nobody keeps, is not left alive
        assert emulator.state()["oidc"]["live_refresh_tokens"] == live + 1


def test_a_failed_write_of_a_rotated_token_loses_nothing(daemon_factory, emulator, tmp_path, tiny_disk, issuer):
    config = tmp_path / "full.toml"
    config.write_text(emulator.config_path.read_text() + issuer.body(KF))
    daemon = daemon_factory(config=config, name="full", start=False)
    daemon.config.write_text(daemon.config.read_text().replace(f'state_dir = "{daemon.state_dir}"',
                                                               f'state_dir = "{tiny_disk}"'))
    daemon.state_dir = tiny_disk
    daemon.start()
    env = env_of(daemon, tmp_path)
    assert iapctl("login", "kf", env={**env, "BROWSER": issuer.browser}).returncode == 0
    spent = oidc_record(daemon)["refresh_token"]
    fill(tiny_disk)
    daemon.set_clock(3600)  # a refresh rotates the token; the write of the new one fails
    assert iapctl("token", "kf", env=env).returncode == 0
    assert oidc_record(daemon)["refresh_token"] == spent  # the disk could not take the new one
    assert "could not store the rotated refresh token" in daemon.logs()
    daemon.set_clock(7200)  # the next refresh presents the new token, from memory: not the spent one
    out = iapctl("token", "kf", env=env)
    assert out.returncode == 0, out.stderr
    (tiny_disk / "filler").unlink()  # space again: the next refresh writes what it holds
    daemon.set_clock(10800)
    assert iapctl("token", "kf", env=env).returncode == 0
    assert oidc_record(daemon)["refresh_token"] != spent
    daemon.stop()
    daemon.start()  # and a restarted daemon serves from the store, with no new login
    assert iapctl("token", "kf", env=env).returncode == 0


def test_a_stop_during_a_rotation_lets_it_finish_and_be_stored(daemon_factory, emulator, tmp_path, issuer):
    daemon, env = rotating_daemon(daemon_factory, emulator, tmp_path, issuer, body=KF)
    first = oidc_record(daemon)["refresh_token"]
    issuer.delay_next_token(1.5)
    daemon.set_clock(3600)
    asking = threading.Thread(target=lambda: iapctl("token", "kf", env=env))
    asking.start()
    wait_for(lambda: issuer.in_flight() == 1, what="the rotation to be at the issuer")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    asking.join(30)
    rotated = oidc_record(daemon)["refresh_token"]
    assert rotated != first  # the rotation finished and was stored before the daemon went
    daemon.start()
    out = iapctl("token", "kf", env=env)  # nothing cached: a refresh with the stored token works
    assert out.returncode == 0, out.stderr


def test_a_via_profile_needing_a_login_is_named_and_keeps_the_issuers_login(daemon_factory, emulator, tmp_path):
    body = KF + 'via = "demo-user"\n'
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, body), name="via")
    env = env_of(daemon, tmp_path)
    daemon.login("demo-user")
    assert iapctl("login", "kf", env={**env, "BROWSER": CURL_BROWSER}).returncode == 0
    kf_token = oidc_record(daemon)["refresh_token"]
    emulator.revoke_user()  # Google's side of the `via` profile is gone (a reauth policy, say)
    daemon.set_clock(3600)
    failed(iapctl("token", "kf", env=env), 4, "demo-user", "iapctl login demo-user")
    assert oidc_record(daemon)["refresh_token"] == kf_token  # the issuer's login is untouched
    assert daemon.profile_status("kf")["state"] != "login_required"
    daemon.login("demo-user")  # logging in the `via` profile is all it takes
    out = iapctl("token", "kf", env=env)
    assert out.returncode == 0, out.stderr


class Recorder(BaseHTTPRequestHandler):
    """An endpoint someone else controls: it records what is sent to it and says no."""

    seen: list[bytes] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        Recorder.seen.append(" ".join([body, unquote_plus(body), self.headers.get("Authorization") or ""]))
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "invalid_grant"}')

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/token"
    server.shutdown()


def test_a_config_that_names_another_token_endpoint_never_gets_the_stored_login(daemon, emulator, recorder):
    daemon.login()
    secret_and_token = [daemon.record(f"user:{DESKTOP}")["refresh_token"]]
    assert secret_and_token[0]
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace(f'token_url = "{emulator.url("token_url")}"', f'token_url = "{recorder}"'))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"] is True
    daemon.set_clock(3600)
    resp = daemon.request("GET", "/v1/token/demo-user")
    assert resp.status == 401 and resp.json()["error"] == "login_required", resp.body
    assert not any(secret_and_token[0] in body for body in Recorder.seen), "the refresh token was sent elsewhere"


def test_an_oidc_profile_with_another_token_endpoint_never_gets_the_stored_login(daemon_factory, emulator,
                                                                                 tmp_path, recorder):
    body = KF + KF.replace("[profiles.kf.oidc]", "[profiles.kf-elsewhere.oidc]") + f'token_endpoint = "{recorder}"\n'
    daemon, env = rotating_daemon(daemon_factory, emulator, tmp_path, body=body)
    stored = oidc_record(daemon)["refresh_token"]
    failed(iapctl("token", "kf-elsewhere", env=env), 4, "kf-elsewhere")
    assert not any(stored in body for body in Recorder.seen), "the refresh token was sent elsewhere"
    assert iapctl("token", "kf", env=env).returncode == 0  # the bound profile still works


def test_a_reload_applies_a_changed_secret_and_forgets_the_old_error(daemon_factory, emulator, tmp_path):
    right = desktop_secret(emulator)
    config = tmp_path / "fixed.toml"
    text = emulator.config_path.read_text()
    start = text.index("client_secret_name")
    end = text.index("\n", text.index("secret_manager_credentials"))
    config.write_text(text[:start] + f'client_secret = "{right}"' + text[end:])
    daemon = daemon_factory(config=config, name="secret")
    daemon.login()
    daemon.set_clock(3600)
    assert daemon.request("GET", "/v1/token/demo-user").status == 200
    daemon.config.write_text(daemon.config.read_text().replace(right, "not-the-secret"))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"] is True
    daemon.set_clock(7200)
    refused = daemon.request("GET", "/v1/token/demo-user")
    assert refused.status == 502 and "invalid_client" in refused.json()["message"], refused.body  # the new secret is used
    daemon.config.write_text(daemon.config.read_text().replace("not-the-secret", right))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"] is True
    assert daemon.request("GET", "/v1/token/demo-user").status == 200  # at once: no hour-long backoff


def test_application_default_credentials_are_read_again_when_the_file_changes(daemon_factory, emulator, tmp_path):
    adc = tmp_path / "adc.json"
    config = tmp_path / "adc.toml"
    config.write_text(emulator.config_path.read_text() + f'''
[profiles.ci]
audience = "123456789012-iap.apps.googleusercontent.com"
[profiles.ci.service_account]
kind = "adc"
''')
    daemon = daemon_factory(config=config, name="adc", daemon_settings="tick_seconds = 0.2",
                            env={"GOOGLE_APPLICATION_CREDENTIALS": str(adc)})
    missing = daemon.request("GET", "/v1/token/ci")
    assert missing.status == 422 and "does not exist" in missing.json()["message"]
    # `gcloud auth application-default login`, or a CI step that writes the key: no restart.
    adc.write_text((emulator.config_path.parent / "emulator-sa-key.json").read_text())
    wait_for(lambda: daemon.profile_status("ci")["state"] != "config_error", what="the file to be read again")
    assert daemon.request("GET", "/v1/token/ci").status == 200


def test_a_token_with_less_than_the_margin_left_is_never_served(daemon, emulator):
    daemon.login()
    old = daemon.token("demo-user")
    emulator.fault("delay", delay=1)  # the renewal the jump makes due is still out when we ask
    daemon.set_clock(3600 - 30)  # 30 s left: less than margin_seconds (60)
    new = daemon.token("demo-user")
    assert new != old  # it waited for the renewal rather than serve 30 s of token
    assert daemon.profile_status("demo-user")["expires_in"] > 3000


def test_a_fresh_token_with_less_than_the_margin_left_is_asked_again_not_served(daemon_factory, emulator, tmp_path):
    """An upstream whose cache hands back a token with seconds left (this metadata server
    keeps them to the end): iapd asks again, a few times, and serves only a token that keeps
    the margin promise — here none, so a clear error rather than 30 s of token."""
    from test_service_accounts import SOURCES, profiles

    emulator.settings(metadata_cache_until_left=0)
    metadata = f"{emulator.url('metadata_url')}/computeMetadata/v1/instance/service-accounts/default/identity"
    import requests

    requests.get(metadata, params={"audience": "123456789012-iap.apps.googleusercontent.com", "format": "full"},
                 headers={"Metadata-Flavor": "Google"}, timeout=10)  # the server's cache now holds one
    emulator.settings(clock_offset=3600 - 30)  # …with 30 s left by the server's clock
    daemon = daemon_factory(config=profiles(emulator, tmp_path, SOURCES), name="md30")
    counter = "metadata_identity:123456789012-iap.apps.googleusercontent.com"
    before = emulator.counters().get(counter, 0)
    resp = daemon.request("GET", "/v1/token/metadata")
    assert resp.status == 503 and "less than 60s left" in resp.json()["message"], resp.body
    assert emulator.counters()[counter] - before == 3  # asked again, bounded
    emulator.settings(metadata_cache=False)  # the upstream mints fresh ones again
    wait_for(lambda: daemon.request("GET", "/v1/token/metadata").status == 200, what="a fresh token after backoff")


def test_the_advertised_expiry_is_the_tokens_less_the_margin(daemon, emulator):
    daemon.login()
    served = daemon.request("GET", "/v1/token/demo-user?format=json").json()
    exp = unverified_claims(served["token"])["exp"]
    assert 3600 - 60 - 5 <= served["expires_in"] <= 3600 - 60
    import calendar
    import time

    at = calendar.timegm(time.strptime(served["expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    assert exp - 60 - 2 <= at <= exp - 60 + 1


def test_the_device_grant_keeps_polling_through_a_transient_failure(daemon_factory, emulator, tmp_path):
    import re
    import subprocess
    import sys

    from conftest import stop_process
    from test_client import IAPCTL
    from test_oidc import read_until

    emulator._post("oidc", {"device_interval": 1})
    body = KF.replace("[profiles.kf.oidc]", "[profiles.tv.oidc]") + 'grant = "device_code"\n'
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, body), name="devt")
    proc = subprocess.Popen([IAPCTL, "login", "tv"], env=env_of(daemon, tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        page = re.search(r"(http://\S+)", read_until(proc.stderr, "enter the code")).group(1)
        emulator.fault("503", endpoint="oidc_token", count=2)  # the issuer hiccups while we poll
        wait_for(lambda: emulator.counters().get("fault:oidc_token:503") == 2, what="the polls to meet the fault")
        subprocess.run(["curl", "-sSL", "-o", "/dev/null", page], check=True, timeout=30)
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0 and "Logged in as alice@example.com" in out, err


def test_a_configured_redirect_uri_is_sent_as_written(daemon_factory, emulator, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    body = KF + f'redirect_uri = "http://localhost:{port}/callback"\n'
    daemon = daemon_factory(config=oidc_config(emulator, tmp_path, body), name="redir")
    started = daemon.request("POST", "/v1/login/kf").json()
    from urllib.parse import parse_qs, urlsplit

    assert parse_qs(urlsplit(started["auth_url"]).query)["redirect_uri"] == [f"http://localhost:{port}/callback"]
    daemon.request("DELETE", "/v1/login/kf")


def test_the_emulated_issuer_revokes_the_grant_when_a_spent_token_is_revoked(daemon_factory, emulator, tmp_path):
    """As node-oidc-provider does: a spent token of a rotation family stands for the family."""
    import requests

    daemon, env = rotating_daemon(daemon_factory, emulator, tmp_path, body=KF)
    first = oidc_record(daemon)["refresh_token"]
    daemon.set_clock(3600)
    assert iapctl("token", "kf", env=env).returncode == 0  # rotated: `first` is spent
    issuer = emulator.url("oidc_issuer")
    assert requests.post(f"{issuer}/revoke", data={"token": first, "client_id": "kubeflow-cli"},
                         timeout=10).status_code == 200
    daemon.set_clock(7200)
    failed(iapctl("token", "kf", env=env), 4, "login required for profile kf")


def test_a_workload_identity_refusal_is_a_refusal_with_its_reason(daemon_factory, emulator, tmp_path):
    """STS says no with an OAuth error (google-auth raises OAuthError, not RefreshError): a
    permanent refusal that says why, not an "unexpected error" retried every two minutes."""
    from test_service_accounts import SOURCES, profiles

    daemon = daemon_factory(config=profiles(emulator, tmp_path, SOURCES), name="wifno")
    emulator.fault("invalid_grant", endpoint="sts")
    resp = daemon.request("GET", "/v1/token/wif")
    assert resp.status == 502 and resp.json()["error"] == "upstream_error", resp.body
    assert "STS" in resp.json()["message"] and "invalid_grant" in resp.json()["message"]
    assert daemon.profile_status("wif")["state"] == "refused"
    assert "unexpected error" not in daemon.logs()
