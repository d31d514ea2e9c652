"""The emulated IAP for people: Google's sign-in with IAP's own client, a session cookie, and
`gcp-iap-mode` — and with it, Flyte's own login behind IAP walked end to end by a browser that
keeps cookies (tests/browser.py)."""

from __future__ import annotations

import http.cookiejar
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest

from iapd.jwt import unverified_claims
from test_client import CURL_BROWSER, iapctl
from test_oidc import env_of

IAP = "123456789012-iap.apps.googleusercontent.com"
COOKIE_BROWSER = f"{sys.executable} {os.path.join(os.path.dirname(__file__), 'browser.py')} %s"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Person:
    """One browser: its cookies, and whether it follows redirects."""

    def __init__(self) -> None:
        self.jar = http.cookiejar.CookieJar()
        self.following = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.stopping = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def open(self, url: str, follow: bool = True, headers: dict | None = None):
        opener = self.following if follow else self.stopping
        try:
            resp = opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10)
        except urllib.error.HTTPError as exc:
            resp = exc
        with resp:
            return resp.status, dict(resp.headers), resp.read().decode()


def test_a_person_is_sent_to_sign_in_gets_a_session_cookie_and_can_clear_it(emulator):
    app = emulator.url("iap_url")
    person = Person()
    status, headers, _ = person.open(app + "/pipelines?x=1", follow=False)
    assert status == 302 and headers["X-Goog-IAP-Generated-Response"] == "true"
    sign_in = urlsplit(headers["Location"])
    query = parse_qs(sign_in.query)
    # Google's sign-in, for IAP's own OAuth client (the audience programs need), to IAP's redirect URI.
    assert f"{sign_in.scheme}://{sign_in.netloc}{sign_in.path}" == emulator.url("oauth_auth_url")
    assert query["client_id"] == [IAP] and query["response_type"] == ["code"]
    assert query["redirect_uri"][0].endswith(f"/clientIds/{IAP}:handleRedirect") and query["state"]

    status, _, body = person.open(app + "/pipelines?x=1")  # the whole walk, back to the page
    assert status == 200, body
    import json

    echo = json.loads(body)
    assert echo["path"] == "/pipelines?x=1" and echo["user"] == "accounts.google.com:demo@example.com"
    assert not any(c.startswith("GCP_IAP") for c in echo["headers"].get("Cookie", "").split("; "))  # IAP's own

    status, _, body = person.open(app + "/?gcp-iap-mode=IDENTITY")
    assert status == 200 and json.loads(body)["email"] == "accounts.google.com:demo@example.com"
    # An AJAX request with the session passes; without it, a 401 rather than a sign-in page.
    assert person.open(app + "/api", headers={"X-Requested-With": "XMLHttpRequest"})[0] == 200
    assert Person().open(app + "/api", headers={"X-Requested-With": "XMLHttpRequest"})[0] == 401

    status, headers, _ = person.open(app + "/page?gcp-iap-mode=CLEAR_LOGIN_COOKIE", follow=False)
    assert status == 302 and headers["Location"] == "/page"
    assert person.open(app + "/page", follow=False)[0] == 302  # signed out: to sign-in again
    # The cookie of one app is not a session at another.
    assert person.open(emulator.url("flyte_url") + "/", follow=False)[0] == 302


def test_a_refused_sign_in_and_a_forged_ticket_give_no_session(emulator):
    app = emulator.url("iap_url")
    emulator.settings(approve="deny")
    status, _, body = Person().open(app + "/")
    assert status == 403 and "access_denied" in body
    emulator.settings(approve="auto")
    status, _, body = Person().open(app + "/_gcp_gatekeeper/authenticate?ticket=forged")
    assert status == 401 and "did not complete" in body


def test_flytes_own_login_behind_iap_completes_in_a_browser_that_keeps_cookies(daemon, emulator, tmp_path):
    """`demo-flyte`: the issuer behind the second emulated IAP, `via = "demo-user"`. The browser
    meets IAP first (sign-in, cookie), then the issuer's authorize page, then the loopback
    listener; the daemon's code exchange goes through IAP with demo-user's token."""
    env = env_of(daemon, tmp_path)
    assert iapctl("login", "demo-user", env={**env, "BROWSER": CURL_BROWSER}).returncode == 0
    # curl keeps no cookies: IAP sends it round the sign-in until curl's redirect limit, and it fails.
    dropped = iapctl("login", "demo-flyte", env={**env, "BROWSER": CURL_BROWSER})
    assert dropped.returncode == 4 and "could not open a browser" in dropped.stderr, dropped.stderr

    out = iapctl("login", "demo-flyte", env={**env, "BROWSER": COOKIE_BROWSER})
    assert out.returncode == 0 and "Logged in as alice@example.com" in out.stdout, (out.stdout, out.stderr)
    token = iapctl("token", "demo-flyte", env=env)
    assert token.returncode == 0, token.stderr
    claims = unverified_claims(token.stdout.strip())
    assert claims["iss"] == emulator.url("flyte_issuer") and claims["aud"] == "kubeflow-cli"
    assert emulator.counters()["oidc_token"] >= 1


@pytest.mark.parametrize("profile", ["demo-oidc", "demo-flyte"])
def test_the_written_config_has_runnable_oidc_profiles(daemon, emulator, tmp_path, profile):
    env = env_of(daemon, tmp_path)
    assert iapctl("login", "demo-user", env={**env, "BROWSER": CURL_BROWSER}).returncode == 0
    out = iapctl("login", profile, env={**env, "BROWSER": COOKIE_BROWSER})
    assert out.returncode == 0, out.stderr
    assert iapctl("token", profile, env=env).returncode == 0


def test_via_carries_the_device_grant_and_the_revocation_through_iap(daemon, emulator, tmp_path):
    """Every request to an issuer behind IAP goes with the `via` profile's token: the device
    authorization, its polls and the revocation at logout too (without it IAP answers them with
    its sign-in page)."""
    import re
    import subprocess

    import requests

    from test_client import IAPCTL
    from test_oidc import read_until

    env = env_of(daemon, tmp_path)
    assert iapctl("login", "demo-user", env={**env, "BROWSER": CURL_BROWSER}).returncode == 0
    emulator._post("oidc", {"device_interval": 1})
    admitted = emulator.counters().get("iap_admitted", 0)
    proc = subprocess.Popen([IAPCTL, "login", "demo-flyte", "--device"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        said = read_until(proc.stderr, "enter the code")
        page = re.search(r"(http://\S+/device\?user_code=\S+)", said).group(1)
        assert page.startswith(emulator.url("flyte_url"))  # the issuer as its clients see it: behind IAP
        # The person approves on their phone (signed in to IAP there): here, straight at the issuer.
        direct = page.replace(emulator.url("flyte_url"), emulator.url("secret_manager_url"))
        assert requests.get(direct, timeout=10).status_code == 200
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Logged in as alice@example.com" in out, err
    assert emulator.counters()["iap_admitted"] >= admitted + 3  # discovery, device code, polls: all through IAP
    out = iapctl("logout", "demo-flyte", env=env)
    assert out.returncode == 0 and "revoked at the issuer" in out.stdout, (out.stdout, out.stderr)
