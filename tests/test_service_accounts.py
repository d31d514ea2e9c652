"""Service-account ID tokens for CI, each kind over HTTP against the emulator, through the daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import wait_for
from iapd.jwt import unverified_claims

IAPCTL = shutil.which("iapctl", path=os.path.dirname(sys.executable))
IAP = "123456789012-iap.apps.googleusercontent.com"
DEMO_CI = "demo-ci@iapd-demo.iam.gserviceaccount.com"
DEPLOYER = "deployer@iapd-demo.iam.gserviceaccount.com"
COMPUTE = "123456789012-compute@developer.gserviceaccount.com"


def profiles(emulator, tmp_path, extra: str) -> "os.PathLike":
    folder = emulator.config_path.parent
    text = emulator.config_path.read_text().replace("@FOLDER@", str(folder))
    path = tmp_path / "sa.toml"
    path.write_text(text + extra.replace("@FOLDER@", str(folder)).replace("@IAP@", IAP))
    return path


SOURCES = """
[profiles.metadata]
audience = "@IAP@"
[profiles.metadata.service_account]
kind = "metadata"

[profiles.adc-key]
audience = "@IAP@"
[profiles.adc-key.service_account]
kind = "adc"
credentials_file = "@FOLDER@/emulator-sa-key.json"

[profiles.wif]
audience = "@IAP@"
[profiles.wif.service_account]
kind = "adc"
credentials_file = "@FOLDER@/emulator-wif.json"

[profiles.adc-impersonated]
audience = "@IAP@"
[profiles.adc-impersonated.service_account]
kind = "adc"
credentials_file = "@FOLDER@/emulator-impersonated.json"

[profiles.impersonate-from-user]
audience = "@IAP@"
[profiles.impersonate-from-user.service_account]
kind = "impersonate"
target = "deployer@iapd-demo.iam.gserviceaccount.com"
credentials_file = "@FOLDER@/emulator-adc.json"

[profiles.impersonate-chain]
audience = "@IAP@"
[profiles.impersonate-chain.service_account]
kind = "impersonate"
target = "demo-ci@iapd-demo.iam.gserviceaccount.com"
delegates = ["deployer@iapd-demo.iam.gserviceaccount.com"]
credentials_file = "@FOLDER@/emulator-adc.json"

[profiles.impersonate-denied]
audience = "@IAP@"
[profiles.impersonate-denied.service_account]
kind = "impersonate"
target = "123456789012-compute@developer.gserviceaccount.com"
credentials_file = "@FOLDER@/emulator-sa-key.json"

[profiles.adc-user-login]
audience = "@IAP@"
[profiles.adc-user-login.service_account]
kind = "adc"
credentials_file = "@FOLDER@/emulator-adc.json"

