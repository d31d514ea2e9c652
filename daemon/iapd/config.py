"""The configuration file: TOML, validated with pydantic, named profiles.

A profile is "one credential source + an optional audience". Profiles that name the same
desktop client share one login and one refresh token. Every Google endpoint can be overridden,
which is how the emulator and private or regional endpoints plug in.

A bad file is one line: ``config error: FILE: KEY: what was expected``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from iapctl.urls import LOOPBACK_HOSTS, secure_url

SECRET_VERSION_RE = re.compile(r"^projects/[^/]+/secrets/[^/]+/versions/[^/]+$")
EMAIL_RE = re.compile(r"^[^@\s/]+@[^@\s/]+$")


def _matching(regex: re.Pattern, expected: str):
    """A string that must match `regex`; the error says what was expected, in words, not the regex."""
    def check(value: str) -> str:
        if not regex.match(value):
            raise ValueError(f"expected {expected}, not {value!r}")
        return value
    return AfterValidator(check)


SecretVersion = Annotated[str, _matching(SECRET_VERSION_RE, "projects/PROJECT/secrets/SECRET/versions/VERSION")]
Email = Annotated[str, _matching(EMAIL_RE, "an email address such as name@example.com")]
ServiceAccountEmail = Annotated[str, _matching(EMAIL_RE, "a service account's email, NAME@PROJECT.iam.gserviceaccount.com")]


class ConfigError(Exception):
    """A config that cannot be used. ``str()`` is the one-line message for the user."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo ("audiance") must not silently change behaviour.
    model_config = ConfigDict(extra="forbid", frozen=True)


GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_REVOKE_URL = "https://oauth2.googleapis.com/revoke"




class Endpoints(_Strict):
    """Google's endpoints. Override them for the emulator, or for private/regional endpoints."""

    auth_url: str = "https://accounts.google.com/o/oauth2/v2/auth"
    token_url: str = GOOGLE_TOKEN_URL
    revoke_url: str = GOOGLE_REVOKE_URL
    secret_manager_url: str = "https://secretmanager.googleapis.com"
    metadata_url: str = "http://metadata.google.internal"
    iam_credentials_url: str = "https://iamcredentials.googleapis.com"


class UserSource(_Strict):
    """A person's login through a *desktop* OAuth client (authorization code + PKCE)."""

    client_id: str = Field(min_length=1)
    client_secret: str | None = Field(default=None, min_length=1)
    # `projects/P/secrets/S/versions/V`: read once with `secret_manager_credentials`
    # (default: application-default credentials), then kept in the credential store.
    client_secret_name: SecretVersion | None = None
    secret_manager_credentials: str | None = None
    # Pin the Google account this profile logs in as: sent as `login_hint`, and a login as
    # anyone else is refused. `hosted_domain` does the same for a Workspace domain (`hd`).
    account: Email | None = None
    hosted_domain: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_secret(self) -> "UserSource":
        if (self.client_secret is None) == (self.client_secret_name is None):
            raise ValueError("give exactly one of client_secret or client_secret_name")
        return self


class KeyFileSource(_Strict):
    kind: Literal["key_file"]
    key_file: str = Field(min_length=1)


class MetadataSource(_Strict):
    kind: Literal["metadata"]


class ADCSource(_Strict):
    """Application-default credentials, or the credentials file named here: a service-account
    key, an `external_account` file (workload identity federation) or an impersonation config."""

    kind: Literal["adc"]
    credentials_file: str | None = None


class ImpersonateSource(_Strict):
    """ID tokens for `target` from IAM Credentials generateIdToken, called as the identity of
    `credentials_file` (or application-default credentials: a user's gcloud login, a key, the
    metadata server), through an optional chain of delegates."""

    kind: Literal["impersonate"]
    target: ServiceAccountEmail
    delegates: list[ServiceAccountEmail] = []
    credentials_file: str | None = None


SOURCE_KINDS = {"key_file", "metadata", "adc", "impersonate"}
ServiceAccountSource = Annotated[
    Union[KeyFileSource, MetadataSource, ADCSource, ImpersonateSource], Field(discriminator="kind")
]


HttpUrl = Annotated[str, _matching(re.compile(r"^https?://[^\s/]+(/\S*)?$"), "an http(s) URL")]


