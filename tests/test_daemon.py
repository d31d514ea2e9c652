"""iapd serve, as a subprocess on its real unix socket, against the emulator over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import wait_for
from iapd.jwt import unverified_claims

DESKTOP = "123456789012-desktop.apps.googleusercontent.com"
IAP = "123456789012-iap.apps.googleusercontent.com"
ALLOWLIST_PROFILE = f"""
[profiles.allowlist]
[profiles.allowlist.user]
client_id = "{DESKTOP}"
client_secret_name = "projects/iapd-demo/secrets/iap-desktop-client-secret/versions/latest"
"""


def with_allowlist_profile(emulator, tmp_path):
    path = tmp_path / "with-allowlist.toml"
    text = emulator.config_path.read_text()
    adc = str(emulator.config_path.parent / "emulator-adc.json")
    path.write_text(text + ALLOWLIST_PROFILE + f'secret_manager_credentials = "{adc}"\n')
    return path


def iap_admits(emulator, token: str) -> bool:
    resp = requests.get(emulator.url("iap_url") + "/", headers={"Proxy-Authorization": f"Bearer {token}"}, timeout=10)
    return resp.status_code == 200


def test_login_then_tokens_with_audience_pass_iap(daemon, emulator):
    cold = daemon.request("GET", "/v1/token/demo-user")
    assert cold.status == 401 and cold.json()["error"] == "login_required"
    result = daemon.login()
    assert result == {"profile": "demo-user", "state": "done", "email": "demo@example.com"}
    token = daemon.token("demo-user")
    claims = unverified_claims(token)
    assert claims["aud"] == IAP and claims["azp"] == DESKTOP and claims["email"] == "demo@example.com"
    assert iap_admits(emulator, token)
    assert daemon.token("demo-user") == token  # cached: no second refresh
    assert emulator.counters()[f"refresh:{IAP}"] == 1


def test_allowlist_mode_and_shared_login(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory(config=with_allowlist_profile(emulator, tmp_path))
    daemon.login("allowlist")
    # demo-user uses the same desktop client: no second login, no second browser flow.
    user = unverified_claims(daemon.token("demo-user"))
    allow = unverified_claims(daemon.token("allowlist"))
    assert user["aud"] == IAP and allow["aud"] == DESKTOP and allow["azp"] == DESKTOP
    assert iap_admits(emulator, daemon.token("allowlist"))
    assert emulator.counters()["auth"] == 1
    statuses = {p["name"]: p for p in daemon.status()["profiles"]}
    assert statuses["allowlist"]["mode"] == "allowlist" and statuses["demo-user"]["mode"] == "audience"


def test_restarted_daemon_serves_without_new_login_and_reads_secret_once(daemon, emulator):
    daemon.login()
    daemon.token("demo-user")
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket)  # a clean shutdown removes its socket
    daemon.start()
    second = daemon.token("demo-user")  # a fresh refresh (within one second it may equal the first)
    assert iap_admits(emulator, second)
    counters = emulator.counters()
    assert counters["auth"] == 1 and counters["secret_manager"] == 1 and counters[f"refresh:{IAP}"] == 2


def test_store_and_socket_modes(daemon):
    daemon.login()
    store = daemon.state_dir / "credentials.json"
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(daemon.socket)).st_mode) == 0o700
    record = daemon.record(f"user:{DESKTOP}")
    assert record["email"] == "demo@example.com" and record["refresh_token"]


SHORT = """
renew_before_seconds = 2.5
margin_seconds = 1
tick_seconds = 0.5
backoff_initial_seconds = 0.1
backoff_cap_seconds = 0.4
"""


def test_renewal_before_expiry_and_never_inside_margin(daemon_factory, emulator):
    """Four hours of Google's one-hour tokens under the default policy, the daemon's and the
    emulator's clocks moved five minutes a step (a step is narrower than the gap between the
    renewal window, 12–15 minutes, and the 60 s margin, as real time is): every token served
    keeps the margin by the IdP's own clock, every renewal ran ahead of a request (none waited),
    about one per renewal cycle."""
    daemon = daemon_factory("")
    daemon.login()
    daemon.token("demo-user")
    emulator._post("reset_counters")
    waited = daemon.profile_status("demo-user")["waited_requests"]
    seen = set()
    for step in range(1, 4 * 12 + 1):
        offset = step * 300
        emulator.settings(clock_offset=offset)
        daemon.set_clock(offset, offset)  # a suspend's worth: both clocks
        token = daemon.token("demo-user")
        seen.add(token)
        left = unverified_claims(token)["exp"] - (time.time() + offset)
        assert left > 60, f"served a token with {left:.0f}s left at step {step} (the margin is 60s)"
        # A renewal that came due lands before the next step, as it would in real time.
        wait_for(lambda: daemon.profile_status("demo-user")["next_renewal_in"] != 0, what="a due renewal")
    refreshes = emulator.counters()[f"refresh:{IAP}"]
    # 240 minutes, renewed with 12–15 of 60 left (every 45–48): 5 renewals, give or take one.
    assert 4 <= refreshes <= 6 and len(seen) == refreshes + 1, (refreshes, len(seen))
    status = daemon.profile_status("demo-user")
    assert status["waited_requests"] == waited, "a request waited on the IdP"
    assert status["state"] == "ready"


def test_transient_failures_keep_serving_the_valid_token(daemon_factory, emulator):
    daemon = daemon_factory(SHORT + "renew_fraction = 0.1\n")
    daemon.login()
    first = daemon.token("demo-user")
    emulator.fault("500", count=2)
    emulator.fault("429", count=1)
    emulator.fault("drop", count=1)
    daemon.set_clock(3600 - 2.4)  # 2.4 s left by the wall clock: renewal is due now
    # While the IdP fails — after each fault has been hit, not before the first — every request
    # still gets the valid token, at once.
    for fault in ("fault:token:500", "fault:token:429", "fault:token:drop"):
        wait_for(lambda: emulator.counters().get(fault), what=f"{fault} to be hit")
        assert daemon.token("demo-user") == first
    status = wait_for(lambda: (s := daemon.profile_status("demo-user"))["refresh_count"] == 2 and s, what="recovery")
    assert status["state"] == "ready" and status["last_error"] is None and status["expires_in"] > 3000
    assert iap_admits(emulator, daemon.token("demo-user"))
    assert emulator.counters()["token"] >= 5  # four failures, then the renewal


@pytest.mark.parametrize("kind, needle", [("invalid_grant", "expired or was revoked"),
                                          ("invalid_rapt", "reauthentication policy")])
def test_invalid_grant_means_login_required_with_one_call(daemon, emulator, kind, needle):
    daemon.login()
    daemon.token("demo-user")
    emulator._post("reset_counters")
    emulator.fault(kind)
    daemon.set_clock(3600)  # the token has expired by the wall clock: a refresh is needed
    for _ in range(3):
        resp = daemon.request("GET", "/v1/token/demo-user")
        assert resp.status == 401 and resp.json()["error"] == "login_required" and needle in resp.json()["message"]
    assert emulator.counters()["token"] == 1
    status = daemon.profile_status("demo-user")
    assert status["state"] == "login_required" and needle in status["last_error"]["message"]
    store = daemon.record(f"user:{DESKTOP}")
    assert store["refresh_token"] is None
    assert daemon.login()["state"] == "done"  # a new login clears it
    assert iap_admits(emulator, daemon.token("demo-user"))


def test_wall_clock_jumps_never_serve_an_expired_token(daemon, emulator):
    daemon.login()
    first = daemon.token("demo-user")
    daemon.set_clock(2 * 3600)  # resumed from a two-hour suspend
    after_suspend = daemon.token("demo-user")
    assert emulator.counters()[f"refresh:{IAP}"] == 2  # (within one second the new token may equal the old)
    assert unverified_claims(after_suspend)["exp"] >= unverified_claims(first)["exp"]
    # The clock is set back two hours, and the token then really runs out (a short one here):
    # by the wall clock it would have two hours left; the monotonic clock knows it has none.
    emulator.settings(token_lifetime=4)
    daemon.set_clock(3 * 3600)  # the one-hour token is over: a 4-second one comes
    short = daemon.token("demo-user")
    assert unverified_claims(short)["exp"] - unverified_claims(short)["iat"] == 4
    refreshes = emulator.counters()[f"refresh:{IAP}"]
    daemon.set_clock(-2 * 3600)
    time.sleep(max(0.0, unverified_claims(short)["exp"] - time.time()) + 0.5)  # real time: the thing under test
    backwards = daemon.token("demo-user")
    # At least one refresh (a 4-second token may be renewed once more in the background while
    # we slept, on a loaded machine); what matters is that the token served is not expired.
    assert emulator.counters()[f"refresh:{IAP}"] >= refreshes + 1
    assert unverified_claims(backwards)["exp"] > time.time()
    assert iap_admits(emulator, backwards)


def test_concurrent_cold_requests_make_one_refresh(daemon, emulator):
    daemon.login()
    emulator._post("reset_counters")
    emulator.fault("delay", delay=0.5)  # keep the refresh in flight while the requests pile up
    with ThreadPoolExecutor(max_workers=100) as pool:
        tokens = list(pool.map(lambda _: daemon.token("demo-user"), range(100)))
    assert len(set(tokens)) == 1
    assert emulator.counters()["token:refresh_token"] == 1


def test_logout_revokes_and_wipes(daemon, emulator):
    daemon.login()
    daemon.token("demo-user")
    result = daemon.request("POST", "/v1/logout/demo-user").json()
    assert result["results"][0]["revoked"] is True and result["results"][0]["wiped"] is True
    assert emulator.counters()["revoked"] == 1
    assert json.loads((daemon.state_dir / "credentials.json").read_text())["credentials"] == {}
    assert daemon.request("GET", "/v1/token/demo-user").status == 401
    everything = {r["credential"].split(":")[0]: r for r in daemon.request("POST", "/v1/logout").json()["results"]}
    assert set(everything) == {"user", "key_file", "jwt", "oidc"}  # the emulator's config has all kinds
    assert everything["user"]["wiped"] is False and everything["user"]["profiles"] == ["demo-user"]


def test_stray_requests_do_not_break_the_login(daemon, emulator):
    started = daemon.request("POST", "/v1/login/demo-user").json()
    redirect = requests.utils.unquote(started["auth_url"].split("redirect_uri=")[1].split("&")[0])
    assert requests.get(redirect.replace("/oauth2/callback", "/favicon.ico"), timeout=5).status_code == 404
    assert requests.get(redirect + "?state=wrong&code=x", timeout=5).status_code == 400
    assert requests.get(redirect, timeout=5).status_code == 400
    assert requests.post(redirect, data=b"\x00" * 100, timeout=5).status_code == 404
    # A second login request joins the flow in flight.
    assert daemon.request("POST", "/v1/login/demo-user").json()["auth_url"] == started["auth_url"]
    from conftest import browse
    browse(started["auth_url"])
    assert daemon.request("GET", "/v1/login/demo-user?wait=20").json()["state"] == "done"
    assert emulator.counters()["auth"] == 1


def test_login_without_browser_by_pasting_the_redirect(daemon, emulator):
    started = daemon.request("POST", "/v1/login/demo-user").json()
    resp = requests.get(started["auth_url"], allow_redirects=False, timeout=10)
    pasted = resp.headers["Location"]  # what the user copies from the browser's address bar
    bad = daemon.request("POST", "/v1/login/demo-user/complete", {"redirect_url": "http://127.0.0.1:1/?code=x&state=y"})
    assert bad.status == 400
    done = daemon.request("POST", "/v1/login/demo-user/complete", {"redirect_url": pasted}).json()
    assert done["state"] == "done" and done["email"] == "demo@example.com"
    assert iap_admits(emulator, daemon.token("demo-user"))


def test_service_account_key_file_profile(daemon, emulator):
    token = daemon.token("demo-sa")
    claims = unverified_claims(token)
    assert claims["aud"] == IAP and claims["email"] == "demo-ci@iapd-demo.iam.gserviceaccount.com"
    assert iap_admits(emulator, token)


def test_errors_are_json_with_codes(daemon, emulator):
    unknown = daemon.request("GET", "/v1/token/nope")
    assert unknown.status == 404 and unknown.json()["error"] == "unknown_profile"
    assert "demo-user" in unknown.json()["message"]
    assert daemon.request("GET", "/v1/nothing").json()["error"] == "not_found"
    assert daemon.request("DELETE", "/v1/status").json()["error"] == "method_not_allowed"
    sa_login = daemon.request("POST", "/v1/login/demo-sa")
    assert sa_login.status == 400 and "service account" in sa_login.json()["message"]
    assert daemon.request("GET", "/healthz").json() == {"ok": True}
    # An ad-hoc profile's name belongs to one definition: the same name with other settings is refused.
    key = str(emulator.config_path.parent / "emulator-sa-key.json")
    mine = {"name": "adhoc-0123456789abcdef", "audience": IAP, "service_account": {"kind": "key_file", "key_file": key}}
    assert daemon.request("POST", "/v1/adhoc/token", mine).status == 200
    taken = daemon.request("POST", "/v1/adhoc/token", {**mine, "audience": "another-audience"})
    assert taken.status == 400 and "exists with another definition" in taken.json()["message"], taken.body


def test_status_never_contains_a_token(daemon):
    daemon.login()
    token = daemon.token("demo-user")
    text = json.dumps(daemon.status())
    record = daemon.record(f"user:{DESKTOP}")
    assert token not in text and record["refresh_token"] not in text and record["client_secret"] not in text
    status = daemon.profile_status("demo-user")
    assert status["state"] == "ready" and status["identity"] == "demo@example.com"
    assert 3000 < status["expires_in"] <= 3600 and status["next_renewal_in"] > 0 and status["refresh_count"] == 1
    daemon_info = daemon.status()["daemon"]
    assert daemon_info["socket"] == daemon.socket and daemon_info["pid"] == daemon.proc.pid


def test_live_socket_not_stolen_stale_socket_replaced(daemon, daemon_factory):
    rival = subprocess.run([sys.executable, "-m", "iapd", "serve"], env=daemon.env, capture_output=True, text=True,
                           timeout=30)
    assert rival.returncode != 0 and "already serving" in rival.stderr
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    assert os.path.exists(daemon.socket)  # left behind by the dead daemon
    daemon.start()
    assert daemon.request("GET", "/healthz").status == 200


def test_bad_config_is_a_one_line_error(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[profiles.x]\naudience = 3\n")
    out = subprocess.run([sys.executable, "-m", "iapd", "serve", "--config", str(config),
                          "--socket", str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"iapd: config error: {config}: profiles.x.audience: Input should be a valid string"]


def test_garbage_on_the_socket_leaves_the_daemon_up(daemon):
    import socket as socket_mod

    for garbage in [b"\x00\xff" * 100 + b"\r\n\r\n", b"GET /v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"]:
        with socket_mod.socket(socket_mod.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(daemon.socket)
            sock.sendall(garbage)
            answer = sock.recv(200)
            assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer
    assert daemon.request("GET", "/healthz").status == 200
    assert "Traceback" not in daemon.logs()


@pytest.mark.skipif(os.getuid() != 0, reason="dropping to another uid needs root")
def test_another_uid_is_refused_even_on_a_0666_socket(daemon):
    import pwd

    nobody = pwd.getpwnam("nobody")
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    os.chmod(daemon.socket, 0o666)
    for parent in [daemon.folder, *daemon.folder.parents]:
        if str(parent).startswith("/tmp/") or parent == daemon.folder:
            os.chmod(parent, os.stat(parent).st_mode | 0o005)
    code = ("import _socket,sys\ns=_socket.socket(_socket.AF_UNIX,_socket.SOCK_STREAM);s.settimeout(5)\n"
            "s.connect(sys.argv[1])\n"
            "try:\n s.sendall(b'GET /v1/status HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); print(repr(s.recv(100)))\n"
            "except (ConnectionResetError, BrokenPipeError): print('reset')")

    def drop():
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    # The test's interpreter may live under /root; the system one is readable by nobody.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    out = subprocess.run([python, "-c", code, daemon.socket], preexec_fn=drop, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("b''", "reset")  # closed before a byte was answered
    assert f"refused 1 connection(s): uid {nobody.pw_uid} is not the daemon's own" in daemon.logs()
    assert daemon.request("GET", "/healthz").status == 200
