"""What the daemon survives: IdP outages, kill -9 mid-write, skewed clocks, hostile and
malformed input, slow clients — and that no secret ever reaches a log line."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_for
from test_service_accounts import SOURCES, iap_admits, profiles
from iapd.jwt import unverified_claims
from iapd.logins import user_login_key

IAP = "123456789012-iap.apps.googleusercontent.com"
DESKTOP = "123456789012-desktop.apps.googleusercontent.com"
FAST = """
renew_before_seconds = 2.5
margin_seconds = 1
tick_seconds = 0.5
backoff_initial_seconds = 0.1
backoff_cap_seconds = 0.4
header_timeout_seconds = 1
"""


# -- faults at the IdP ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "429", "drop", "delay"])
def test_outage_serves_the_valid_token_throughout_and_recovers_within_the_cap(daemon_factory, emulator, kind):
    daemon = daemon_factory(FAST + "http_timeout_seconds = 0.3\n")
    daemon.login()
    first = daemon.token("demo-user")
    waited = daemon.profile_status("demo-user")["waited_requests"]  # the cold fetch
    emulator.fault(kind, count=10_000, delay=1.0)  # an outage with no end in sight ("delay" > http timeout)
    daemon.set_clock(3600 - 600)  # 10 min left: renewal is due (window ~15 min); it fails, again and again
    started = time.monotonic()
    while time.monotonic() - started < 3:  # every request in the outage gets the valid token, at once
        assert daemon.token("demo-user") == first
        time.sleep(0.02)
    assert emulator.counters()[f"fault:token:{kind}"] >= 3  # renewal kept trying, with backoff
    emulator._post("clear_faults")  # the IdP is back
    recovered_at = time.monotonic()
    wait_for(lambda: daemon.profile_status("demo-user")["refresh_count"] == 2, what="recovery")
    # Within the backoff cap (0.4 s, plus a tick and the in-flight timeout), not minutes later.
    assert time.monotonic() - recovered_at < 3
    assert daemon.profile_status("demo-user")["waited_requests"] == waited  # nobody waited on the IdP


def test_invalid_rapt_stops_all_refreshing_until_login(daemon_factory, emulator):
    daemon = daemon_factory(FAST)
    daemon.login()
    daemon.token("demo-user")
    emulator._post("reset_counters")
    emulator.fault("invalid_rapt")
    daemon.set_clock(3600 - 2.4)  # a background renewal meets the reauthentication policy
    wait_for(lambda: daemon.profile_status("demo-user")["state"] == "login_required" or
             emulator.counters().get("token", 0) >= 1, what="the renewal")
    daemon.set_clock(7200)
    for _ in range(10):
        assert daemon.request("GET", "/v1/token/demo-user").status == 401
    daemon.supervisor_passes(3)  # three looks at every entry: the supervisor must not retry a dead grant either
    assert emulator.counters()["token"] == 1


@pytest.mark.parametrize("skew", [-3000, 3000])
def test_skewed_idp_clock_still_renews_on_time(daemon_factory, emulator, skew):
    """The IdP's clock 50 minutes behind or ahead of ours. Lifetimes are counted from receipt,
    so renewals come as often as without skew: two hours of one-hour tokens (the daemon's and
    the emulator's clocks moved five minutes a step), two renewals, and no request waits."""
    emulator.settings(clock_offset=skew)
    daemon = daemon_factory("")
    daemon.login()
    daemon.token("demo-user")
    emulator._post("reset_counters")
    waited = daemon.profile_status("demo-user")["waited_requests"]
    for step in range(1, 2 * 12 + 1):
        offset = step * 300
        emulator.settings(clock_offset=skew + offset)
        daemon.set_clock(offset, offset)
        daemon.token("demo-user")
        wait_for(lambda: daemon.profile_status("demo-user")["next_renewal_in"] != 0, what="a due renewal")
    # 120 minutes, renewed with 12–15 of 60 left: at ~46 and ~92 minutes.
    assert emulator.counters()[f"refresh:{IAP}"] == 2
    assert daemon.profile_status("demo-user")["waited_requests"] == waited


# -- kill -9 --------------------------------------------------------------------------------

WRITER = """
import asyncio, sys
from pathlib import Path
from iapd.store import CredentialStore

async def main():
    store = await CredentialStore.open(Path(sys.argv[1]))
    print("open", flush=True)
    i = 0
    while True:
        i += 1
        await store.put("user:c", {"refresh_token": "A" * 2000 if i % 2 else "B" * 3000, "email": "e"})

asyncio.run(main())
"""


def test_kill_9_during_store_writes_leaves_old_or_new_never_broken(tmp_path):
    state = tmp_path / "state"
    seen = set()
    for _ in range(100):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(state)], stdout=subprocess.PIPE, text=True,
                                stderr=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "open", proc.stderr.read()
        time.sleep(random.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = state / "credentials.json"
        if not path.exists():
            continue  # killed before the first rename: no state yet, which is "old"
        record = json.loads(path.read_text())["credentials"]["user:c"]  # always complete JSON
        assert record["refresh_token"] in ("A" * 2000, "B" * 3000)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        seen.add(record["refresh_token"][0])
    assert seen == {"A", "B"}  # the kills did land at different moments
    # Temp files of killed writers are cleaned up by the next open.
    subprocess.run([sys.executable, "-c", "import asyncio,sys; from pathlib import Path; "
                    "from iapd.store import CredentialStore; asyncio.run(CredentialStore.open(Path(sys.argv[1])))",
                    str(state)], check=True, timeout=30)
    assert [p.name for p in state.iterdir()] == ["credentials.json"]


@pytest.mark.parametrize("moment", ["login", "refresh", "rotation", "logout"])
def test_kill_9_of_the_daemon_mid_operation(daemon_factory, emulator, moment):
    daemon = daemon_factory(FAST)
    if moment == "rotation":
        emulator.settings(rotate_refresh_tokens=True)
    store = daemon.state_dir / "credentials.json"
    for round_ in range(5):
        if moment == "login":
            started = daemon.request("POST", "/v1/login/demo-user").json()  # (the secret is read by now)
            # The code exchange is held at the emulator until the kill lands inside it.
            emulator.fault("delay", endpoint="token", delay=1.0)
            browser = subprocess.Popen(["curl", "-sSL", "-o", "/dev/null", started["auth_url"]])
            route = "token"
            wait_for(lambda: emulator.counters().get("in_flight:token") == 1, what="the code exchange at the emulator")
        else:
            if round_ == 0 or daemon.request("GET", "/v1/token/demo-user").status == 401:
                daemon.login()
            # The emulator holds the request until the kill has landed inside the operation (set
            # first: the clock jump below starts a background renewal at once).
            route = "revoke" if moment == "logout" else "token"
            emulator.fault("delay", endpoint=route, delay=1.0)
            daemon.set_clock(3600 * (round_ + 1))  # a refresh on the next request
            if moment == "logout":
                subprocess.Popen([sys.executable, "-c", "import sys; from iapctl import wire; "
                                  "wire.request(sys.argv[1], 'POST', '/v1/logout/demo-user')", daemon.socket])
            else:
                subprocess.Popen([sys.executable, "-c", "import sys; from iapctl import wire; "
                                  "wire.request(sys.argv[1], 'GET', '/v1/token/demo-user')", daemon.socket])
            wait_for(lambda: emulator.counters().get(f"in_flight:{route}") == 1, what=f"the {moment} at the emulator")
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        if moment == "login":
            browser.wait(timeout=30)
        # The emulator finishes what it was holding, as Google would with the daemon gone.
        wait_for(lambda: emulator.counters().get(f"in_flight:{route}") == 0, what="the held request to end")
        if store.exists():  # the store is complete JSON holding a whole record, or none
            records = json.loads(store.read_text())["credentials"]
            assert set(records) <= {user_login_key(DESKTOP, emulator.url("token_url"))}
        daemon.start()
        # After the restart: a token from what was stored (a refresh: nothing is cached in
        # memory any more), or a clear "log in" — never an error, never a token IAP refuses.
        resp = daemon.request("GET", "/v1/token/demo-user")
        assert resp.status in (200, 401), (moment, resp.status, resp.body)
        if resp.status == 200:
            assert iap_admits(emulator, resp.body.decode()), moment
        elif moment == "refresh":
            raise AssertionError("a kill mid-refresh lost the login")  # Google does not rotate: nothing to lose
        if moment in ("logout", "login"):
            # logout: the revoke reached Google before the kill: the login is dead, and said to be.
            # login: the kill landed before the exchange's answer was stored: no login, and said.
            assert resp.status == 401 and resp.json()["error"] == "login_required", resp.body



def test_a_rotated_refresh_token_is_on_disk_once_the_renewal_is_done(daemon_factory, emulator):
    """Where the issuer rotates refresh tokens, the one a finished renewal brought is in the store
    before the token is served: a kill -9 right after, and the restarted daemon refreshes with
    it — no login. (A kill *during* the renewal may lose it: the issuer spent the old one, and
    the new one never arrived; the test above accepts a clear "log in" there.)"""
    daemon = daemon_factory(FAST)
    emulator.settings(rotate_refresh_tokens=True)
    daemon.login()
    key = user_login_key(DESKTOP, emulator.url("token_url"))
    before = daemon.record(key)["refresh_token"]
    daemon.set_clock(3600)
    daemon.token("demo-user")  # a refresh, which rotates the refresh token
    assert daemon.record(key)["refresh_token"] != before  # on disk by the time the token was served
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    refreshes = emulator.counters()[f"refresh:{IAP}"]
    daemon.start()
    resp = daemon.request("GET", "/v1/token/demo-user")  # nothing cached: a refresh with the stored token
    assert resp.status == 200, resp.status  # (not the body: a token never goes into test output)
    assert emulator.counters()[f"refresh:{IAP}"] == refreshes + 1
    assert iap_admits(emulator, resp.body.decode())


def test_restart_after_kill_serves_without_login(daemon, emulator):
    daemon.login()
    daemon.token("demo-user")
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.start()
    assert unverified_claims(daemon.token("demo-user"))["aud"] == IAP
    assert emulator.counters()["auth"] == 1


# -- hostile and malformed input --------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "BREW"])
PATHS = st.one_of(
    st.sampled_from(["/healthz", "/v1/status", "/v1/token/demo-sa", "/v1/token/nope", "/v1/login/demo-user",
                     "/v1/login/demo-sa/complete", "/v1/logout/nope", "/v1/adhoc/token", "/v1/token/", "//", "*"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=60).map(lambda t: "/" + t),
)
HEADERS = st.lists(st.tuples(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20),
                             st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)),
                   max_size=6)
