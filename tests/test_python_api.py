"""The Python API (`import iapctl`): a token for requests, httpx and google-auth's
AuthorizedSession, against the emulated IAP; errors with the causes of the exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iapd.jwt import unverified_claims


@pytest.fixture
def api_env(daemon, monkeypatch):
    for key in ("IAPD_SOCKET", "IAPD_CONFIG"):
        monkeypatch.setenv(key, daemon.env[key])
    monkeypatch.setenv("IAPD_AUTOSTART", "0")
    return daemon


def test_a_token_and_its_expiry(api_env):
    import iapctl

    got = iapctl.token_info("demo-sa")
    assert unverified_claims(got.value)["email"] == "demo-ci@iapd-demo.iam.gserviceaccount.com"
    assert 3000 < got.expires_in <= 3600 - 60  # iapd's margin already off
    assert iapctl.token("demo-sa") == got.value
    assert "eyJ" not in repr(got)  # a token does not end up in a log line by accident


@pytest.mark.parametrize("client", ["requests", "httpx"])
def test_bearer_auth_reaches_the_app_behind_iap(api_env, emulator, client):
    import iapctl

    http = pytest.importorskip(client)
    resp = http.get(emulator.url("iap_url") + "/", auth=iapctl.BearerAuth("demo-sa"), timeout=10)
    assert resp.status_code == 200, resp.text
    unauthenticated = http.get(emulator.url("iap_url") + "/", timeout=10, follow_redirects=False) \
        if client == "httpx" else http.get(emulator.url("iap_url") + "/", timeout=10, allow_redirects=False)
    assert unauthenticated.status_code != 200  # the auth is what let it through


def test_google_auth_credentials_in_an_authorized_session(api_env, emulator):
    from google.auth.transport.requests import AuthorizedSession

    import iapctl

    session = AuthorizedSession(iapctl.credentials("demo-sa"))
    assert session.get(emulator.url("iap_url") + "/", timeout=10).status_code == 200


def test_errors_carry_the_cause_and_the_exit_code(api_env):
    import iapctl

    with pytest.raises(iapctl.UnknownProfile, match="no profile named 'nope'") as unknown:
        iapctl.token("nope")
    with pytest.raises(iapctl.LoginRequired, match="iapctl login demo-user") as login:
        iapctl.token("demo-user")
    assert (unknown.value.exit_code, login.value.exit_code) == (5, 4)
    assert isinstance(login.value, iapctl.IapdError)


def test_importing_iapctl_loads_neither_the_api_nor_anything_heavy():
    """`iapctl token` imports the package: the API is loaded on first use only."""
    out = subprocess.run([sys.executable, "-c", "import sys, iapctl; print(sorted(m for m in sys.modules "
                          "if m.startswith('iapctl') or m in ('json', 'dataclasses', 'calendar')))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['iapctl']", out.stdout
