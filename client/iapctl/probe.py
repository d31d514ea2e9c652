"""What an app's front door says: without credentials, who guards it and with which OAuth
client; with a token, whether it lets the token in and, if not, the likely reason in words.
For `iapctl setup URL` and `iapctl doctor URL`.

Standard library. A redirect is followed only without credentials; a token is sent only over
https (or http to this machine), and never to where a redirect points.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit, urlunsplit

from iapctl.urls import secure_url

GOOGLE_SIGN_IN = "https://accounts.google.com/o/oauth2/v2/auth"
MAX_HOPS = 5
BODY_LIMIT = 64 * 1024
TIMEOUT = 10.0


def without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names
    body: str
    url: str

    @property
    def from_iap(self) -> bool:
        """IAP marks what it answers itself: its refusals and sign-in redirects, not the app's."""
        return self.headers.get("x-goog-iap-generated-response", "").lower() == "true"

    def reason(self) -> str:
        """IAP's one line (`Invalid IAP credentials: …`), or the start of the body."""
        import html
        import re

        text = html.unescape(re.sub(r"<[^>]+>", " ", self.body))
        return " ".join(text.split())[:200] or f"HTTP {self.status}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def fetch(url: str, token: str | None = None, accept: str = "text/html,*/*") -> Answer:
    """One GET, no redirect followed. Raises OSError (with the reason) when nothing answers."""
    headers = {"Accept": accept, "User-Agent": "iapctl"}
    if token is not None:
        if not secure_url(url):
            raise ValueError(f"not sending a token to {url}: it is neither https nor this machine")
        headers["Authorization"] = f"Bearer {token}"
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        resp = exc
    except urllib.error.URLError as exc:
        raise OSError(f"cannot reach {url}: {exc.reason}") from None
    with resp:
        body = resp.read(BODY_LIMIT).decode("utf-8", "replace")
        return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body, url)


@dataclass
class Guard:
    """Who answers a request with no credentials, and what a profile for it needs."""

    kind: str  # google_iap | oidc | open | unknown
    seen: str  # what was seen, in words
    client_id: str | None = None  # IAP's OAuth client (the audience), or the gateway's client
    issuer: str | None = None
    hops: list[str] = field(default_factory=list)


def sign_in_url(config: dict) -> str:
    """Google's sign-in as the config names it (`[endpoints] auth_url`: the emulator, a private
    endpoint), else Google's own: where IAP's redirect for people goes."""
    endpoints = config.get("endpoints")
    return (endpoints.get("auth_url") if isinstance(endpoints, dict) else None) or GOOGLE_SIGN_IN


def who_guards(url: str, sign_in_url: str = GOOGLE_SIGN_IN) -> Guard:
    """Follow the redirects a browser would, without credentials, until one names an OAuth client.

    Google's IAP sends a 302 to Google's sign-in (`sign_in_url`: Google's, or the configured
    `[endpoints] auth_url`) with `client_id` = IAP's own OAuth client: the audience. A gateway
    (oauth2-proxy, Dex, Keycloak) sends one to its issuer's authorize endpoint."""
    hops: list[str] = []
    current = url
    for _ in range(MAX_HOPS):
        answer = fetch(current)
        hops.append(f"{answer.status} {current}")
        location = answer.headers.get("location")
        if answer.status not in (301, 302, 303, 307, 308) or not location:
            break
        target = urllib.request.urljoin(current, location)
        query = parse_qs(urlsplit(target).query)
        client_id = (query.get("client_id") or [None])[0]
        if client_id and without_query(target).rstrip("/") in (sign_in_url.rstrip("/"), GOOGLE_SIGN_IN):
            return Guard("google_iap", f"{url} redirects to Google's sign-in for IAP's OAuth client {client_id}",
                         client_id=client_id, hops=hops)
        if client_id and "code" in (query.get("response_type") or [""])[0].split():
            issuer = discover_issuer(without_query(target))
            where = f"issuer {issuer}" if issuer else f"authorize endpoint {without_query(target)} (no discovery found)"
            return Guard("oidc", f"{url} redirects to an OpenID Connect sign-in ({where}) for client {client_id}",
                         client_id=client_id, issuer=issuer, hops=hops)
        current = target
    else:
        return Guard("unknown", f"{url} redirects more than {MAX_HOPS} times without naming an OAuth client", hops=hops)
    if 200 <= answer.status < 300:
        return Guard("open", f"{url} answered {answer.status} without credentials: nothing guards it", hops=hops)
    return Guard("unknown", f"{url} answered {answer.status} ({answer.reason()}) with no redirect to a sign-in",
                 hops=hops)


def discover_issuer(authorize_url: str) -> str | None:
    """The issuer whose discovery document names this authorize endpoint: tried at each prefix of
    its path (Keycloak: /realms/R/protocol/openid-connect/auth → /realms/R; Dex: /dex/auth → /dex)."""
    parts = urlsplit(authorize_url)
    segments = [s for s in parts.path.split("/") if s]
    for n in range(len(segments) - 1, -1, -1):
        base = urlunsplit((parts.scheme, parts.netloc, "/" + "/".join(segments[:n]), "", "")).rstrip("/")
        try:
            answer = fetch(f"{base}/.well-known/openid-configuration", accept="application/json")
            doc = json.loads(answer.body) if answer.status == 200 else None
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("authorization_endpoint") == authorize_url and isinstance(doc.get("issuer"), str):
            return doc["issuer"]
    return None


def claims_of(token: str) -> dict:
    """A JWT's payload, unverified (what it says about itself is what IAP will read)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def is_signed_jwt(claims: dict) -> bool:
    """A JWT a service account signed itself: `iss` = `sub` = its email (Google's say accounts.google.com)."""
    iss = str(claims.get("iss", ""))
    return "@" in iss and claims.get("sub") == iss


def jwt_covers(aud: str, url: str) -> bool:
    """IAP's rule for a signed JWT: `aud` is the URL exactly, or a prefix ending in `/*`."""
    return aud == url or (aud.endswith("/*") and url.startswith(aud[:-1]))


@dataclass
class Finding:
    ok: bool
    what: str
    fix: str = ""


def before_sending(claims: dict, url: str, guard: Guard, profile: dict) -> list[Finding]:
    """What the token says about itself that IAP will refuse, before anything is sent."""
    found: list[Finding] = []
    name = profile["name"]
    aud = claims.get("aud")
    if is_signed_jwt(claims):
        if not isinstance(aud, str) or not jwt_covers(aud, without_query(url)):
            parts = urlsplit(url)
            found.append(Finding(False, f"the signed JWT's aud {aud!r} does not cover {without_query(url)}",
                                 f'set jwt_audience = "{parts.scheme}://{parts.netloc}/*" in [profiles.{name}]'))
    elif guard.kind == "google_iap" and guard.client_id and aud != guard.client_id and profile.get("mode") != "allowlist":
        found.append(Finding(False, f"wrong audience: the token is for {aud}, IAP at {without_query(url)} "
                                    f"expects {guard.client_id}",
                             f'set audience = "{guard.client_id}" in [profiles.{name}]'))
    if not claims.get("email") and not is_signed_jwt(claims):  # a signed JWT's identity is its iss
        found.append(Finding(False, "the token has no email claim, which IAP requires",
                             "a user login must ask for the `email` scope; a service account's ID token must be "
                             "minted with its email (format=full, includeEmail)"))
    return found


def verdict(answer: Answer, claims: dict, guard: Guard, profile: dict) -> Finding:
    """What the answer to a request with the token means."""
    name, who = profile["name"], claims.get("email") or claims.get("iss" if is_signed_jwt(claims) else "sub") or "?"
    if 200 <= answer.status < 400 and not answer.from_iap:
        return Finding(True, f"let in as {who} (HTTP {answer.status})")
    if answer.status == 401:
        if profile.get("mode") == "allowlist" and guard.client_id:
            return Finding(False, f"IAP refused the token for the desktop client {claims.get('aud')}: it is not in "
                                  f"this app's programmatic allowlist ({answer.reason()})",
                           f"ask an admin to add {claims.get('aud')} to IAP's programmaticClients, or set "
                           f'audience = "{guard.client_id}" in [profiles.{name}]')
        return Finding(False, f"refused: {answer.reason()}", f"`iapctl doctor {answer.url} --profile {name}`")
    if answer.status == 403:
        if "access level" in answer.body.lower():
            return Finding(False, f"IAP knows {who} but an access level (context-aware access: a device or network "
                                  "policy) refuses the request, which a token from a command line cannot satisfy",
                           "ask an admin for an access level programmatic access can meet (an IP range), or use a "
                           "service account that the policy exempts")
        return Finding(False, f"IAP knows {who} but refuses: {answer.reason()}",
                       "ask an admin for roles/iap.httpsResourceAccessor (IAP-secured Web App User) on this app")
    return Finding(False, f"HTTP {answer.status}: {answer.reason()}", "see what the app says")
