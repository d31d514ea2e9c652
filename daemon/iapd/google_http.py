"""Talking to Google's OAuth endpoints from the event loop (aiohttp, never a blocking call),
and sorting every failure into login-required, transient or permanent."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from iapd.errors import LoginRequired, UpstreamError, UpstreamUnavailable

log = logging.getLogger("iapd.google")
MAX_ANSWER_BYTES = 4 * 1024 * 1024


def new_session(timeout: float) -> aiohttp.ClientSession:
    # trust_env: honour HTTPS_PROXY/NO_PROXY, which corporate networks that use IAP often need.
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), trust_env=True,
                                 headers={"User-Agent": "iapd"})


def _oauth_error(status: int, body: Any) -> tuple[str, str]:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # Google Cloud API shape: {"error": {"status", "message"}}
            return str(error.get("status", status)), str(error.get("message", ""))[:200]
        return str(error or status), str(body.get("error_description") or "")[:200]
    return str(status), ""


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: its body, and the server's clock from its `Date` header (None if absent):
    the skew between that and ours says how to read the `exp` of a token it sent."""

    text: str
    server_date: float | None


def json_object(answer: Answer, what: str) -> dict:
    try:
        body = json.loads(answer.text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise UpstreamUnavailable(f"{what}: the answer is not a JSON object")
    return body


async def request_json(session: aiohttp.ClientSession, method: str, url: str, *, what: str,
                       **kwargs: Any) -> dict:
    """One HTTP call, a JSON object back. Raises:
    LoginRequired on `invalid_grant` (a dead grant: never retry it in a loop);
    UpstreamUnavailable on 5xx, 429, timeouts and network errors;
    UpstreamError on any other refusal."""
    return json_object(await fetch(session, method, url, what=what, **kwargs), what)


async def request_text(session: aiohttp.ClientSession, method: str, url: str, *, what: str, **kwargs: Any) -> str:
    """One HTTP call, the body of a 2xx answer back; errors classified as for request_json."""
    return (await fetch(session, method, url, what=what, **kwargs)).text


def _server_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


async def _bounded_text(resp: aiohttp.ClientResponse, what: str) -> str:
    """The body, refused past MAX_ANSWER_BYTES: an upstream's answer is a token or a small JSON
    document, and a 300 MB "discovery document" must not take the daemon's memory with it."""
    declared = resp.content_length
    if declared is not None and declared > MAX_ANSWER_BYTES:
        raise UpstreamError(f"{what}: the answer is {declared} bytes, more than the {MAX_ANSWER_BYTES} accepted")
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise UpstreamError(f"{what}: the answer is more than the {MAX_ANSWER_BYTES} bytes accepted")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        return body.decode(resp.charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


async def fetch(session: aiohttp.ClientSession, method: str, url: str, *, what: str, **kwargs: Any) -> Answer:
    """One HTTP call; a 2xx answer back, every failure classified as for request_json.

    Redirects are never followed: these requests carry refresh tokens, client secrets and
    `via` tokens in their bodies and headers, and a redirect (to another origin, or https → http)
    would re-send them there. A 3xx is a refusal that names where it pointed."""
    try:
        async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
            text = await _bounded_text(resp, what)
            status = resp.status
            date = _server_date(resp.headers.get("Date"))
            location = resp.headers.get("Location", "")
    except asyncio.TimeoutError:
        raise UpstreamUnavailable(f"{what}: timed out") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"{what}: {type(exc).__name__}: {str(exc)[:150]}") from None
    if 200 <= status < 300:
        return Answer(text, date)
    if 300 <= status < 400:
        where = urlsplit(location)
        refused = UpstreamError(f"{what}: HTTP {status}, a redirect to {where.scheme}://{where.netloc}{where.path} "
                                "(not followed: requests that carry credentials go only where configured)")
        refused.http_status = status
        raise refused
    try:
        body = json.loads(text) if text else {}
    except ValueError:
        body = None
    error, description = _oauth_error(status, body)
    detail = f"{error}" + (f" ({description})" if description else "")
    if status >= 500 or status == 429:
        raise UpstreamUnavailable(f"{what}: HTTP {status} {detail}")
    if error == "invalid_grant":
        subtype = body.get("error_subtype") if isinstance(body, dict) else None
        if subtype == "invalid_rapt" or "invalid_rapt" in description:
            raise LoginRequired("your organisation's reauthentication policy requires a new login (invalid_rapt)")
        raise LoginRequired(f"the login has expired or was revoked ({description or 'invalid_grant'})")
    refused = UpstreamError(f"{what}: HTTP {status} {detail}")
    refused.http_status = status
    raise refused


async def revoke(session: aiohttp.ClientSession, url: str, token: str, data: dict | None = None,
                 headers: dict | None = None) -> str | None:
    """Revoke a token (RFC 7009); None on success, else why not. Success is the status code: the
    body is to be ignored (Google's is empty or not JSON). `data`/`headers`: an issuer's client
    authentication."""
    try:
        await request_text(session, "POST", url, what="revoking the login", data=data or {"token": token},
                           headers=headers or {})
    except (UpstreamError, UpstreamUnavailable, LoginRequired) as exc:
        return exc.message
    return None
