"""Google's OAuth 2.0 endpoints: authorization (with auto-approve), token, revoke, certs.

Behaviour follows Google's documentation for installed apps (loopback redirect, PKCE) and its
token endpoint's error shapes. Where Google's behaviour is not documented, the choice is noted.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
from typing import NoReturn
from urllib.parse import unquote_plus, urlencode, urlsplit

from aiohttp import web
from google.auth import exceptions as google_exceptions
from google.auth import jwt as google_jwt

from iapd.emulator.state import ADC_CLIENT_ID, ISSUER, CodeGrant, EmulatorState, OAuthClient

STATE_KEY = web.AppKey("state", EmulatorState)
USERINFO_EMAIL = "https://www.googleapis.com/auth/userinfo.email"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


def oauth_error(error: str, description: str, status: int = 400, **extra: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description, **extra}, status=status)


def html_error(status: int, title: str, detail: str) -> web.Response:
    body = f"<!DOCTYPE html><html><body><h1>{html.escape(title)}</h1><p>{html.escape(detail)}</p></body></html>"
    return web.Response(status=status, text=body, content_type="text/html")


def _is_loopback_redirect(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
        parts.port  # raises on a malformed port
    except ValueError:
        return False
    return parts.scheme == "http" and parts.hostname is not None and (
        parts.hostname in LOOPBACK_HOSTS or f"[{parts.hostname}]" in LOOPBACK_HOSTS
    )


def _with_query(uri: str, params: dict[str, str]) -> str:
    return uri + ("&" if "?" in uri else "?") + urlencode(params)


def _granted_scope(requested: str) -> str:
    # Google answers `email` with its full URL form; keep the rest as asked.
    return " ".join(USERINFO_EMAIL if s == "email" else s for s in requested.split())


async def authorize(request: web.Request) -> web.Response:
    """GET /o/oauth2/v2/auth. Errors about the client or redirect are shown, never redirected
    (RFC 6749 §4.1.2.1: redirecting to an unverified URI would make us an open redirector)."""
    state: EmulatorState = request.app[STATE_KEY]
    q = request.query
    client = state.clients.get(q.get("client_id", ""))
    if client is None:
        return html_error(401, "Error 401: invalid_client", "The OAuth client was not found.")
    redirect_uri = q.get("redirect_uri", "")
    registered = redirect_uri in client.redirect_uris  # a web client (IAP's own) and its redirect URIs
    if not registered and (not client.desktop or not _is_loopback_redirect(redirect_uri)):
        return html_error(400, "Error 400: redirect_uri_mismatch",
                           "Only a loopback http redirect (127.0.0.1, localhost, [::1]) is allowed for this client."
                           if client.desktop else "The redirect URI is not registered for this client.")
    oauth_state = q.get("state")

    def fail(error: str, description: str) -> NoReturn:
        params = {"error": error, "error_description": description}
        if oauth_state is not None:
            params["state"] = oauth_state
        raise web.HTTPFound(_with_query(redirect_uri, params))

    if q.get("response_type") != "code":
        fail("unsupported_response_type", "response_type must be code")
    scope = q.get("scope", "")
    if not scope.split():
        fail("invalid_request", "Missing required parameter: scope")
    challenge = q.get("code_challenge")
    method = q.get("code_challenge_method", "plain")
    if not challenge and client.desktop:
        # Google still accepts desktop flows without PKCE; this emulator insists on it, because
        # a client that forgets PKCE is a bug we want our tests to see. A web client (IAP's)
        # proves itself with its secret at the exchange.
        fail("invalid_request", "code_challenge is required (PKCE)")
    if method not in ("S256", "plain"):
        fail("invalid_request", "code_challenge_method must be S256 or plain")
    if state.approve == "deny":
        fail("access_denied", "The user denied access")
    grant = CodeGrant(client.client_id, redirect_uri, challenge, method, state.user_email,
                      _granted_scope(scope), state.now() + 600, offline=q.get("access_type") == "offline")
    if state.approve == "consent":
        ticket = secrets.token_urlsafe(16)
        state.codes["consent:" + ticket] = grant
        page = (
            "<!DOCTYPE html><html><body><h1>iapd emulator: sign in</h1>"
            f"<p>Allow <b>{html.escape(client.client_id)}</b> to see <b>{html.escape(state.user_email)}</b>?</p>"
            f'<form method="post" action="{request.path}/approve">'
            f'<input type="hidden" name="ticket" value="{ticket}">'
            f'<input type="hidden" name="state" value="{html.escape(oauth_state or "")}">'
            '<button type="submit">Allow</button></form></body></html>'
        )
        return web.Response(text=page, content_type="text/html")
    _redirect_with_code(state, grant, oauth_state)


async def approve(request: web.Request) -> web.Response:
    """POST /o/oauth2/v2/auth/approve: the consent page's Allow button."""
    state: EmulatorState = request.app[STATE_KEY]
    form = await request.post()
    grant = state.codes.pop("consent:" + str(form.get("ticket", "")), None)
    if grant is None:
        return html_error(400, "Error 400: invalid_request", "Unknown or used consent ticket.")
    _redirect_with_code(state, grant, str(form.get("state", "")) or None)


