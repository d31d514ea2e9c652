"""Google credentials loaded with google-auth, for the calls that need an OAuth access token:
Secret Manager, IAM Credentials.

google-auth is synchronous. Three traps, and what GoogleAuth does about each:
* its HTTP calls default to a 120 s timeout: every call here is bounded by `http_timeout`;
* a thread stuck in such a call cannot be cancelled, and asyncio's default executor is joined
  at exit, so a SIGTERM would wait for it: calls run in daemon threads, which exit with us;
* `google.auth.transport.requests.Request()` makes a new `requests.Session` (a new TLS
  connection) per refresh: one session is reused.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any, Callable, TypeVar

from iapd.config import Endpoints
from iapd.errors import ConfigProblem, UpstreamError, UpstreamUnavailable

T = TypeVar("T")

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


class GoogleAuth:
    """Runs google-auth's synchronous code off the event loop, bounded (see the module's doc)."""

    def __init__(self, http_timeout: float) -> None:
        self.http_timeout = http_timeout
        self._request = None  # google.auth.transport.Request, made on first use (imports requests)

    def request(self):
        """google-auth's transport: one reused session, every call bounded by http_timeout."""
        if self._request is None:
            import google.auth.transport.requests
            import requests

            limit = self.http_timeout

            class BoundedRequest(google.auth.transport.requests.Request):
                def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
                    timeout = limit if timeout is None else min(timeout, limit)
                    return super().__call__(url, method, body, headers, timeout=timeout, **kwargs)

            self._request = BoundedRequest(requests.Session())
        return self._request

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a daemon thread; its result (or exception) back on the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(outcome: Any, failed: bool) -> None:
            if not future.done():
                future.set_exception(outcome) if failed else future.set_result(outcome)

        def work() -> None:
            try:
                outcome, failed = fn(*args), False
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                outcome, failed = exc, True
            try:
                loop.call_soon_threadsafe(settle, outcome, failed)
            except RuntimeError:
                pass  # the loop is closed: we are shutting down and nobody waits any more

        threading.Thread(target=work, name="iapd-google-auth", daemon=True).start()
        return await future

    def fresh_access_token(self, creds) -> str:
        """Refresh google-auth credentials if needed and return the access token (in a thread)."""
        from google.auth import exceptions

        if not creds.valid:
            try:
                creds.refresh(self.request())
            except exceptions.RefreshError as exc:
                raise _refresh_error(exc) from None
            except exceptions.OAuthError as exc:
                # Workload identity federation's STS exchange says no this way (not RefreshError):
                # "Error code invalid_grant: …" is a refusal; a body without an OAuth error code
                # (a proxy's 503 page) is not.
                message = str(exc.args[0] if exc.args else "").splitlines()[0][:200] if exc.args else ""
                if message.startswith("Error code"):
                    raise UpstreamError(f"the token exchange (STS) refused the credentials: {message}") from None
                raise UpstreamUnavailable("the token exchange (STS) failed without an OAuth error") from None
            except exceptions.TransportError as exc:
                raise UpstreamUnavailable(f"cannot reach Google to refresh credentials: {type(exc).__name__}") from None
        return creds.token


def file_stamp(path: str | None) -> tuple | None:
    """What changes when a credentials file does (None: no such file). Called in a thread."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return path, info.st_ino, info.st_size, info.st_mtime_ns


def read_credentials_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        raise ConfigProblem(f"credentials file {path} does not exist") from None
    except PermissionError:
        raise ConfigProblem(f"credentials file {path} is not readable") from None
    except (OSError, ValueError) as exc:
        raise ConfigProblem(f"cannot read credentials file {path}: {type(exc).__name__}: {str(exc)[:150]}") from None
    if not isinstance(info, dict):
        raise ConfigProblem(f"credentials file {path} is not a JSON object")
    return info


def credentials_from_info(info: dict, endpoints: Endpoints, scopes: list[str], where: str):
    """google-auth credentials from a credentials file's content (`where` names it in errors)."""
    from google.auth import exceptions

    try:
        return _from_info(info, endpoints, scopes)
    except exceptions.GoogleAuthError as exc:
        raise ConfigProblem(f"cannot use credentials {where}: {str(exc).splitlines()[0][:200]}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigProblem(f"cannot use credentials {where}: {type(exc).__name__}: {str(exc)[:150]}") from None


def load_google_credentials(path: str | None, endpoints: Endpoints, scopes: list[str]):
    """A credentials file (or application-default credentials) for calling Google APIs.

    Built from the file by type, not with google.auth.load_credentials_from_file/default(): those
    also look up a project id over the network (Cloud Resource Manager, for external accounts)
    and probe the metadata server — calls we do not need and that fail on private networks.
    Trap: google-auth ignores `token_uri` in an `authorized_user` file (gcloud's ADC) and always
    uses Google's; we apply the file's own token_uri, else the configured token_url.
    """
    path = path or adc_file()
    if path is None:
        from google.auth import compute_engine

        return compute_engine.Credentials(scopes=scopes)  # on GCP, ADC is the metadata server
    return credentials_from_info(read_credentials_file(path), endpoints, scopes, f"file {path}")


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


def _refresh_error(exc: Exception) -> Exception:
    message = str(exc.args[0] if exc.args else exc).splitlines()[0][:200]
    if getattr(exc, "retryable", False):
        return UpstreamUnavailable(f"refreshing credentials: {message}")
    return UpstreamError(f"the credentials were refused: {message}")
