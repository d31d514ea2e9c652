"""Reading the desktop client's secret from Secret Manager, once per login.

google-cloud-secret-manager is synchronous and heavy: importing it (grpc, protobuf, api-core)
adds ~20 MiB that a long-running daemon would carry for ever after one read. So the read runs
in a short-lived child process (`python -m iapd.secret_manager`): a JSON request on its stdin,
the secret or a classified error as JSON on its stdout — a pipe, never a log or an argument.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from iapd.config import Endpoints
from iapd.crc32c import crc32c
from iapd.errors import ConfigProblem, IapdError, UpstreamError, UpstreamUnavailable, without_message
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


log = logging.getLogger("iapd.secret_manager")
ERRORS = {cls.code: cls for cls in (UpstreamError, UpstreamUnavailable, ConfigProblem)}


async def read_secret(name: str, credentials_path: str | None, endpoints: Endpoints, timeout: float) -> str:
    request = json.dumps({"name": name, "credentials": credentials_path, "endpoints": endpoints.model_dump(),
                          "timeout": timeout}).encode()
    # -P: `-m` would put the working directory first on sys.path; this child holds the client
    # secret and the ADC credentials, so it imports nothing from wherever the daemon was started.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "iapd.secret_manager", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        # Importing the client takes about a second; the call itself is bounded by `timeout`.
        out, _ = await asyncio.wait_for(proc.communicate(request), timeout + 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise UpstreamUnavailable(f"reading client secret {name}: timed out") from None
    except asyncio.CancelledError:
        # Nobody waits for the answer any more (a shutdown, say): the child, which holds the
        # credentials, must not live on by itself.
        try:
            proc.kill()
        except ProcessLookupError:
            pass
        raise
    try:
        answer = json.loads(out)
        if "secret" in answer:
            return answer["secret"]
        raise ERRORS[answer["error"]](answer["message"])
    except (ValueError, KeyError, TypeError):
        # The child died before it could answer (killed, out of memory, a broken install).
        log.error("the Secret Manager reader exited with status %s and no answer", proc.returncode)
        raise UpstreamError(f"reading client secret {name} failed unexpectedly; see iapd's log") from None


def _child() -> None:
    request = json.load(sys.stdin)
    try:
        secret = _access(request["name"], request["credentials"], Endpoints(**request["endpoints"]),
                         float(request["timeout"]))
    except IapdError as exc:
        json.dump({"error": exc.code if exc.code in ERRORS else UpstreamError.code, "message": exc.message}, sys.stdout)
    except Exception as exc:  # noqa: BLE001 - anything else is reported, without its message
        json.dump({"error": UpstreamError.code,
                   "message": f"reading client secret failed unexpectedly: {without_message(exc)}"}, sys.stdout)
    else:
        json.dump({"secret": secret}, sys.stdout)


if __name__ == "__main__":
    _child()
