"""Google credentials loaded with google-auth (synchronous: always called in a worker thread),
for the calls that need an OAuth access token: Secret Manager, IAM Credentials."""

from __future__ import annotations

import json
import os

from iapd.config import Endpoints
from iapd.errors import UpstreamError, UpstreamUnavailable

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


def adc_file() -> str | None:
    """Where application-default credentials live, without google.auth.default()'s metadata
    probe: $GOOGLE_APPLICATION_CREDENTIALS, else gcloud's well-known file, else None."""
    explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return explicit
    config_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
    well_known = os.path.join(config_dir, "application_default_credentials.json")
    return well_known if os.path.isfile(well_known) else None


def load_google_credentials(path: str | None, endpoints: Endpoints, scopes: list[str]):
    """A credentials file (or application-default credentials) for calling Google APIs.

    Built from the file by type, not with google.auth.load_credentials_from_file/default(): those
    also look up a project id over the network (Cloud Resource Manager, for external accounts)
    and probe the metadata server — calls we do not need and that fail on private networks.
    Trap: google-auth ignores `token_uri` in an `authorized_user` file (gcloud's ADC) and always
    uses Google's; we apply the file's own token_uri, else the configured token_url.
    """
    from google.auth import exceptions

    path = path or adc_file()
    if path is None:
        from google.auth import compute_engine

        return compute_engine.Credentials(scopes=scopes)  # on GCP, ADC is the metadata server
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
        return _from_info(info, endpoints, scopes)
    except exceptions.GoogleAuthError as exc:
        raise UpstreamError(f"cannot use credentials file {path}: {str(exc).splitlines()[0][:200]}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UpstreamError(f"cannot read credentials file {path}: {type(exc).__name__}: {str(exc)[:150]}") from None


def _from_info(info: dict, endpoints: Endpoints, scopes: list[str]):
    kind = info.get("type")
    if kind == "authorized_user":
        from google.oauth2 import credentials

        creds = credentials.Credentials.from_authorized_user_info(info, scopes=scopes)
        return creds.with_token_uri(info.get("token_uri") or endpoints.token_url)
    if kind == "service_account":
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_info(info, scopes=scopes)
    if kind == "impersonated_service_account":
        from google.auth import impersonated_credentials

        return impersonated_credentials.Credentials.from_impersonated_service_account_info(info, scopes=scopes)
    if kind == "external_account":
        source = info.get("credential_source") or {}
        if str(source.get("environment_id", "")).startswith("aws"):
            from google.auth import aws as module
        elif "executable" in source:
            from google.auth import pluggable as module
        else:
            from google.auth import identity_pool as module
        return module.Credentials.from_info(info, scopes=scopes)
    raise ValueError(f"unsupported credentials type {kind!r}")


def fresh_access_token(creds) -> str:
    """Refresh google-auth credentials if needed and return the access token (sync: a thread)."""
    import google.auth.transport.requests
    from google.auth import exceptions

    if not creds.valid:
        try:
            creds.refresh(google.auth.transport.requests.Request())
        except exceptions.RefreshError as exc:
            raise _refresh_error(exc) from None
        except exceptions.TransportError as exc:
            raise UpstreamUnavailable(f"cannot reach Google to refresh credentials: {type(exc).__name__}") from None
    return creds.token


def _refresh_error(exc: Exception) -> Exception:
    message = str(exc.args[0] if exc.args else exc).splitlines()[0][:200]
    if getattr(exc, "retryable", False):
        return UpstreamUnavailable(f"refreshing credentials: {message}")
    return UpstreamError(f"the credentials were refused: {message}")
