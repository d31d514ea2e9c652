"""Reading the desktop client's secret from Secret Manager, once.

google-cloud-secret-manager and its credentials are synchronous and heavy to import (grpc,
protobuf): both happen in a worker thread, only when a secret must actually be read.
"""

from __future__ import annotations

import asyncio

from iapd.config import Endpoints
from iapd.crc32c import crc32c
from iapd.errors import UpstreamError, UpstreamUnavailable
from iapd.google_creds import CLOUD_PLATFORM, load_google_credentials


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