BODIES = st.one_of(st.just(b""), st.binary(max_size=300), st.sampled_from([b"{}", b"[]", b"null", b'{"redirect_url": 5}',
                                                                         b'{"audience": "x", "user": {}}']))


def build_request(method: str, path: str, headers, body: bytes, chunked: bool) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: iapd"] + [f"{k}: {v}" for k, v in headers]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace") + payload


def exchange(path: str, raw: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)  # then EOF: a truncated request must not hang either side
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


@pytest.fixture
def fuzz_daemon(daemon_factory):
    return daemon_factory()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(METHODS, PATHS, HEADERS, BODIES, st.booleans()), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.integers(min_value=0, max_value=400)))
def test_fuzzing_the_socket_api(fuzz_daemon, requests, cut):
    raw = b"".join(build_request(*r) for r in requests)  # more than one: pipelined
    if cut is not None:
        raw = raw[:cut]  # truncated
    answer = exchange(fuzz_daemon.socket, raw)
    statuses = [int(m) for m in re.findall(rb"^HTTP/1\.[01] (\d{3}) ", answer, re.M)]
    assert answer == b"" or statuses, answer[:200]
    assert all(s < 500 for s in statuses), answer[:500]


def test_after_fuzzing_the_daemon_is_up_and_logged_no_traceback(fuzz_daemon):
    # A short fuzz of its own (hypothesis runs above against a different daemon each time it
    # starts), then: still serving, and nothing but one-line log records.
    rng = random.Random(7)
    for _ in range(200):
        raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        exchange(fuzz_daemon.socket, rng.choice([raw, b"GET /v1/status HTTP/1.1\r\n" + raw]))
    assert fuzz_daemon.request("GET", "/healthz").json() == {"ok": True}
    assert fuzz_daemon.proc.poll() is None
    assert "Traceback" not in fuzz_daemon.logs()


