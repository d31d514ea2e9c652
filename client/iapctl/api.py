"""The Python API: a token from iapd for code that is not a command line — a notebook calling an
IAP-protected service, an Airflow hook, a test fixture. Standard library only, like the rest of
the client; the same socket call as `iapctl token`, and exceptions with the same causes as its
exit codes.

    import iapctl, requests
    requests.get(url, auth=iapctl.BearerAuth("app"))          # requests and httpx alike
    iapctl.token("app")                                       # the token, a str
    iapctl.credentials("app")                                 # google-auth Credentials (AuthorizedSession)

It never opens a browser: a login required is an exception that says which command to run.
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass, field

from iapctl import cli


class IapdError(Exception):
    """Why no token could be had; `exit_code` is what `iapctl token` would have exited with."""

    exit_code = cli.ERROR

    def __init__(self, message: str, profile: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.profile = profile


class Unreachable(IapdError):
    """iapd is not running and could not be started."""

    exit_code = cli.UNREACHABLE


class LoginRequired(IapdError):
    """The profile's login is needed: `iapctl login PROFILE` (the message names it)."""

    exit_code = cli.LOGIN_REQUIRED


class UnknownProfile(IapdError):
    """No such profile, or one that cannot work as configured."""

    exit_code = cli.BAD_PROFILE


class UpstreamError(IapdError):
    """Google or the issuer failed (try again later) or refused (the message says why)."""

    exit_code = cli.UPSTREAM


_BY_EXIT_CODE = {cls.exit_code: cls for cls in (Unreachable, LoginRequired, UnknownProfile, UpstreamError)}


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # epoch seconds: iapd's own margin already taken off the token's `exp`

    @property
    def expires_in(self) -> float:
        return self.expires_at - time.time()


def token_info(profile: str) -> Token:
    """The token for `profile` and until when it may be used. Raises an IapdError."""
    if not cli.valid_profile(profile):
        raise UnknownProfile(f"invalid profile name {profile!r}", profile)
    try:
        resp = cli.call("GET", f"/v1/token/{profile}?format=json")
        if resp.status != 200:
            raise cli._failure_of(profile, cli.error_of(resp))
        body = json.loads(resp.body)
    except cli.Failure as exc:
        raise _BY_EXIT_CODE.get(exc.code, IapdError)(exc.message, profile) from None
    except cli.wire.Unreachable as exc:  # it stopped answering after it was started (call() says the rest)
        raise Unreachable(f"iapd is not answering: {exc}", profile) from None
    expires_at = calendar.timegm(time.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ"))
    return Token(body["token"], float(expires_at))


def token(profile: str) -> str:
    """The token for `profile` (an ID token for Google/IAP profiles). Raises an IapdError."""
    return token_info(profile).value


class BearerAuth:
    """`auth=` for requests and httpx (both take a callable that gets the request and returns it):
    a fresh token from iapd on every request — a socket call of well under a millisecond; iapd
    renews ahead of time, so none waits on Google.

    `header`: `Proxy-Authorization` by default, which IAP takes and strips, leaving the app's
    own `Authorization` alone; IAP also accepts `Authorization` (Google's samples use it), and an
    OpenID Connect gateway (oauth2-proxy) wants that one."""

    def __init__(self, profile: str, header: str = "Proxy-Authorization") -> None:
        self.profile = profile
        self.header = header

    def __call__(self, request):
        request.headers[self.header] = f"Bearer {token(self.profile)}"
        return request


def credentials(profile: str):
    """google-auth Credentials backed by iapd, so `AuthorizedSession` (and Google's own IAP
    samples, which take Credentials) work unchanged. google-auth is imported only here."""
    import datetime

    from google.auth import credentials as ga_credentials
    from google.auth import exceptions as ga_exceptions

    class IapdCredentials(ga_credentials.Credentials):
        def __init__(self) -> None:
            super().__init__()
            self.profile = profile

        def refresh(self, request) -> None:  # `request` (google-auth's transport) is not needed: iapd is
            try:
                got = token_info(self.profile)
            except IapdError as exc:
                raise ga_exceptions.RefreshError(f"iapd: {exc.message}") from None
            self.token = got.value
            # google-auth compares `expiry` with a naive UTC datetime.
            self.expiry = datetime.datetime.fromtimestamp(got.expires_at, datetime.timezone.utc).replace(tzinfo=None)

    return IapdCredentials()