[profiles.key-missing]
audience = "@IAP@"
[profiles.key-missing.service_account]
kind = "key_file"
key_file = "/nonexistent/key.json"
"""


@pytest.fixture
def sa_daemon(daemon_factory, emulator, tmp_path):
    return daemon_factory(config=profiles(emulator, tmp_path, SOURCES), name="sa")


def iap_admits(emulator, token: str) -> bool:
    return requests.get(emulator.url("iap_url"), headers={"Proxy-Authorization": f"Bearer {token}"},
                        timeout=10).status_code == 200


@pytest.mark.parametrize("profile, email", [
    ("demo-sa", DEMO_CI),
    ("metadata", COMPUTE),
    ("adc-key", DEMO_CI),
    ("wif", DEMO_CI),
    ("impersonate-from-user", DEPLOYER),
    ("adc-impersonated", DEPLOYER),  # gcloud's --impersonate-service-account ADC file
    ("impersonate-chain", DEMO_CI),
])
def test_each_kind_yields_a_token_iap_admits(sa_daemon, emulator, profile, email):
    token = sa_daemon.token(profile)
    claims = unverified_claims(token)
    assert claims["aud"] == IAP and claims["email"] == email and claims["email_verified"] is True
    assert iap_admits(emulator, token)
    status = sa_daemon.profile_status(profile)
    assert status["identity"] == email and status["state"] == "ready" and status["kind"].startswith("service_account:")


def test_workload_identity_goes_through_sts(sa_daemon, emulator):
    sa_daemon.token("wif")
    counters = emulator.counters()
    # The federated token itself authorises generateIdToken (the pool's principal holds
    # getOpenIdToken on the service account); minting the target's access token first and
    # calling as the target would need a permission a service account lacks on itself.
    assert (counters["sts"], counters.get("iam_access_token", 0), counters["iam_credentials"]) == (1, 0, 1), counters


@pytest.mark.parametrize("profile, code, needle", [
    ("impersonate-denied", 6, "permission denied on impersonation"),
    ("key-missing", 5, "/nonexistent/key.json does not exist"),
    ("adc-user-login", 5, "cannot mint ID tokens for IAP"),
])
def test_errors_a_ci_log_can_act_on(sa_daemon, profile, code, needle):
    out = subprocess.run([IAPCTL, "token", profile], env={**sa_daemon.env, "IAPD_AUTOSTART": "0"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and needle in out.stderr, out.stderr
    assert "Traceback" not in sa_daemon.logs()


def test_metadata_server_unreachable(daemon_factory, emulator, tmp_path):
    config = tmp_path / "md.toml"
    config.write_text('[endpoints]\nmetadata_url = "http://127.0.0.1:9"\n'
                      f'[profiles.gke]\naudience = "{IAP}"\n[profiles.gke.service_account]\nkind = "metadata"\n')
    daemon = daemon_factory(config=config, name="md")
    out = subprocess.run([IAPCTL, "token", "gke"], env={**daemon.env, "IAPD_AUTOSTART": "0"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 6 and out.stdout == "" and "metadata server" in out.stderr and "GCE/GKE" in out.stderr


def test_service_account_without_audience_is_a_clear_error(daemon_factory, emulator, tmp_path):
    config = profiles(emulator, tmp_path, '[profiles.noaud.service_account]\nkind = "metadata"\n')
    daemon = daemon_factory(config=config, name="noaud")
    resp = daemon.request("GET", "/v1/token/noaud")
    assert resp.status == 422 and resp.json()["error"] == "bad_config" and "needs an `audience`" in resp.json()["message"]


def test_concurrency_renewal_and_faults_hold_for_service_accounts(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory("renew_before_seconds = 2.5\nmargin_seconds = 1\ntick_seconds = 0.5\n"
                            "backoff_initial_seconds = 0.1\nbackoff_cap_seconds = 0.4\n", name="sa-renew")
    emulator.fault("delay", delay=0.5)
    with ThreadPoolExecutor(max_workers=50) as pool:
        tokens = set(pool.map(lambda _: daemon.token("demo-sa"), range(50)))
    assert len(tokens) == 1 and emulator.counters()[f"sa_id_token:{IAP}"] == 1
    first = tokens.pop()
    emulator.fault("503", count=2)
    daemon.set_clock(3600 - 2)  # renewal due now; Google fails twice
    assert daemon.token("demo-sa") == first  # the valid token is served meanwhile
    wait_for(lambda: emulator.counters().get(f"sa_id_token:{IAP}", 0) == 2, what="the renewal after two 503s")
    assert emulator.counters()["fault:token:503"] == 2


def test_flyte_iap_drop_in_with_workload_identity_file(daemon, emulator):
    wif = str(emulator.config_path.parent / "emulator-wif.json")
    env = {**daemon.env, "IAPD_AUTOSTART": "0", "GOOGLE_APPLICATION_CREDENTIALS": wif}
    out = subprocess.run([IAPCTL, "generate-service-account-id-token", "--webapp_client_id", IAP], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert unverified_claims(out.stdout.strip())["email"] == DEMO_CI
