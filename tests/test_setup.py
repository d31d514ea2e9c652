"""`iapctl setup URL` (from an app's URL to a working profile) and `iapctl doctor URL` (why IAP
there would refuse a profile's token), as a person runs them: iapctl as a subprocess, the real
daemon, the emulated IAP and gateway over HTTP."""

from __future__ import annotations

import os
import stat
import tomllib

import pytest

from test_client import CURL_BROWSER, iapctl
from test_oidc import env_of
from iapctl.probe import Guard, before_sending

IAP = "123456789012-iap.apps.googleusercontent.com"
DESKTOP = "123456789012-desktop.apps.googleusercontent.com"
ADC = "123456789012-adc.apps.googleusercontent.com"
SECRET_NAME = "projects/iapd-demo/secrets/iap-desktop-client-secret/versions/latest"


def setup_env(daemon, tmp_path) -> dict:
    return env_of(daemon, tmp_path, BROWSER=CURL_BROWSER)


def test_setup_from_the_iap_url_writes_a_profile_reusing_the_login_and_proves_it(daemon, emulator, tmp_path):
    env = setup_env(daemon, tmp_path)
    before = daemon.config.read_text()
    out = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app", env=env)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "let in as demo@example.com (HTTP 200)" in out.stdout and "reused" in out.stdout, out.stdout
    after = daemon.config.read_text()
    assert after.startswith(before)  # the user's text and comments, kept byte for byte
    profile = tomllib.loads(after)["profiles"]["app"]
    assert profile["audience"] == IAP  # IAP's client id, from its sign-in redirect
    assert profile["user"] == tomllib.loads(before)["profiles"]["demo-user"]["user"]  # the same login
    assert stat.S_IMODE(os.stat(daemon.config).st_mode) == 0o600
    assert iapctl("token", "app", env=env).returncode == 0
    assert len([k for k in daemon.records() if k.startswith("user:")]) == 1  # one login for both profiles

    again = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app", env=env)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert daemon.config.read_text() == after
    forced = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    text = daemon.config.read_text()
    assert text.count("[profiles.app]") == 1 and text.startswith(before)


def test_setup_dry_run_prints_the_toml_and_changes_nothing(daemon, emulator, tmp_path):
    before = daemon.config.read_text()
    out = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app", "--dry-run", env=setup_env(daemon, tmp_path))
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["profiles"]["app"]["audience"] == IAP
    assert daemon.config.read_text() == before and "app" not in {p["name"] for p in daemon.status()["profiles"]}


def test_setup_without_a_login_to_reuse_says_where_the_desktop_client_is_then_takes_it_from_flags(
        daemon_factory, emulator, tmp_path):
    only_sa = emulator.config_path.read_text().split("[profiles.demo-user]")[0] + \
        "[profiles.demo-sa]" + emulator.config_path.read_text().split("[profiles.demo-sa]")[1].split("\n\n")[0] + "\n"
    config = tmp_path / "sa-only.toml"
    config.write_text(only_sa)
    # The daemon reads the secret from the emulated Secret Manager with ADC: the emulator's file.
    adc = str(emulator.config_path.parent / "emulator-adc.json")
    daemon = daemon_factory(config=config, name="sa", env={"GOOGLE_APPLICATION_CREDENTIALS": adc})
    env = setup_env(daemon, tmp_path)
    out = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app", env=env)
    assert out.returncode == 2 and "no Google login in the config to reuse" in out.stderr
    assert "--client-id" in out.stderr and "Credentials" in out.stderr
    out = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app", "--client-id", DESKTOP,
                 "--client-secret-name", SECRET_NAME, env=env)
    assert out.returncode == 0 and "let in as demo@example.com" in out.stdout, (out.stdout, out.stderr)
    assert tomllib.loads(daemon.config.read_text())["profiles"]["app"]["user"] == {
        "client_id": DESKTOP, "client_secret_name": SECRET_NAME}


def test_setup_behind_an_oidc_gateway_writes_an_oidc_profile(daemon, emulator, tmp_path):
    env = setup_env(daemon, tmp_path)
    out = iapctl("setup", emulator.url("gateway_url") + "/pipeline/", "--profile", "kf", env=env)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "let in as alice@example.com" in out.stdout
    profile = tomllib.loads(daemon.config.read_text())["profiles"]["kf"]["oidc"]
    assert profile == {"issuer": emulator.url("oidc_issuer"), "client_id": "kubeflow-cli"}


@pytest.mark.parametrize("url, code, said", [
    ("@BACKEND@/", 5, "nothing guards it"),
    ("http://example.com/", 2, "plain http to another machine"),
    ("ftp://example.com/", 2, "expected the app's URL"),
    ("https://example.com/\n[daemon]", 2, "expected the app's URL"),
])
def test_setup_refuses_what_it_cannot_use_and_writes_nothing(daemon, emulator, tmp_path, url, code, said):
    before = daemon.config.read_text()
    out = iapctl("setup", url.replace("@BACKEND@", emulator.url("backend_url")), "--profile", "x",
                 env=setup_env(daemon, tmp_path))
    assert out.returncode == code and said in out.stderr, out.stderr
    assert daemon.config.read_text() == before


def test_setup_refuses_to_write_a_config_the_daemon_does_not_read(daemon, emulator, tmp_path):
    """IAPD_CONFIG names a copy, the daemon serves the original: a profile written there would
    never be served, so setup says which file iapd reads and writes nothing."""
    other = tmp_path / "other.toml"
    other.write_text(daemon.config.read_text())
    other.chmod(0o600)
    out = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "x",
                 env={**setup_env(daemon, tmp_path), "IAPD_CONFIG": str(other)})
    assert out.returncode == 5 and f"iapd reads {daemon.config}, not {other}" in out.stderr, out.stderr
    assert other.read_text() == daemon.config.read_text()


