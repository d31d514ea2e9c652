"""`iapd emulator --write-config`: a complete iapd config plus the credential files it names."""

from __future__ import annotations

import json
from pathlib import Path

from iapd.emulator.state import (
    ADC_CLIENT_ID, DEMO_SA_EMAIL, DEPLOYER_SA_EMAIL, DESKTOP_CLIENT_ID, DESKTOP_SECRET_NAME, IAP_CLIENT_ID, PROJECT, WIF_AUDIENCE,
    WIF_ISSUER, WIF_SUBJECT, EmulatorState,
)
from iapd.fsutil import atomic_write


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_demo_files(config_path: Path, state: EmulatorState, urls: dict[str, str]) -> Path:
    folder = config_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    adc_path = folder / "emulator-adc.json"
    key_path = folder / "emulator-sa-key.json"

    adc = {"type": "authorized_user", "client_id": ADC_CLIENT_ID, "client_secret": state.clients[ADC_CLIENT_ID].secret,
           "refresh_token": state.issue_refresh_token(ADC_CLIENT_ID, state.user_email, "https://www.googleapis.com/auth/cloud-platform"),
           "token_uri": urls["token_url"], "quota_project_id": PROJECT}
    atomic_write(adc_path, json.dumps(adc, indent=2).encode())

    # Workload identity federation, as `gcloud iam workload-identity-pools create-cred-config`
    # writes it for CI: a subject token from a file (in CI, the OIDC token of the job).
    subject_path = folder / "emulator-oidc-token.jwt"
    now = int(state.now())
    subject = state.signing_key.sign({"iss": WIF_ISSUER, "aud": WIF_AUDIENCE, "sub": WIF_SUBJECT,
                                      "iat": now, "exp": now + 24 * 3600})
    atomic_write(subject_path, subject.encode())
    wif = {"type": "external_account", "audience": WIF_AUDIENCE,
           "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_url": urls["sts_url"],
           "service_account_impersonation_url":
               f"{urls['iam_credentials_url']}/v1/projects/-/serviceAccounts/{DEMO_SA_EMAIL}:generateAccessToken",
           "credential_source": {"file": str(subject_path), "format": {"type": "text"}}}
    atomic_write(folder / "emulator-wif.json", json.dumps(wif, indent=2).encode())

    # What `gcloud auth application-default login --impersonate-service-account=deployer@…` writes.
    impersonated = {"type": "impersonated_service_account", "delegates": [], "source_credentials": adc,
                    "service_account_impersonation_url":
                        f"{urls['iam_credentials_url']}/v1/projects/-/serviceAccounts/{DEPLOYER_SA_EMAIL}:generateAccessToken"}
    atomic_write(folder / "emulator-impersonated.json", json.dumps(impersonated, indent=2).encode())

    sa = state.service_accounts[DEMO_SA_EMAIL]
    key = {"type": "service_account", "project_id": PROJECT, "private_key_id": sa.key.kid,
           "private_key": sa.key.private_pem, "client_email": sa.email, "client_id": sa.unique_id,
           "auth_uri": urls["oauth_auth_url"], "token_uri": urls["token_url"]}
    atomic_write(key_path, json.dumps(key, indent=2).encode())

    lines = [
        "# Written by `iapd emulator --write-config`: every endpoint points at the emulator.",
        "# The credentials below are valid only while that emulator process runs.",
        "",
        "[endpoints]",
        *(f"{key} = {_toml_str(urls[src])}" for key, src in [
            ("auth_url", "oauth_auth_url"), ("token_url", "token_url"), ("revoke_url", "revoke_url"),
            ("secret_manager_url", "secret_manager_url"),
            ("metadata_url", "metadata_url"), ("iam_credentials_url", "iam_credentials_url")]),
        "",
        "[profiles.demo-user]",
        f"audience = {_toml_str(IAP_CLIENT_ID)}",
        "[profiles.demo-user.user]",
        f"client_id = {_toml_str(DESKTOP_CLIENT_ID)}",
        f"client_secret_name = {_toml_str(DESKTOP_SECRET_NAME)}",
        f"secret_manager_credentials = {_toml_str(str(adc_path))}",
        "",
        "[profiles.demo-sa]",
        f"audience = {_toml_str(IAP_CLIENT_ID)}",
        "[profiles.demo-sa.service_account]",
        'kind = "key_file"',
        f"key_file = {_toml_str(str(key_path))}",
        "",
        "# The same service account, signing its own JWT for the app's URL: no token endpoint at all.",
        "[profiles.demo-jwt]",
        f"jwt_audience = {_toml_str(urls['iap_url'] + '/*')}",
        "[profiles.demo-jwt.service_account]",
        'kind = "key_file"',
        f"key_file = {_toml_str(str(key_path))}",
        "",
        "# The emulated OpenID Connect issuer (Dex-like); it accepts the public client kubeflow-cli",
        "# (authorization code + PKCE, device grant) and the confidential ci-bot (client credentials).",
        "[profiles.demo-oidc.oidc]",
        f"issuer = {_toml_str(urls['oidc_issuer'])}",
        'client_id = "kubeflow-cli"',
        "",
        "# Flyte's own login behind IAP: the same issuer, reached through a second emulated IAP",
        "# with demo-user's token in Proxy-Authorization.",
        "[profiles.demo-flyte.oidc]",
        f"issuer = {_toml_str(urls['flyte_issuer'])}",
        'client_id = "kubeflow-cli"',
        'via = "demo-user"',
        "",
    ]
    atomic_write(config_path, "\n".join(lines).encode())
    return config_path
