"""Reading the desktop client's secret from Secret Manager, once.

google-cloud-secret-manager and its credentials are synchronous and heavy to import (grpc,
protobuf): both happen in a worker thread, only when a secret must actually be read.
"""

from __future__ import annotations

import asyncio
import json

from iapd.config import Endpoints
from iapd.crc32c import crc32c
from iapd.errors import UpstreamError, UpstreamUnavailable

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


def load_google_credentials(path: str | None, endpoints: Endpoints, scopes: list[str]):
    """A credentials file (or application-default credentials) for calling Google APIs.

    Trap: google-auth ignores `token_uri` in an `authorized_user` file (gcloud's ADC) and always
    uses Google's endpoint. We apply the file's own token_uri, else the configured token_url, so
    private endpoints and the emulator work.
    """
    import google.auth
    import google.oauth2.credentials
    from google.auth import exceptions

    try:
        if path:
            creds, _ = google.auth.load_credentials_from_file(path, scopes=scopes)
            with open(path, encoding="utf-8") as fh:
                token_uri = json.load(fh).get("token_uri")
        else:
            creds, _ = google.auth.default(scopes=scopes)
            token_uri = None
    except exceptions.DefaultCredentialsError as exc:
        where = path or "application-default credentials"
        hint = "" if path else " (run `gcloud auth application-default login`, or set secret_manager_credentials)"
        raise UpstreamError(f"cannot load {where}: {str(exc).splitlines()[0][:200]}{hint}") from None
    except (OSError, ValueError) as exc:
        raise UpstreamError(f"cannot read credentials file {path}: {exc}") from None
    if isinstance(creds, google.oauth2.credentials.Credentials):
        creds = creds.with_token_uri(token_uri or endpoints.token_url)
    return creds


def _access(name: str, credentials_path: str | None, endpoints: Endpoints, timeout: float) -> str:
    from google.api_core import exceptions as api_exceptions
    from google.api_core.client_options import ClientOptions
    from google.auth import exceptions as auth_exceptions
    from google.cloud import secretmanager

    creds = load_google_credentials(credentials_path, endpoints, [CLOUD_PLATFORM])
    client = secretmanager.SecretManagerServiceClient(
        credentials=creds, transport="rest", client_options=ClientOptions(api_endpoint=endpoints.secret_manager_url))
    what = f"reading client secret {name}"
    try:
        # retry=None: our caller backs off on transient errors; the client's own retry would
        # hold a login for minutes.
        resp = client.access_secret_version(name=name, timeout=timeout, retry=None)
    except (api_exceptions.ServiceUnavailable, api_exceptions.InternalServerError,
            api_exceptions.TooManyRequests, api_exceptions.DeadlineExceeded) as exc:
        raise UpstreamUnavailable(f"{what}: {exc.code} {exc.message[:150]}") from None
    except api_exceptions.GoogleAPICallError as exc:
        raise UpstreamError(f"{what}: {exc.code} {exc.message[:150]}") from None
    except auth_exceptions.RefreshError as exc:
        raise UpstreamError(f"{what}: the credentials for Secret Manager were refused: {str(exc)[:150]}") from None
    except (auth_exceptions.TransportError, OSError) as exc:
        raise UpstreamUnavailable(f"{what}: {type(exc).__name__}") from None
    finally:
        client.transport.close()
    data = resp.payload.data
    if resp.payload.data_crc32c and crc32c(data) != resp.payload.data_crc32c:
        raise UpstreamUnavailable(f"{what}: checksum mismatch (data corrupted in transit)")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UpstreamError(f"{what}: the secret is not UTF-8 text") from None


async def read_secret(name: str, credentials_path: str | None, endpoints: Endpoints, timeout: float) -> str:
    return await asyncio.to_thread(_access, name, credentials_path, endpoints, timeout)