class OidcSource(_Strict):
    """Any OpenID Connect issuer (Dex, Keycloak, Okta, flyteadmin's authorization server…):
    endpoints from its discovery document, each overridable."""

    issuer: HttpUrl
    client_id: str = Field(min_length=1)
    client_secret: str | None = Field(default=None, min_length=1)  # absent: a public client (PKCE alone)
    grant: Literal["authorization_code", "device_code", "client_credentials"] = "authorization_code"
    scopes: list[str] = ["openid", "email", "offline_access"]
    token: Literal["id_token", "access_token"] = "id_token"  # which one `iapctl token` prints
    audience: str | None = Field(default=None, min_length=1)  # sent as `audience` (Auth0/Okta style)
    resource: str | None = Field(default=None, min_length=1)  # sent as `resource` (RFC 8707)
    redirect_uri: HttpUrl | None = None  # a loopback URI; default an ephemeral 127.0.0.1 port
    via: str | None = Field(default=None, min_length=1)  # a profile whose token goes in Proxy-Authorization
    authorization_endpoint: HttpUrl | None = None
    token_endpoint: HttpUrl | None = None
    device_authorization_endpoint: HttpUrl | None = None
    revocation_endpoint: HttpUrl | None = None

    @model_validator(mode="after")
    def _grant_needs(self) -> "OidcSource":
        if self.grant == "client_credentials" and self.client_secret is None:
            raise ValueError("the client_credentials grant needs a client_secret")
        if self.token == "id_token" and "openid" not in self.scopes:
            raise ValueError("token = \"id_token\" needs \"openid\" in scopes")
        from urllib.parse import urlsplit

        # Credentials go to these URLs: https, or http only to this machine (a local issuer).
        for name in ("issuer", "authorization_endpoint", "token_endpoint", "device_authorization_endpoint",
                     "revocation_endpoint"):
            url = getattr(self, name)
            if url is not None and not secure_url(url):
                raise ValueError(f"{name} must be https (http only for 127.0.0.1 or localhost), not {url!r}")
        if self.redirect_uri is not None:
            parts = urlsplit(self.redirect_uri)
            if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
                raise ValueError("redirect_uri must be a loopback URI: http://127.0.0.1:PORT/… or http://localhost:PORT/…")
        return self


def _jwt_audience(value: str) -> str:
    """The app's URL, exactly or with a path wildcard: `https://app.example.com/*`. It is where
    the signed JWT goes, so https (http only to this machine, for a local IAP or the emulator)."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if not parts.hostname or parts.query or parts.fragment or "*" in value.removesuffix("/*"):
        raise ValueError(f"expected the app's URL, such as https://app.example.com/* or https://app.example.com/path, "
                         f"not {value!r}")
    if not secure_url(value):
        raise ValueError(f"must be https (http only for 127.0.0.1 or localhost), not {value!r}")
    return value


def _listen(value: str) -> str:
    """A unix socket path, or HOST:PORT on loopback: the proxy hands out the user's credential,
    so it never listens where another machine can reach it."""
    if value.startswith("/"):
        return value
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or host not in LOOPBACK_HOSTS or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 127.0.0.1:PORT, [::1]:PORT, localhost:PORT or an absolute unix socket path, "
                         f"not {value!r}")
    return value


class ProxySettings(_Strict):
    """A local listener that forwards to `upstream` with the profile's token added (iapd.proxy)."""

    listen: Annotated[str, AfterValidator(_listen)]
    upstream: HttpUrl
    # Which header carries the token: Proxy-Authorization keeps the app's own Authorization (what
    # IAP reads first); an OpenID Connect gateway reads Authorization. Default: by the profile's kind.
    header: Literal["proxy-authorization", "authorization"] | None = None
    # Browser Origins allowed to use it (a web page could otherwise reach a loopback port).
    allow_origins: list[str] = []

    @model_validator(mode="after")
    def _secure(self) -> "ProxySettings":
        if not secure_url(self.upstream):
            raise ValueError(f"upstream must be https (http only for 127.0.0.1 or localhost), not {self.upstream!r}")
        return self


class Profile(_Strict):
    # The IAP OAuth client id. Absent: allowlist mode (`programmaticClients`), aud = desktop client.
    audience: str | None = Field(default=None, min_length=1)
    # In place of `audience`, for a service account: a JWT the service account signs itself, with
    # this `aud` (IAP's second credential: no token endpoint, no OAuth client in any allowlist).
    jwt_audience: Annotated[str, AfterValidator(_jwt_audience)] | None = None
    user: UserSource | None = None
    service_account: ServiceAccountSource | None = None
    oidc: OidcSource | None = None
    proxy: ProxySettings | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "Profile":
        if sum(x is not None for x in (self.user, self.service_account, self.oidc)) != 1:
            raise ValueError("give exactly one of [user], [service_account] or [oidc]")
        if self.oidc is not None and self.audience is not None:
            raise ValueError("an [oidc] profile takes its audience inside [oidc]")
        if self.jwt_audience is not None:
            if self.service_account is None:
                raise ValueError("jwt_audience (a JWT signed by a service account) needs a [service_account] section")
            if self.audience is not None:
                raise ValueError("give audience (an ID token from Google) or jwt_audience (a signed JWT), not both")
        return self


# What `[daemon] environment` may set: the network (a corporate proxy, a CA bundle) and where
# Google's own credential files are. Nothing else — not PYTHON*, not LD_*.
DAEMON_ENVIRONMENT = {
    "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG",
}


def _environment(value: dict[str, str]) -> dict[str, str]:
    for name, setting in value.items():
        if name not in DAEMON_ENVIRONMENT:
            raise ValueError(f"{name} cannot be set here; expected one of {', '.join(sorted(DAEMON_ENVIRONMENT))}")
        if not setting or not setting.isprintable():
            raise ValueError(f"{name}: expected a non-empty value without control characters")
    return value


