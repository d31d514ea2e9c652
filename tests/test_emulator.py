"""The emulator held to Google's behaviour through Google's own client libraries, over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from urllib.parse import parse_qs, urlencode, urlsplit

import google.auth
import google.auth.transport.requests
import pytest
import requests
from google.oauth2 import id_token as google_id_token
from google.oauth2 import service_account
from google_auth_oauthlib.flow import Flow

from iapd.config import load_config
from iapd.crc32c import crc32c
from iapd.jwt import unverified_claims

DESKTOP = "123456789012-desktop.apps.googleusercontent.com"
IAP = "123456789012-iap.apps.googleusercontent.com"


def verify(emulator, token: str, audience: str) -> dict:
    return google_id_token.verify_token(token, google.auth.transport.requests.Request(), audience=audience,
                                        certs_url=emulator.url("certs_url"))


def adc_credentials(emulator):
    creds, _ = google.auth.load_credentials_from_file(str(emulator.config_path.parent / "emulator-adc.json"))
    # google-auth ignores `token_uri` in an authorized_user file and always uses Google's; the
    # daemon applies the configured token endpoint the same way.
    return creds.with_token_uri(emulator.url("token_url"))


def desktop_secret(emulator) -> str:
    text = emulator.config_path.read_text()
    # The secret is not in the config (it lives in the emulated Secret Manager): fetch it as a user would.
    creds = adc_credentials(emulator)
    creds.refresh(google.auth.transport.requests.Request())
    name = "projects/iapd-demo/secrets/iap-desktop-client-secret/versions/latest"
    assert name in text
    resp = requests.get(f"{emulator.url('secret_manager_url')}/v1/{name}:access",
                        headers={"Authorization": f"Bearer {creds.token}"}, timeout=10)
    resp.raise_for_status()
    return base64.b64decode(resp.json()["payload"]["data"]).decode()


def follow_to_code(auth_url: str) -> dict[str, str]:
    resp = requests.get(auth_url, allow_redirects=False, timeout=10)
    assert resp.status_code == 302, resp.text
    return {k: v[0] for k, v in parse_qs(urlsplit(resp.headers["Location"]).query).items()}


def login(emulator, redirect_uri: str = "http://127.0.0.1:9/") -> dict:
    """Authorization code + PKCE through google-auth-oauthlib's Flow; returns the token response."""
    config = {"installed": {"client_id": DESKTOP, "client_secret": desktop_secret(emulator),
                            "auth_uri": emulator.url("oauth_auth_url"), "token_uri": emulator.url("token_url")}}
    flow = Flow.from_client_config(config, scopes=["openid", "email"], redirect_uri=redirect_uri,
                                   autogenerate_code_verifier=True)
    auth_url, state = flow.authorization_url(access_type="offline")
    params = follow_to_code(auth_url)
    assert params["state"] == state
    return flow.fetch_token(code=params["code"])


@pytest.fixture(autouse=True)
def _oauthlib_env(monkeypatch):
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the emulator speaks plain http on loopback
    monkeypatch.setenv("OAUTHLIB_RELAX_TOKEN_SCOPE", "1")  # Google widens `email` to its URL form


def refresh(emulator, refresh_token: str, audience: str | None = None, secret: str | None = None) -> requests.Response:
    data = {"grant_type": "refresh_token", "client_id": DESKTOP, "client_secret": secret or desktop_secret(emulator),
            "refresh_token": refresh_token}
    if audience:
        data["audience"] = audience
    return requests.post(emulator.url("token_url"), data=data, timeout=10)


def test_flow_code_exchange_with_pkce(emulator):
    token = login(emulator)
    assert token["refresh_token"] and token["token_type"] == "Bearer"
    claims = verify(emulator, token["id_token"], DESKTOP)
    assert claims["iss"] == "https://accounts.google.com" and claims["email"] == "demo@example.com"
    assert claims["email_verified"] is True and claims["azp"] == DESKTOP


def test_refresh_with_and_without_audience(emulator):
    rt = login(emulator)["refresh_token"]
    with_aud = refresh(emulator, rt, IAP).json()
    claims = verify(emulator, with_aud["id_token"], IAP)
    assert claims["aud"] == IAP and claims["azp"] == DESKTOP
    allowlist = verify(emulator, refresh(emulator, rt).json()["id_token"], DESKTOP)
    assert allowlist["aud"] == DESKTOP
    assert emulator.counters()[f"refresh:{IAP}"] == 1