def _redirect_with_code(state: EmulatorState, grant: CodeGrant, oauth_state: str | None) -> NoReturn:
    code = "4/" + secrets.token_urlsafe(32)
    state.codes[code] = grant
    params = {"code": code, "scope": grant.scope}
    if oauth_state is not None:
        params["state"] = oauth_state
    raise web.HTTPFound(_with_query(grant.redirect_uri, params))


def _client_credentials(request: web.Request, form) -> tuple[str, str | None]:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return "", None
        return unquote_plus(user), unquote_plus(password)
    secret = form.get("client_secret")
    return str(form.get("client_id", "")), (str(secret) if secret is not None else None)


def _authenticate(state: EmulatorState, request: web.Request, form) -> OAuthClient | web.Response:
    client_id, secret = _client_credentials(request, form)
    client = state.clients.get(client_id)
    if client is None:
        return oauth_error("invalid_client", "The OAuth client was not found.", status=401)
    if secret != client.secret:
        return oauth_error("invalid_client", "Unauthorized", status=401)
    return client


def _pkce_ok(grant: CodeGrant, verifier: str | None) -> bool:
    if not verifier:
        return False
    if grant.method == "S256":
        digest = hashlib.sha256(verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == grant.challenge
    return secrets.compare_digest(verifier, grant.challenge or "")


async def token(request: web.Request) -> web.Response:
    """POST /token: authorization_code, refresh_token (with and without `audience`), jwt-bearer."""
    state: EmulatorState = request.app[STATE_KEY]
    form = await request.post()
    grant_type = form.get("grant_type")
    state.counters[f"token:{grant_type}"] += 1
    if grant_type == "authorization_code":
        return _code_exchange(state, request, form)
    if grant_type == "refresh_token":
        return _refresh(state, request, form)
    if grant_type == JWT_BEARER:
        return _jwt_bearer(state, request, form)
    return oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")


def _code_exchange(state: EmulatorState, request: web.Request, form) -> web.Response:
    client = _authenticate(state, request, form)
    if isinstance(client, web.Response):
        return client
    code = str(form.get("code", ""))
    grant = state.codes.pop(code, None) if not code.startswith("consent:") else None
    if grant is None or grant.expires < state.now():
        return oauth_error("invalid_grant", "Malformed auth code.")
    if grant.client_id != client.client_id:
        return oauth_error("invalid_grant", "Bad Request")
    if form.get("redirect_uri") != grant.redirect_uri:
        return oauth_error("redirect_uri_mismatch", "Bad Request")
    if grant.challenge and not _pkce_ok(grant, form.get("code_verifier")):
        return oauth_error("invalid_grant", "Invalid code verifier.")
    body = {
        "access_token": state.issue_access_token(grant.email),
        "expires_in": state.token_lifetime,
        "scope": grant.scope,
        "token_type": "Bearer",
    }
    if "openid" in grant.scope.split():  # Google returns an ID token only for the openid scope
        body["id_token"] = state.user_id_token(grant.email, client.client_id, None)
    if grant.offline:  # and a refresh token only for access_type=offline
        body["refresh_token"] = state.issue_refresh_token(client.client_id, grant.email, grant.scope)
    return web.json_response(body)


def _refresh(state: EmulatorState, request: web.Request, form) -> web.Response:
    client = _authenticate(state, request, form)
    if isinstance(client, web.Response):
        return client
    refresh_token = str(form.get("refresh_token", ""))
    grant = state.refresh_tokens.get(refresh_token)
    if grant is None or grant.client_id != client.client_id:
        return oauth_error("invalid_grant", "Token has been expired or revoked.")
    audience = form.get("audience")
    if audience is not None:
        target = state.clients.get(str(audience))
        if target is None or target.project != client.project:
            # Google mints ID tokens only for an OAuth client of the same project as the client
            # asking, and says so in these words (seen in the wild: CapacitorGoogleAuth #199).
            state.counters[f"refused_audience:{audience}"] += 1
            return oauth_error("invalid_audience", "The audience client and the client need to be in the same project.")
    state.counters[f"refresh:{audience or client.client_id}"] += 1
    body = {
        "access_token": state.issue_access_token(grant.email),
        "expires_in": state.token_lifetime,
        "scope": grant.scope,
        "token_type": "Bearer",
    }
    if "openid" in grant.scope.split():
        body["id_token"] = state.user_id_token(grant.email, client.client_id, audience)
    if state.rotate_refresh_tokens and grant.client_id != ADC_CLIENT_ID:
        # Google does not rotate refresh tokens, other IdPs do: the old one dies at once. (Not for
        # the ADC file's grant: that file is gcloud's, and nothing would write the new token back.)
        del state.refresh_tokens[refresh_token]
        body["refresh_token"] = state.issue_refresh_token(grant.client_id, grant.email, grant.scope)
    return web.json_response(body)


def _jwt_bearer(state: EmulatorState, request: web.Request, form) -> web.Response:
    assertion = str(form.get("assertion", ""))
    try:
        unverified = google_jwt.decode(assertion, verify=False)
        sa = state.service_accounts.get(unverified.get("iss", ""))
        if sa is None:
            return oauth_error("invalid_grant", "Invalid JWT Signature.")
        token_urls = {str(request.url.with_query(None)), "https://oauth2.googleapis.com/token"}
        claims = google_jwt.decode(assertion, certs={sa.key.kid: sa.key.cert_pem}, audience=list(token_urls),
                                   clock_skew_in_seconds=int(abs(state.clock_offset)) + 10)
    except (google_exceptions.GoogleAuthError, ValueError) as exc:
        return oauth_error("invalid_grant", f"Invalid JWT: {exc}")
    target = claims.get("target_audience")
    if target:
        state.counters[f"sa_id_token:{target}"] += 1
        return web.json_response({"id_token": state.sa_id_token(sa, target)})
    if claims.get("scope"):
        return web.json_response({"access_token": state.issue_access_token(sa.email),
                                  "expires_in": state.token_lifetime, "token_type": "Bearer"})
    return oauth_error("invalid_scope", "Either scope or target_audience is required.")


async def revoke(request: web.Request) -> web.Response:
    """POST /revoke: revoking a refresh token revokes the grant; unknown tokens are 400."""
    state: EmulatorState = request.app[STATE_KEY]
    form = await request.post()
    value = str(form.get("token") or request.query.get("token", ""))
    if state.refresh_tokens.pop(value, None) is not None or state.access_tokens.pop(value, None) is not None:
        state.counters["revoked"] += 1
        # RFC 7009: 200, and the client ignores the body; Google's is empty.
        return web.Response(status=200)
    return oauth_error("invalid_token", "Token expired or revoked")


async def certs_pem(request: web.Request) -> web.Response:
    key = request.app[STATE_KEY].signing_key
    return web.json_response({key.kid: key.cert_pem}, headers={"Cache-Control": "public, max-age=300"})


async def certs_jwks(request: web.Request) -> web.Response:
    return web.json_response({"keys": [request.app[STATE_KEY].signing_key.jwk]})


async def discovery(request: web.Request) -> web.Response:
    base = f"{request.scheme}://{request.host}"
    return web.json_response({
        "issuer": ISSUER,
        "authorization_endpoint": f"{base}/o/oauth2/v2/auth",
        "token_endpoint": f"{base}/token",
        "revocation_endpoint": f"{base}/revoke",
        "jwks_uri": f"{base}/oauth2/v3/certs",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "email", "profile"],
        "code_challenge_methods_supported": ["plain", "S256"],
        "grant_types_supported": ["authorization_code", "refresh_token", JWT_BEARER],
    })