class DaemonSettings(_Strict):
    """Renewal policy and limits. The defaults suit Google's one-hour ID tokens."""

    socket: str | None = None
    state_dir: str | None = None
    # Where refresh tokens and client secrets are kept: a 0600 file in state_dir, or the OS
    # keyring (Secret Service on Linux, the login Keychain on macOS; iapd.keyring).
    store: Literal["file", "keyring"] = "file"
    # The daemon's network settings, the same whoever starts it (autostart passes it only what
    # it needs by name; a service manager's environment is its own): applied at start.
    environment: Annotated[dict[str, str], AfterValidator(_environment)] = {}
    # Renew when `max(renew_before_seconds, renew_fraction * lifetime)` is left (jittered).
    renew_before_seconds: float = Field(default=300, gt=0)
    renew_fraction: float = Field(default=0.25, gt=0, lt=1)
    # Never serve a token with less than this left; refresh before answering instead.
    margin_seconds: float = Field(default=60, ge=0)
    # An audience nobody asked for in this long stops being renewed ahead of time.
    idle_seconds: float = Field(default=12 * 3600, gt=0)
    backoff_initial_seconds: float = Field(default=1, gt=0)
    backoff_cap_seconds: float = Field(default=120, gt=0)
    # A permanent refusal (a 4xx other than invalid_grant: wrong audience, invalid_client) is
    # retried this rarely, and at once after a login.
    refused_retry_seconds: float = Field(default=3600, gt=0)
    # How many refreshes may run at once (after a suspend every audience is due together).
    max_concurrent_refreshes: int = Field(default=4, ge=1)
    # The wall clock is re-checked at least this often, because timers stop during suspend.
    tick_seconds: float = Field(default=30, gt=0)
    login_timeout_seconds: float = Field(default=300, gt=0)
    # How long a token request may wait for a refresh before it answers "upstream failure".
    request_timeout_seconds: float = Field(default=20, gt=0)
    http_timeout_seconds: float = Field(default=15, gt=0)
    # A connection must send its request headers within this (slow or idle clients are closed).
    header_timeout_seconds: float = Field(default=10, gt=0)


class ClientSettings(_Strict):
    """What `iapctl` may do on its own. Both also have environment switches (IAPD_AUTOSTART=0,
    IAPD_AUTO_LOGIN=0), which win."""

    # Start `iapd serve` in the background when nothing answers and no service manager owns it.
    autostart: StrictBool = True
    # Let `iapctl token` open a browser when login is required (only where a person can see it).
    auto_login: StrictBool = True


class Config(_Strict):
    daemon: DaemonSettings = DaemonSettings()
    client: ClientSettings = ClientSettings()
    endpoints: Endpoints = Endpoints()
    profiles: dict[str, Profile] = {}

    @model_validator(mode="after")
    def _via_names_a_profile(self) -> "Config":
        """`via` must name another profile, and following `via` must end (no loop)."""
        for name, profile in self.profiles.items():
            seen, current = {name}, profile
            while current.oidc is not None and current.oidc.via is not None:
                via = current.oidc.via
                if via not in self.profiles:
                    raise ValueError(f"profiles.{name}.oidc.via: no profile named {via!r}")
                if via in seen:
                    raise ValueError(f"profiles.{name}.oidc.via: {' → '.join([*seen, via])} is a loop")
                seen.add(via)
                current = self.profiles[via]
        return self


def _key_of(loc: tuple) -> str:
    parts = [str(item) for item in loc]
    # pydantic puts the tag of a discriminated union in the location (…service_account.key_file…):
    # drop it, it is not a key of the file.
    if "service_account" in parts:
        i = parts.index("service_account") + 1
        if i < len(parts) and parts[i] in SOURCE_KINDS:
            del parts[i]
    return ".".join(parts) or "(top level)"


def _describe(err: dict) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "bool_type":
        return "expected true or false (unquoted)"
    msg = err.get("msg", "invalid value")
    return msg.removeprefix("Value error, ")


def parse_config(text: str, path: str) -> Config:
    """Parse and validate config text; every failure is a ConfigError with one line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"config error: {path}: {_key_of(err['loc'])}: {_describe(err)}{more}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read the file. A missing file is an empty config (no profiles), not an error:
    the daemon can start before the user has written one, and says so in status."""
    from iapctl.paths import unsafe_file

    p = Path(path)
    # A config says where the stored login and client secret are sent: one that another user
    # can write (or swap, through a directory of theirs) is an instruction from them.
    unsafe = unsafe_file(str(p))
    if unsafe is not None:
        raise ConfigError(f"config error: {p}: not safe to use: {unsafe}; keep the config in a directory only "
                          "you can write (the default is $XDG_CONFIG_HOME/iapd/config.toml)")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config error: {p}: cannot read: {exc}") from None
    return parse_config(text, str(p))


def config_stamp(path: str | os.PathLike[str]) -> tuple | None:
    """What changes when the file does (None: no file): checked, not watched — on a request for
    an unknown profile and on the renewal supervisor's tick, so no loop of its own."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