def test_token_lifetime_and_clock_offset_are_controls(emulator):
    emulator.settings(token_lifetime=30, clock_offset=1000)
    rt = login(emulator)["refresh_token"]
    claims = unverified_claims(refresh(emulator, rt, IAP).json()["id_token"])
    assert claims["exp"] - claims["iat"] == 30
    import time
    assert abs(claims["iat"] - (time.time() + 1000)) < 30


def test_pkce_code_reuse_and_redirect_checks(emulator):
    secret = desktop_secret(emulator)
    verifier = "v" * 50
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    base = {"client_id": DESKTOP, "response_type": "code", "scope": "openid email", "state": "s1",
            "redirect_uri": "http://127.0.0.1:5555/cb", "code_challenge": challenge, "code_challenge_method": "S256"}
    auth = emulator.url("oauth_auth_url")

    bad_redirect = requests.get(auth + "?" + urlencode({**base, "redirect_uri": "https://evil.example/cb"}),
                                allow_redirects=False, timeout=10)
    assert bad_redirect.status_code == 400 and "redirect_uri_mismatch" in bad_redirect.text
    no_pkce = {k: v for k, v in base.items() if not k.startswith("code_challenge")}
    assert follow_to_code(auth + "?" + urlencode(no_pkce))["error"] == "invalid_request"

    code = follow_to_code(auth + "?" + urlencode(base))["code"]
    exchange = {"grant_type": "authorization_code", "code": code, "client_id": DESKTOP, "client_secret": secret,
                "redirect_uri": base["redirect_uri"], "code_verifier": "w" * 50}
    wrong = requests.post(emulator.url("token_url"), data=exchange, timeout=10)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    # The failed attempt consumed the code, as at Google: codes are single-use.
    again = requests.post(emulator.url("token_url"), data={**exchange, "code_verifier": verifier}, timeout=10)
    assert again.json()["error"] == "invalid_grant"

    code = follow_to_code(auth + "?" + urlencode(base))["code"]
    bad_secret = requests.post(emulator.url("token_url"), data={**exchange, "code": code, "client_secret": "x"}, timeout=10)
    assert bad_secret.status_code == 401 and bad_secret.json()["error"] == "invalid_client"


def test_deny_mode_redirects_access_denied(emulator):
    emulator.settings(approve="deny")
    q = {"client_id": DESKTOP, "response_type": "code", "scope": "openid email", "state": "xyz",
         "redirect_uri": "http://localhost:1/", "code_challenge": "a" * 43, "code_challenge_method": "S256"}
    params = follow_to_code(emulator.url("oauth_auth_url") + "?" + urlencode(q))
    assert params == {"error": "access_denied", "error_description": "The user denied access", "state": "xyz"}


def test_consent_page_then_approve(emulator):
    emulator.settings(approve="consent")
    q = {"client_id": DESKTOP, "response_type": "code", "scope": "openid email", "state": "st",
         "redirect_uri": "http://127.0.0.1:1/", "code_challenge": "a" * 43, "code_challenge_method": "S256"}
    page = requests.get(emulator.url("oauth_auth_url") + "?" + urlencode(q), timeout=10)
    assert page.status_code == 200 and "Allow" in page.text
    ticket = page.text.split('name="ticket" value="')[1].split('"')[0]
    resp = requests.post(emulator.url("oauth_auth_url") + "/approve", data={"ticket": ticket, "state": "st"},
                         allow_redirects=False, timeout=10)
    assert resp.status_code == 302 and "code=" in resp.headers["Location"] and "state=st" in resp.headers["Location"]


def test_errors_are_google_shaped(emulator):
    rt = login(emulator)["refresh_token"]
    secret = desktop_secret(emulator)
    emulator.fault("500")
    emulator.fault("429")
    emulator.fault("invalid_rapt")
    assert refresh(emulator, rt, IAP, secret).status_code == 500
    assert refresh(emulator, rt, IAP, secret).status_code == 429
    rapt = refresh(emulator, rt, IAP, secret)
    assert rapt.status_code == 400
    assert rapt.json()["error"] == "invalid_grant" and rapt.json()["error_subtype"] == "invalid_rapt"
    assert refresh(emulator, rt, IAP, secret).status_code == 200  # faults are one-shot
    assert emulator.revoke_user() >= 1
    revoked = refresh(emulator, rt, IAP, secret)
    assert revoked.status_code == 400 and revoked.json() == {
        "error": "invalid_grant", "error_description": "Token has been expired or revoked."}