# -- doctor URL ---------------------------------------------------------------------------------

def with_profiles(daemon, text: str) -> None:
    with open(daemon.config, "a") as fh:
        fh.write(text)
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]


def doctor(daemon, tmp_path, url: str, *profile: str):
    if daemon.profile_status("demo-user")["state"] == "login_required":
        assert daemon.login("demo-user")["state"] == "done"
    return iapctl("doctor", url, *(("--profile", profile[0]) if profile else ()), env=setup_env(daemon, tmp_path))


def test_doctor_url_is_all_good_for_a_working_profile(daemon, emulator, tmp_path):
    out = doctor(daemon, tmp_path, emulator.url("iap_url") + "/", "demo-user")
    assert out.returncode == 0 and "All good." in out.stdout, out.stdout
    assert "let in as demo@example.com" in out.stdout and f"IAP's OAuth client {IAP}" in out.stdout


def test_doctor_url_names_a_wrong_audience_showing_both(daemon, emulator, tmp_path):
    user = tomllib.loads(daemon.config.read_text())["profiles"]["demo-user"]["user"]
    with_profiles(daemon, f'\n[profiles.wrong]\naudience = "{ADC}"\n[profiles.wrong.user]\n'
                          + "".join(f'{k} = "{v}"\n' for k, v in user.items()))
    out = doctor(daemon, tmp_path, emulator.url("iap_url") + "/", "wrong")
    assert out.returncode == 1, out.stdout
    assert f"wrong audience: the token is for {ADC}" in out.stdout and f"expects {IAP}" in out.stdout
    assert f'set audience = "{IAP}"' in out.stdout


def test_doctor_url_names_a_desktop_client_missing_from_the_allowlist(daemon, emulator, tmp_path):
    user = tomllib.loads(daemon.config.read_text())["profiles"]["demo-user"]["user"]
    with_profiles(daemon, "\n[profiles.allow.user]\n" + "".join(f'{k} = "{v}"\n' for k, v in user.items()))
    assert doctor(daemon, tmp_path, emulator.url("iap_url") + "/", "allow").returncode == 0  # allowlisted: fine
    emulator._post("allowlist", {"clients": []})
    out = doctor(daemon, tmp_path, emulator.url("iap_url") + "/", "allow")
    assert out.returncode == 1 and f"desktop client {DESKTOP}: it is not in this app's programmatic allowlist" in out.stdout
    assert "programmaticClients" in out.stdout and f'audience = "{IAP}"' in out.stdout


def test_doctor_url_names_an_access_level_a_command_line_cannot_meet(daemon, emulator, tmp_path):
    emulator.settings(iap_access_level=True)
    out = doctor(daemon, tmp_path, emulator.url("iap_url") + "/", "demo-user")
    assert out.returncode == 1 and "an access level (context-aware access" in out.stdout, out.stdout


def test_doctor_url_names_a_signed_jwt_whose_aud_does_not_cover_the_url(daemon, emulator, tmp_path):
    out = doctor(daemon, tmp_path, emulator.url("flyte_url") + "/", "demo-jwt")
    assert out.returncode == 1, out.stdout
    assert f"the signed JWT's aud '{emulator.url('iap_url')}/*' does not cover {emulator.url('flyte_url')}/" in out.stdout
    assert f'set jwt_audience = "{emulator.url("flyte_url")}/*"' in out.stdout
    assert doctor(daemon, tmp_path, emulator.url("iap_url") + "/x", "demo-jwt").returncode == 0


def test_doctor_url_picks_the_profile_whose_audience_iap_names(daemon_factory, emulator, tmp_path):
    both = daemon_factory(name="both")
    out = doctor(both, tmp_path, emulator.url("iap_url") + "/")
    assert out.returncode == 2 and "profiles for this app: demo-jwt, demo-sa, demo-user" in out.stderr  # (jwt: its aud)
    text = emulator.config_path.read_text().replace(f'[profiles.demo-sa]\naudience = "{IAP}"', "[profiles.demo-sa]")
    config = tmp_path / "one.toml"
    from iapctl.setup import without_profile

    config.write_text(without_profile(text.replace('[profiles.demo-sa]\n[profiles.demo-sa.service_account]',
                                                   "[profiles.demo-sa.service_account]"), "demo-jwt"))
    one = daemon_factory(config=config, name="one")
    out = doctor(one, tmp_path, emulator.url("iap_url") + "/")
    assert out.returncode == 0 and "profile demo-user" in out.stdout, out.stdout


def test_a_token_without_an_email_claim_is_named_before_it_is_sent():
    guard = Guard("google_iap", "seen", client_id=IAP, hops=["302 https://app.example.com/"])
    findings = before_sending({"iss": "https://accounts.google.com", "aud": IAP, "sub": "1"},
                              "https://app.example.com/", guard, {"name": "p", "mode": "audience"})
    assert [f.what for f in findings] == ["the token has no email claim, which IAP requires"]
    assert before_sending({"iss": "https://accounts.google.com", "aud": IAP, "sub": "1", "email": "a@b.c"},
                          "https://app.example.com/", guard, {"name": "p", "mode": "audience"}) == []


def test_setup_dry_run_never_prints_a_client_secret(daemon, emulator, tmp_path):
    secret = "GOCSPX-do-not-show-me"
    out = iapctl("setup", emulator.url("iap_url") + "/", "--profile", "app2", "--client-id", DESKTOP,
                 "--client-secret", secret, "--dry-run", env=setup_env(daemon, tmp_path))
    assert out.returncode == 0 and secret not in out.stdout + out.stderr and "client_secret = " in out.stdout
