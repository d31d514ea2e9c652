"""IAP's second credential: a JWT the service account signs itself, for the app's URL.

Through the daemon and `iapctl token`, against the emulated IAP, which checks the signature with
the keys the emulated Google publishes for the account (where Google does), the `aud` against the
URL asked for, and the one-hour limit."""

from __future__ import annotations

import base64
import re
import json
import time

import pytest
import requests
from google.auth import crypt
from google.auth import jwt as google_jwt

from conftest import wait_for
from test_client import failed, iapctl
from test_oidc import env_of
from test_service_accounts import DEMO_CI, DEPLOYER, profiles

TOKEN_ENDPOINTS = ("token", "iam_credentials", "iam_sign_jwt", "metadata", "metadata_token", "sts")


def header_of(token: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))


def calls_to_google(emulator) -> dict:
    return {k: v for k, v in emulator.counters().items() if k in TOKEN_ENDPOINTS and v}


def test_a_key_file_profile_signs_its_own_jwt_gets_a_200_and_calls_no_token_endpoint(daemon, emulator, tmp_path):
    env = env_of(daemon, tmp_path)
    out = iapctl("token", "demo-jwt", env=env)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = google_jwt.decode(token, verify=False)
    key = json.loads((emulator.config_path.parent / "emulator-sa-key.json").read_text())
    assert claims["iss"] == claims["sub"] == DEMO_CI and claims["aud"] == emulator.url("iap_url") + "/*"
    assert claims["exp"] - claims["iat"] == 3600 and abs(claims["iat"] - time.time()) < 60
    assert header_of(token)["kid"] == key["private_key_id"]

    app = requests.get(emulator.url("iap_url") + "/api/v1/projects", headers={"Authorization": f"Bearer {token}"},
                       timeout=10)
    assert app.status_code == 200 and app.json()["user"] == f"accounts.google.com:{DEMO_CI}", app.status_code
    # Another app (the second emulated IAP) is not covered by this `aud`.
    other = requests.get(emulator.url("flyte_url") + "/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert other.status_code == 401 and "does not match" in other.text

    # Renewed like every other token, before it ends — and still without a call to Google.
    daemon.set_clock(3000, 3000)
    wait_for(lambda: daemon.profile_status("demo-jwt")["refresh_count"] == 2, what="the JWT's renewal")
    # (signed on the system's clock, which IAP reads it by: the daemon's test clock moved alone)
    renewed = iapctl("token", "demo-jwt", env=env).stdout.strip()
    assert requests.get(emulator.url("iap_url") + "/", headers={"Authorization": f"Bearer {renewed}"},
                        timeout=10).status_code == 200
    status = daemon.profile_status("demo-jwt")
    assert status["mode"] == "signed_jwt" and status["audience"] == emulator.url("iap_url") + "/*"
    assert calls_to_google(emulator) == {}, calls_to_google(emulator)


def _sa_jwt(emulator, **changes) -> str:
    """A JWT signed with demo-ci's key by hand, to play each mistake IAP must refuse."""
    key = json.loads((emulator.config_path.parent / "emulator-sa-key.json").read_text())
    kid = changes.pop("kid", key["private_key_id"])
    now = int(time.time())
    claims = {"iss": DEMO_CI, "sub": DEMO_CI, "aud": emulator.url("iap_url") + "/*", "iat": now, "exp": now + 3600,
              **changes}
    signer = crypt.RSASigner.from_string(key["private_key"], key_id=kid)
    return google_jwt.encode(signer, claims).decode()


@pytest.mark.parametrize("changes, said", [
    ({}, None),
    ({"aud": "@IAP@/api/v1/projects"}, None),                            # the exact URL
    ({"aud": "@IAP@/api/*"}, None),                                      # a path wildcard
    ({"aud": "@IAP@/other"}, "does not match"),
    ({"aud": "https://app.example.com/*"}, "does not match"),
    ({"exp": +3700}, "more than an hour"),                               # (times: seconds from now)
    ({"iat": -7200, "exp": -3600}, "expired"),
    ({"kid": "0" * 40}, "0000"),                                         # a key id the account has not
    ({"sub": DEPLOYER}, "sub must be"),
])
def test_the_emulated_iap_refuses_a_signed_jwt_for_another_url_too_long_expired_or_of_a_wrong_key(
        emulator, changes, said):
    now = int(time.time())
    changes = {k: v.replace("@IAP@", emulator.url("iap_url")) if isinstance(v, str) else
               now + v if k in ("iat", "exp") else v for k, v in changes.items()}
    token = _sa_jwt(emulator, **changes)
    resp = requests.get(emulator.url("iap_url") + "/api/v1/projects", headers={"Authorization": f"Bearer {token}"},
                        timeout=10)
    # (what the echo app answers holds the token: never shown)
    if said is None:
        assert resp.status_code == 200, resp.status_code
    else:
        assert resp.status_code == 401 and said in resp.text, (resp.status_code, resp.text[:300])


SIGNED = """
[profiles.jwt-impersonate]
jwt_audience = "@URL@/*"
[profiles.jwt-impersonate.service_account]
kind = "impersonate"
target = "deployer@iapd-demo.iam.gserviceaccount.com"
credentials_file = "@FOLDER@/emulator-adc.json"

[profiles.jwt-metadata]
jwt_audience = "@URL@/*"
[profiles.jwt-metadata.service_account]
kind = "metadata"

[profiles.jwt-adc-key]
jwt_audience = "@URL@/*"
[profiles.jwt-adc-key.service_account]
kind = "adc"
credentials_file = "@FOLDER@/emulator-sa-key.json"
"""


def test_impersonation_and_the_metadata_server_sign_through_iam_credentials(daemon_factory, emulator, tmp_path):
    config = profiles(emulator, tmp_path, SIGNED.replace("@URL@", emulator.url("iap_url")))
    daemon = daemon_factory(config=config, name="signed")
    env = env_of(daemon, tmp_path)
    token = iapctl("token", "jwt-impersonate", env=env).stdout.strip()
    assert google_jwt.decode(token, verify=False)["iss"] == DEPLOYER
    assert header_of(token)["kid"]  # signJwt's key id
    app = requests.get(emulator.url("iap_url") + "/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert app.status_code == 200 and app.json()["user"] == f"accounts.google.com:{DEPLOYER}"
    assert emulator.counters()["sign_jwt"] == 1

    # The machine's account may not sign as itself until it is granted signJwt on itself.
    failed(iapctl("token", "jwt-metadata", env=env), 6, "permission denied on signJwt",
           "iam.serviceAccounts.signJwt")
    emulator._post("grant", {"target": "123456789012-compute@developer.gserviceaccount.com",
                             "member": "123456789012-compute@developer.gserviceaccount.com",
                             "role": "serviceAccountTokenCreator"})
    daemon.set_clock(3601, 3601)  # a refusal is retried hourly (refused_retry_seconds)
    token = iapctl("token", "jwt-metadata", env=env)
    assert token.returncode == 0, token.stderr
    app = requests.get(emulator.url("iap_url") + "/", headers={"Authorization": f"Bearer {token.stdout.strip()}"},
                       timeout=10)
    assert app.status_code == 200, app.status_code

    # ADC that is a key file signs here: no call.
    before = emulator.counters()["sign_jwt"]
    assert iapctl("token", "jwt-adc-key", env=env).returncode == 0
    assert emulator.counters()["sign_jwt"] == before


@pytest.mark.parametrize("body, said", [
    ('[profiles.p]\njwt_audience = "https://app.example.com/*"\n[profiles.p.user]\nclient_id = "c"\nclient_secret = "s"\n',
     "needs a [service_account] section"),
    ('[profiles.p]\njwt_audience = "https://app.example.com/*"\naudience = "x"\n'
     '[profiles.p.service_account]\nkind = "metadata"\n', "not both"),
    ('[profiles.p]\njwt_audience = "http://app.example.com/*"\n[profiles.p.service_account]\nkind = "metadata"\n',
     "must be https"),
    ('[profiles.p]\njwt_audience = "app.example.com"\n[profiles.p.service_account]\nkind = "metadata"\n',
     "expected the app's URL"),
])
def test_the_config_refuses_a_jwt_audience_that_cannot_work(tmp_path, body, said):
    from iapd.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_config(path)


def test_the_flyte_iap_drop_in_takes_a_jwt_audience(daemon, emulator, tmp_path):
    env = env_of(daemon, tmp_path)
    key = str(emulator.config_path.parent / "emulator-sa-key.json")
    url = emulator.url("iap_url") + "/*"
    for flags in (["--jwt_audience", url, "--service_account_key", key],   # the fast path
                  [f"--jwt_audience={url}", f"--service_account_key={key}"]):
        out = iapctl("generate-service-account-id-token", *flags, env=env)
        assert out.returncode == 0, out.stderr
        assert google_jwt.decode(out.stdout.strip(), verify=False)["aud"] == url
    both = iapctl("generate-service-account-id-token", "--jwt_audience", url, "--webapp_client_id", "x", env=env)
    assert both.returncode == 2 and "one of --webapp_client_id or --jwt_audience" in both.stderr
    assert calls_to_google(emulator) == {}
