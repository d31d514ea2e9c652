"""The emulator as strict as Google where it matters, and the daemon defects it exposed.

Each daemon test here failed on the code before the fix when run against this emulator; each
emulator test holds it to a behaviour Google documents (see the README's "how faithful it is").
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import browse, wait_for
from iapd.jwt import unverified_claims
from test_client import IAPCTL
from test_emulator import DESKTOP, IAP, desktop_secret, follow_to_code, login, refresh
from test_service_accounts import SOURCES, iap_admits, profiles

OTHER_PROJECT_IAP = "210987654321-iap.apps.googleusercontent.com"
DEPLOYER = "deployer@iapd-demo.iam.gserviceaccount.com"


@pytest.fixture(autouse=True)
def _oauthlib_env(monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the emulator speaks plain http on loopback
    monkeypatch.setenv("OAUTHLIB_RELAX_TOKEN_SCOPE", "1")  # Google widens `email` to its URL form


# -- the emulator, held to Google's documented behaviour --------------------------------------

def metadata_identity(emulator, audience: str = IAP) -> requests.Response:
    return requests.get(f"{emulator.url('metadata_url')}/computeMetadata/v1/instance/service-accounts/default/identity",
                        params={"audience": audience, "format": "full"}, headers={"Metadata-Flavor": "Google"},
                        timeout=10)


def test_the_metadata_server_hands_back_its_cached_token(emulator):
    first = metadata_identity(emulator).text
    emulator.settings(clock_offset=3000)  # 10 minutes left: still handed back
    assert metadata_identity(emulator).text == first
    emulator.settings(clock_offset=3400)  # under 5 minutes left: a new one
    assert metadata_identity(emulator).text != first
    emulator.settings(metadata_cache=False, clock_offset=0)
    fresh = unverified_claims(metadata_identity(emulator).text)  # minted now, not handed back
    assert abs(fresh["iat"] - time.time()) < 5
    assert emulator.counters()[f"metadata_identity:{IAP}"] == 4


def test_the_date_header_follows_the_emulated_clock(emulator):
    import email.utils

    emulator.settings(clock_offset=5000)
    date = requests.get(emulator.url("discovery_url"), timeout=10).headers["Date"]
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - (time.time() + 5000)) < 5


def test_no_id_token_without_the_openid_scope(emulator):
    secret = desktop_secret(emulator)
    auth = requests.Request("GET", emulator.url("oauth_auth_url"), params={
        "client_id": DESKTOP, "redirect_uri": "http://127.0.0.1:9/", "response_type": "code", "scope": "email",
        "code_challenge": "x" * 43, "code_challenge_method": "plain", "access_type": "offline"}).prepare().url
    code = follow_to_code(auth)["code"]
    body = requests.post(emulator.url("token_url"), data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": "http://127.0.0.1:9/", "client_id": DESKTOP,
        "client_secret": secret, "code_verifier": "x" * 43}, timeout=10).json()
    assert "id_token" not in body and body["refresh_token"]
    assert "id_token" not in refresh(emulator, body["refresh_token"], IAP, secret).json()


def test_a_refresh_token_only_for_offline_access(emulator):
    secret = desktop_secret(emulator)
    auth = requests.Request("GET", emulator.url("oauth_auth_url"), params={
        "client_id": DESKTOP, "redirect_uri": "http://127.0.0.1:9/", "response_type": "code", "scope": "openid email",
        "code_challenge": "y" * 43, "code_challenge_method": "plain"}).prepare().url
    body = requests.post(emulator.url("token_url"), data={
        "grant_type": "authorization_code", "code": follow_to_code(auth)["code"], "redirect_uri": "http://127.0.0.1:9/",
        "client_id": DESKTOP, "client_secret": secret, "code_verifier": "y" * 43}, timeout=10).json()
    assert body["id_token"] and "refresh_token" not in body


def test_an_audience_of_another_project_is_refused(emulator):
    rt = login(emulator)["refresh_token"]
    resp = refresh(emulator, rt, OTHER_PROJECT_IAP)
    # Google's words for it (CapacitorGoogleAuth #199 quotes them from the wild).
    assert resp.status_code == 400 and resp.json() == {
        "error": "invalid_audience", "error_description": "The audience client and the client need to be in the same project."}
    assert refresh(emulator, rt, IAP).status_code == 200


def test_refresh_grants_return_a_new_refresh_token_only_with_rotation(emulator):
    rt = login(emulator)["refresh_token"]
    assert "refresh_token" not in refresh(emulator, rt, IAP).json()
    emulator.settings(rotate_refresh_tokens=True)
    rotated = refresh(emulator, rt, IAP).json()["refresh_token"]
    assert rotated != rt and refresh(emulator, rt, IAP).json()["error"] == "invalid_grant"


def test_revocation_answers_200_with_an_empty_body(emulator):
    rt = login(emulator)["refresh_token"]
    resp = requests.post(emulator.url("revoke_url"), data={"token": rt}, timeout=10)
    assert resp.status_code == 200 and resp.content == b""


def test_generate_id_token_needs_get_open_id_token_not_get_access_token(emulator):
    """A service account holds no role on itself: it cannot mint its own ID token via IAM."""
    import google.auth.transport.requests

    from test_emulator import adc_credentials

    user = adc_credentials(emulator)
    user.refresh(google.auth.transport.requests.Request())
    base = f"{emulator.url('iam_credentials_url')}/v1/projects/-/serviceAccounts/{DEPLOYER}"
    as_user = {"Authorization": f"Bearer {user.token}"}
    access = requests.post(f"{base}:generateAccessToken", headers=as_user, timeout=10,
                           json={"scope": ["https://www.googleapis.com/auth/cloud-platform"]})
    assert access.status_code == 200
    as_deployer = {"Authorization": f"Bearer {access.json()['accessToken']}"}
    itself = requests.post(f"{base}:generateIdToken", json={"audience": IAP}, headers=as_deployer, timeout=10)
    assert itself.status_code == 403 and "getOpenIdToken" in itself.json()["error"]["message"]
    by_user = requests.post(f"{base}:generateIdToken", json={"audience": IAP, "includeEmail": True},
                            headers=as_user, timeout=10)
    assert by_user.status_code == 200 and unverified_claims(by_user.json()["token"])["email"] == DEPLOYER


# -- the daemon against it --------------------------------------------------------------------

def test_a_cached_metadata_token_is_served_no_longer_than_its_exp(daemon_factory, emulator, tmp_path):
    """The metadata server hands back a token with 10 minutes left: it is not fresh for an hour."""
    metadata_identity(emulator)  # the server's cache now holds a token for IAP
    emulator.settings(clock_offset=3000)
    daemon = daemon_factory(config=profiles(emulator, tmp_path, SOURCES), name="md")
    token = daemon.token("metadata")
    assert unverified_claims(token)["exp"] - (time.time() + 3000) < 610  # it is the cached one
    status = daemon.profile_status("metadata")
    assert status["expires_in"] <= 600 and status["next_renewal_in"] <= 600, status


def test_revocation_is_counted_by_its_status_not_its_body(daemon, emulator):
    daemon.login()
    out = subprocess.run([IAPCTL, "logout", "demo-user"], env={**daemon.env, "IAPD_AUTOSTART": "0"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "revoked at Google" in out.stdout, out.stdout
    assert emulator.counters()["revoked"] == 1


def test_a_login_asked_while_one_is_pending_joins_it(daemon):
    """Not only logins fired together: one asked a minute later, while the first still waits
    for its browser, joins that flow (one tab, one listener) rather than opening another."""
    first = daemon.request("POST", "/v1/login/demo-user").json()
    second = daemon.request("POST", "/v1/login/demo-user").json()
    assert first["state"] == second["state"] == "pending" and not first.get("joined")
    assert second["joined"] is True and second["auth_url"] == first["auth_url"], second


def test_concurrent_logins_share_one_flow_from_the_first_request(daemon, emulator):
    """flytekit's parallel `iapctl token` calls must open one browser tab, not eight."""
    barrier = threading.Barrier(8)

    def start(_):
        barrier.wait()
        return daemon.request("POST", "/v1/login/demo-user").json()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(start, range(8)))
    assert len({a["auth_url"] for a in answers}) == 1, answers
    assert sorted(a["joined"] for a in answers) == [False] + [True] * 7
    assert emulator.counters()["secret_access"] == 1
    browse(answers[0]["browser_url"])
    assert daemon.request("GET", "/v1/login/demo-user?wait=20").json()["state"] == "done"