def status_line(path: str, raw: bytes) -> bytes:
    """Send `raw` and read just the answer's head. No half-close: the daemon answers before it
    has read all of an oversized request, and a unix socket closed with unread data resets the
    peer — which could lose the very answer this looks for."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        head = b""
        try:
            while b"\r\n" not in head and (chunk := sock.recv(4096)):
                head += chunk
        except ConnectionResetError:
            pass
        return head


def test_oversized_headers_and_bodies_are_rejected(daemon):
    big_header = status_line(daemon.socket, b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 +
                             b"\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 4\d\d ", big_header), big_header[:100]
    body = json.dumps({"redirect_url": "x" * 200_000}).encode()
    big_body = status_line(daemon.socket, b"POST /v1/login/demo-user/complete HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert big_body.startswith(b"HTTP/1.1 413 "), big_body[:100]
    assert daemon.request("GET", "/healthz").status == 200


def test_slowloris_connections_do_not_delay_a_token(daemon_factory, emulator):
    daemon = daemon_factory(FAST)
    daemon.login()
    daemon.token("demo-user")
    idle = []
    for i in range(200):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket)
        if i % 2:
            sock.sendall(b"GET /v1/token/demo-user HTTP/1.1\r\nHost: ")  # never finished
        idle.append(sock)
    try:
        started = time.monotonic()
        assert daemon.token("demo-user")
        assert time.monotonic() - started < 5  # a hang detector, not a benchmark (see bench/)
        # The daemon closes them itself once the header timeout (1 s here) has passed.
        for sock in idle[:20]:
            sock.settimeout(10)
            assert sock.recv(100) == b""
    finally:
        for sock in idle:
            sock.close()


def test_world_writable_socket_dir_and_symlinked_state_dir_are_refused(tmp_path, emulator):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    env = {**os.environ, "IAPD_CONFIG": str(emulator.config_path), "XDG_STATE_HOME": str(tmp_path / "st")}
    out = subprocess.run([sys.executable, "-m", "iapd", "serve", "--socket", str(shared / "iapd.sock")], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "writable by other users" in out.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777  # and it did not "fix" a directory it does not own

    real = tmp_path / "real-state"
    real.mkdir(mode=0o700)
    (tmp_path / "st2").mkdir()
    (tmp_path / "st2" / "iapd").symlink_to(real)
    env["XDG_STATE_HOME"] = str(tmp_path / "st2")
    out = subprocess.run([sys.executable, "-m", "iapd", "serve", "--socket", str(tmp_path / "run" / "s.sock")],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "symlink" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "s.sock").exists()  # it cleaned up the socket it had bound


# -- no secret in any log line ------------------------------------------------------------------


def test_no_secret_ever_logged(daemon_factory, emulator, tmp_path):
    # The service-account kinds too (impersonate-from-user, of test_service_accounts): its caller's
    # credentials go through google-auth's own transport (requests, urllib3), which log at debug.
    config = profiles(emulator, tmp_path, SOURCES)
    daemon = daemon_factory(FAST, config=config)  # --log-level debug, as every test daemon
    served = set()
    daemon.login()
    record = daemon.record(f"user:{DESKTOP}")
    served.add(daemon.token("impersonate-from-user"))
    for profile in ("demo-user", "demo-sa"):
        served.add(daemon.token(profile))
    daemon.set_clock(3600)  # renewals
    for profile in ("demo-user", "demo-sa"):
        served.add(daemon.token(profile))
    emulator.fault("500")
    emulator.fault("invalid_grant")
    daemon.set_clock(7200)
    daemon.request("GET", "/v1/token/demo-user")
    daemon.request("GET", "/v1/token/demo-user")
    daemon.request("GET", "/v1/status")
    daemon.request("POST", "/v1/logout")
    key = json.loads((emulator.config_path.parent / "emulator-sa-key.json").read_text())["private_key"]
    adc = json.loads((emulator.config_path.parent / "emulator-adc.json").read_text())  # imp's caller
    secrets = [*served, record["refresh_token"], record["client_secret"], adc["refresh_token"], adc["client_secret"],
               key.splitlines()[1]]  # a line of the private key's body
    logs = daemon.logs()
    assert "new token sha256:" in logs  # tokens are named by a short hash
    # The daemon logs at debug here; the libraries that would log requests stay at warning.
    assert not re.search(r" DEBUG (google|urllib3|grpc)", logs), re.findall(r".* DEBUG (?:google|urllib3|grpc).*", logs)[:3]
    for secret in secrets:
        assert secret and secret not in logs
        assert secret[-24:] not in logs  # not even a tail of one


def test_an_idle_audience_stops_being_renewed_ahead_of_time(daemon_factory, emulator):
    daemon = daemon_factory(FAST + "idle_seconds = 1\n")
    daemon.login()
    daemon.token("demo-user")
    assert daemon.profile_status("demo-user")["next_renewal_in"] is not None
    emulator._post("reset_counters")
    daemon.set_clock(0, 1.6)  # nobody asks for 1.6 s of the daemon's monotonic clock: the audience is idle
    assert daemon.profile_status("demo-user")["next_renewal_in"] is None
    daemon.set_clock(3600 - 600, 1.6)  # renewal would be due now ...
    daemon.supervisor_passes(3)  # ... the supervisor looks three times ...
    assert emulator.counters().get("token", 0) == 0  # ... and the IdP sees nothing
    daemon.token("demo-user")  # on demand it is served at once, and renewal resumes behind it
    wait_for(lambda: emulator.counters().get("token", 0) == 1, what="the renewal to resume")