def test_dropped_connection_and_delay_faults(emulator):
    rt = login(emulator)["refresh_token"]
    secret = desktop_secret(emulator)
    emulator.fault("drop")
    with pytest.raises(requests.ConnectionError):
        refresh(emulator, rt, IAP, secret)
    emulator.fault("delay", delay=0.3)
    resp = refresh(emulator, rt, IAP, secret)
    assert resp.status_code == 200 and resp.elapsed.total_seconds() >= 0.3


def test_revoke_endpoint(emulator):
    rt = login(emulator)["refresh_token"]
    assert requests.post(emulator.url("revoke_url"), data={"token": rt}, timeout=10).status_code == 200
    assert refresh(emulator, rt, IAP).json()["error"] == "invalid_grant"
    assert requests.post(emulator.url("revoke_url"), data={"token": rt}, timeout=10).status_code == 400


def test_certs_jwks_and_discovery(emulator):
    pem = requests.get(emulator.url("certs_url"), timeout=10).json()
    jwks = requests.get(emulator.url("jwks_url"), timeout=10).json()
    (kid,) = pem
    assert pem[kid].startswith("-----BEGIN CERTIFICATE-----") and jwks["keys"][0]["kid"] == kid
    disco = requests.get(emulator.url("discovery_url"), timeout=10).json()
    assert disco["token_endpoint"] == emulator.url("token_url") and "S256" in disco["code_challenge_methods_supported"]


def test_service_account_key_file_with_google_auth(emulator):
    key = emulator.config_path.parent / "emulator-sa-key.json"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    creds = service_account.IDTokenCredentials.from_service_account_file(str(key), target_audience=IAP)
    creds.refresh(google.auth.transport.requests.Request())
    claims = verify(emulator, creds.token, IAP)
    assert claims["email"] == json.loads(key.read_text())["client_email"]