def test_a_request_waiting_on_a_refresh_that_a_logout_cancels_gets_an_answer(daemon, emulator):
    daemon.login()
    daemon.token("demo-user")
    emulator.fault("delay", delay=3)
    daemon.set_clock(3600)  # the token is gone: the next request waits on a (slow) refresh
    answer = {}
    waiting = threading.Thread(target=lambda: answer.update(resp=daemon.request("GET", "/v1/token/demo-user")))
    waiting.start()
    wait_for(lambda: emulator.counters().get("in_flight:token") == 1, what="the refresh to be in flight")
    assert daemon.request("POST", "/v1/logout/demo-user").status == 200
    waiting.join(30)
    assert answer["resp"].status == 401 and answer["resp"].json()["error"] == "login_required"


async def test_a_stale_refresh_does_not_wipe_a_fresh_login(emulator, tmp_path):
    import aiohttp

    from iapd.clock import Clock
    from iapd.config import Endpoints, UserSource
    from iapd.errors import LoginRequired
    from iapd.google_creds import GoogleAuth
    from iapd.sources.base import SourceContext
    from iapd.sources.user import UserCredential
    from iapd.logins import Login, user_login_key
    from iapd.store import CredentialStore

    secret = desktop_secret(emulator)
    old, new = login(emulator)["refresh_token"], login(emulator)["refresh_token"]
    store = await CredentialStore.open(tmp_path / "state")
    key = user_login_key(DESKTOP, emulator.url("token_url"))
    await store.put(key, {"refresh_token": old, "email": "demo@example.com", "client_id": DESKTOP})
    async with aiohttp.ClientSession() as session:
        ctx = SourceContext(session, Clock(), Endpoints(token_url=emulator.url("token_url"),
                                                        revoke_url=emulator.url("revoke_url")), 10, GoogleAuth(10))
        stored = Login(key, store, emulator.url("token_url"))
        credential = UserCredential(UserSource(client_id=DESKTOP, client_secret=secret), stored, ctx)
        emulator.fault("delay", delay=1)
        refreshing = asyncio.create_task(credential.fetch(IAP))
        await asyncio.to_thread(wait_for, lambda: emulator.counters().get("in_flight:token") == 1)
        # While it is in flight: the old grant is revoked and a new login stores a new one.
        await asyncio.to_thread(requests.post, emulator.url("revoke_url"), data={"token": old}, timeout=10)
        await store.put(key, {"refresh_token": new, "email": "demo@example.com", "client_id": DESKTOP})
        with pytest.raises(LoginRequired):
            await refreshing
    assert store.get(key)["refresh_token"] == new


async def test_re_raising_a_stored_error_does_not_grow_its_traceback():
    from iapd.clock import Clock
    from iapd.cache import TokenCache
    from iapd.config import DaemonSettings
    from iapd.errors import LoginRequired

    class Dead:  # a credential whose grant is dead: the cache's view of it is all that matters
        key, kind = "user:dead", "user"

        async def fetch(self, audience):
            raise LoginRequired("the login has expired")

        def identity(self):
            return None

    cache, source = TokenCache(DaemonSettings(), Clock()), Dead()
    depths = []
    for _ in range(200):
        try:
            await cache.get(source, "aud")
        except LoginRequired as exc:
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
    assert max(depths[1:]) == depths[1] < 20, depths[:3] + depths[-3:]


ERROR_KINDS = """
[profiles.wrong-audience]
audience = "nope-iap.apps.googleusercontent.com"
[profiles.wrong-audience.user]
client_id = "123456789012-desktop.apps.googleusercontent.com"
client_secret_name = "projects/iapd-demo/secrets/iap-desktop-client-secret/versions/latest"
secret_manager_credentials = "@FOLDER@/emulator-adc.json"
"""


def test_error_kinds_are_told_apart_and_retried_as_they_deserve(daemon_factory, emulator, tmp_path):
    config = profiles(emulator, tmp_path, SOURCES + ERROR_KINDS)
    daemon = daemon_factory("backoff_initial_seconds = 0.1\nbackoff_cap_seconds = 0.2\n", config=config, name="kinds")
    env = {**daemon.env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0"}

    def token(profile: str) -> subprocess.CompletedProcess:
        return subprocess.run([IAPCTL, "token", profile], env=env, capture_output=True, text=True, timeout=60)

    shift = 0.0

    def later() -> None:
        """A minute on, by the daemon's clocks: far past the transient backoff's cap (0.2 s), so
        a transient error would be retried by the next request; a refusal waits an hour."""
        nonlocal shift
        shift += 60
        daemon.set_clock(shift, shift)

    # A configuration problem: exit 5, said once, never retried.
    out = token("key-missing")
    assert out.returncode == 5 and "does not exist" in out.stderr and "try again" not in out.stderr
    assert daemon.profile_status("key-missing")["state"] == "config_error"
    # A permanent refusal: exit 6 without "try again"; one call to Google, not one per backoff.
    for _ in range(2):
        out = token("impersonate-denied")
        assert out.returncode == 6 and "retrying will not help" in out.stderr and "try again" not in out.stderr
        later()
    assert emulator.counters()["iam_credentials"] == 1
    assert daemon.profile_status("impersonate-denied")["state"] == "refused"
    # A wrong IAP client id (the flyte-iap drop-in's --webapp_client_id) is such a refusal too...
    daemon.login()
    refused = "refused_audience:nope-iap.apps.googleusercontent.com"
    for _ in range(2):
        out = token("wrong-audience")
        assert out.returncode == 6 and "invalid_audience" in out.stderr and "try again" not in out.stderr
        later()
    assert emulator.counters()[refused] == 1
    # ...which a new login retries at once.
    daemon.login()
    token("wrong-audience")
    assert emulator.counters()[refused] == 2


def test_sigterm_stops_the_daemon_while_google_auth_hangs(daemon_factory, emulator, tmp_path):
    config = profiles(emulator, tmp_path, SOURCES)
    daemon = daemon_factory("request_timeout_seconds = 1\nhttp_timeout_seconds = 60\n", config=config, name="hang")
    emulator.fault("delay", endpoint="token", delay=600)  # the user's ADC refresh never answers
    resp = daemon.request("GET", "/v1/token/impersonate-from-user")
    assert resp.status == 503
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(timeout=15)  # google-auth's own default would hold it for 120 s
    assert daemon.proc.returncode == 0
    assert time.monotonic() - started < 10


def test_after_a_suspend_renewals_run_a_few_at_a_time(daemon_factory, emulator, tmp_path):
    many = "".join(f'[profiles.aud{i}]\naudience = "aud-{i}"\n[profiles.aud{i}.service_account]\n'
                   f'kind = "key_file"\nkey_file = "@FOLDER@/emulator-sa-key.json"\n' for i in range(16))
    daemon = daemon_factory("tick_seconds = 0.5\n", config=profiles(emulator, tmp_path, many), name="many")
    for i in range(16):
        daemon.token(f"aud{i}")
    emulator._post("reset_counters")
    emulator.fault("delay", delay=0.3, count=16)
    daemon.set_clock(3600)  # back from a suspend: every token is due at once
    wait_for(lambda: sum(v for k, v in emulator.counters().items() if k.startswith("sa_id_token:")) == 16,
             what="all 16 renewals")
    # A few at a time: more than one (a serial cache would take 16 × 0.3 s), never more than 4.
    assert 2 <= emulator.counters()["max_in_flight:token"] <= 4


def test_a_new_login_revokes_the_refresh_token_it_replaces(daemon, emulator):
    daemon.login()
    live = emulator.state()["live_refresh_tokens"]
    daemon.login()  # prompt=consent: Google mints a new refresh token
    assert emulator.state()["live_refresh_tokens"] == live
    assert emulator.counters()["revoked"] == 1


def test_a_new_login_rereads_a_rotated_client_secret(daemon, emulator):
    assert daemon.login()["state"] == "done"
    emulator._post("rotate_client_secret")  # the old secret stops working
    assert daemon.login()["state"] == "done"
    assert emulator.counters()["secret_access"] == 2
    daemon.set_clock(3600)
    assert iap_admits(emulator, daemon.token("demo-user"))


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_a_shutdown_does_not_leave_the_secret_manager_reader_running(daemon, emulator):
    emulator.fault("delay", endpoint="secret_manager", delay=60)
    def start_login():
        try:
            daemon.request("POST", "/v1/login/demo-user", timeout=5)
        except Exception:  # noqa: BLE001 - the daemon goes away under it: that is the test
            pass

    threading.Thread(target=start_login, daemon=True).start()
    child = wait_for(lambda: children_of(daemon.proc.pid), what="the Secret Manager reader")[0]
    daemon.stop()
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2],
             timeout=10, what="the reader to end")


def test_backoff_is_reset_when_the_network_comes_back(daemon_factory, emulator, tmp_path):
    three = "".join(f'[profiles.{name}]\naudience = "aud-{name}"\n[profiles.{name}.service_account]\n'
                    f'kind = "key_file"\nkey_file = "@FOLDER@/emulator-sa-key.json"\n' for name in "abc")
    daemon = daemon_factory("tick_seconds = 0.5\nbackoff_initial_seconds = 60\nbackoff_cap_seconds = 60\n",
                            config=profiles(emulator, tmp_path, three), name="back")
    daemon.token("a")
    daemon.token("b")
    emulator.fault("503", count=2)
    daemon.set_clock(3600)  # both due; both renewals meet the outage and back off for ~a minute
    wait_for(lambda: emulator.counters().get("fault:token:503") == 2, what="both renewals to fail")
    assert daemon.profile_status("a")["state"] == "error"
    assert daemon.token("c")  # the network is back: this refresh works...
    # ...so a and b try again now, not in a minute.
    wait_for(lambda: emulator.counters().get("sa_id_token:aud-a") == 2 and emulator.counters().get("sa_id_token:aud-b") == 2,
             timeout=10, what="a and b to renew at once")