def test_metadata_server_with_google_auth(emulator):
    # google-auth reads GCE_METADATA_HOST when it is imported: run it in a fresh interpreter.
    code = (
        "import google.auth.transport.requests as r, google.auth.compute_engine as ce, sys\n"
        "c = ce.IDTokenCredentials(r.Request(), sys.argv[1], use_metadata_identity_endpoint=True)\n"
        "c.refresh(r.Request()); print(c.token)\n"
    )
    env = {**os.environ, "GCE_METADATA_HOST": emulator.url("metadata_host"), "GCE_METADATA_IP": emulator.url("metadata_host")}
    out = subprocess.run([sys.executable, "-c", code, IAP], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    claims = verify(emulator, out.stdout.strip(), IAP)
    assert claims["email"].endswith("-compute@developer.gserviceaccount.com")
    no_flavor = requests.get(emulator.url("metadata_url") + "/computeMetadata/v1/instance/service-accounts/default/email",
                             timeout=10)
    assert no_flavor.status_code == 403


def test_secret_manager_client_with_endpoint_override(emulator):
    from google.api_core.client_options import ClientOptions
    from google.cloud import secretmanager

    creds = adc_credentials(emulator)
    client = secretmanager.SecretManagerServiceClient(
        credentials=creds, transport="rest", client_options=ClientOptions(api_endpoint=emulator.url("secret_manager_url")))
    resp = client.access_secret_version(name="projects/iapd-demo/secrets/iap-desktop-client-secret/versions/latest")
    assert resp.payload.data.decode().startswith("GOCSPX-")
    assert resp.payload.data_crc32c == crc32c(resp.payload.data)
    unauth = requests.get(emulator.url("secret_manager_url") + "/v1/projects/iapd-demo/secrets/x/versions/1:access", timeout=10)
    assert unauth.status_code == 401 and unauth.json()["error"]["status"] == "UNAUTHENTICATED"


def test_iam_generate_id_token(emulator):
    key = emulator.config_path.parent / "emulator-sa-key.json"
    creds = service_account.Credentials.from_service_account_file(
        str(key), scopes=["https://www.googleapis.com/auth/cloud-platform"])
    creds.refresh(google.auth.transport.requests.Request())
    url = emulator.url("iam_credentials_url") + "/v1/projects/-/serviceAccounts/{}:generateIdToken"
    headers = {"Authorization": f"Bearer {creds.token}"}
    ok = requests.post(url.format("deployer@iapd-demo.iam.gserviceaccount.com"), headers=headers,
                       json={"audience": IAP, "includeEmail": True}, timeout=10)
    assert ok.status_code == 200
    assert verify(emulator, ok.json()["token"], IAP)["email"] == "deployer@iapd-demo.iam.gserviceaccount.com"
    # Nobody granted demo-ci the right to impersonate the compute default account.
    denied = requests.post(url.format("123456789012-compute@developer.gserviceaccount.com"), headers=headers,
                           json={"audience": IAP}, timeout=10)
    assert denied.status_code == 403 and denied.json()["error"]["status"] == "PERMISSION_DENIED"


class TestIAP:
    def token(self, emulator, audience=IAP) -> str:
        return refresh(emulator, login(emulator)["refresh_token"], audience).json()["id_token"]

    def test_admits_good_token_and_rewrites_headers(self, emulator):
        tok = self.token(emulator)
        resp = requests.post(emulator.url("iap_url") + "/api/v1/projects?x=1", data="hi", timeout=10,
                             headers={"Proxy-Authorization": f"Bearer {tok}", "Authorization": "Bearer app-token"})
        assert resp.status_code == 200, resp.text
        echo = resp.json()
        assert echo["path"] == "/api/v1/projects?x=1" and echo["body"] == "hi" and echo["method"] == "POST"
        assert echo["user"] == "accounts.google.com:demo@example.com"
        assert "Proxy-Authorization" not in echo["headers"]
        assert echo["headers"]["Authorization"] == "Bearer app-token"

    def test_allowlisted_desktop_client_is_admitted(self, emulator):
        tok = self.token(emulator, audience=None)
        resp = requests.get(emulator.url("iap_url") + "/", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
        assert resp.status_code == 200

    def test_refuses_missing_wrong_audience_expired_and_forged(self, emulator):
        iap = emulator.url("iap_url") + "/"
        # No credentials: a program's AJAX-style request gets a 401; anything else, Google's sign-in.
        missing = requests.get(iap, headers={"X-Requested-With": "XMLHttpRequest"}, timeout=10)
        assert missing.status_code == 401 and "Invalid IAP credentials" in missing.text
        assert missing.headers["Content-Type"].startswith("text/html")
        assert missing.headers["X-Goog-IAP-Generated-Response"] == "true"
        sign_in = requests.get(iap, allow_redirects=False, timeout=10)
        assert sign_in.status_code == 302 and sign_in.headers["X-Goog-IAP-Generated-Response"] == "true"
        assert sign_in.headers["Location"].startswith(emulator.url("oauth_auth_url") + "?client_id=" + IAP)

        wrong_aud = self.token(emulator, audience="123456789012-adc.apps.googleusercontent.com")
        assert requests.get(iap, headers={"Proxy-Authorization": f"Bearer {wrong_aud}"}, timeout=10).status_code == 401

        good = self.token(emulator)
        head, body, sig = good.split(".")
        forged_sig = sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")
        assert requests.get(iap, headers={"Proxy-Authorization": f"Bearer {head}.{body}.{forged_sig}"},
                            timeout=10).status_code == 401
        claims = json.loads(base64.urlsafe_b64decode(body + "=="))
        claims["email"] = "mallory@example.com"
        tampered = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        assert requests.get(iap, headers={"Proxy-Authorization": f"Bearer {head}.{tampered}.{sig}"},
                            timeout=10).status_code == 401

        assert requests.get(iap, headers={"Proxy-Authorization": f"Bearer {good}"}, timeout=10).status_code == 200
        emulator.settings(clock_offset=3700)  # an hour later at Google: the token has expired
        expired = requests.get(iap, headers={"Proxy-Authorization": f"Bearer {good}"}, timeout=10)
        assert expired.status_code == 401 and "expired" in expired.text


def test_write_config_is_complete(emulator):
    config = load_config(emulator.config_path)
    assert set(config.profiles) == {"demo-user", "demo-sa", "demo-jwt", "demo-oidc", "demo-flyte"}
    assert config.profiles["demo-flyte"].oidc.via == "demo-user"
    assert config.profiles["demo-jwt"].jwt_audience == emulator.url("iap_url") + "/*"
    user = config.profiles["demo-user"]
    assert user.audience == IAP and user.user.client_secret_name and user.user.secret_manager_credentials
    assert config.endpoints.token_url == emulator.url("token_url")
    assert config.profiles["demo-sa"].service_account.kind == "key_file"
    assert oct(emulator.config_path.stat().st_mode & 0o777) == "0o600"


def test_emulator_refuses_non_loopback_host():
    out = subprocess.run([sys.executable, "-m", "iapd", "emulator", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "loopback" in out.stderr
