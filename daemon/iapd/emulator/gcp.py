"""Google Cloud APIs the flows touch: Secret Manager, the metadata server, IAM Credentials.

They share Google's JSON error shape `{"error": {"code", "message", "status"}}` and, except the
metadata server, a bearer access token issued by the emulated token endpoint.
"""

from __future__ import annotations

import base64
import json
import time

from aiohttp import web

from google.auth import exceptions as auth_exceptions
from google.auth import jwt as google_jwt

from iapd.crc32c import crc32c
from iapd.emulator.oauth import STATE_KEY, oauth_error
from iapd.emulator.state import (
    METADATA_SA_EMAIL, PROJECT, PROJECT_NUMBER, WIF_AUDIENCE, WIF_ISSUER, WIF_PRINCIPAL, EmulatorState,
)


def google_error(code: int, status: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "status": status}}, status=code)


def _caller(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer "):
        return None
    return request.app[STATE_KEY].identity_of_access_token(auth[7:].strip())


UNAUTHENTICATED = (401, "UNAUTHENTICATED",
                   "Request is missing required authentication credential. Expected OAuth 2 access token.")


async def secret_access(request: web.Request) -> web.Response:
    """GET /v1/projects/{project}/secrets/{secret}/versions/{version}:access"""
    state: EmulatorState = request.app[STATE_KEY]
    if _caller(request) is None:
        return google_error(*UNAUTHENTICATED)
    project, secret, version = (request.match_info[k] for k in ("project", "secret", "version"))
    if project not in (PROJECT, PROJECT_NUMBER):
        return google_error(403, "PERMISSION_DENIED", f"Permission denied on project {project}.")
    payload = state.secrets.get(f"projects/{PROJECT}/secrets/{secret}")
    if payload is None or version not in ("latest", "1"):
        return google_error(404, "NOT_FOUND", f"Secret [projects/{PROJECT_NUMBER}/secrets/{secret}] not found or has no versions.")
    state.counters["secret_access"] += 1
    return web.json_response({
        # Google answers with the project *number* and the resolved version, whatever was asked.
        "name": f"projects/{PROJECT_NUMBER}/secrets/{secret}/versions/1",
        "payload": {"data": base64.b64encode(payload).decode(), "dataCrc32c": str(crc32c(payload))},
    })


def _metadata_response(body: str, content_type: str = "application/text") -> web.Response:
    return web.Response(text=body, content_type=content_type, headers={"Metadata-Flavor": "Google"})


@web.middleware
async def metadata_flavor(request: web.Request, handler):
    """The metadata server refuses requests without `Metadata-Flavor: Google` (SSRF defence)."""
    if request.path.startswith("/computeMetadata/") and request.headers.get("Metadata-Flavor") != "Google":
        return web.Response(status=403, text="Missing required header: Metadata-Flavor\n",
                            headers={"Metadata-Flavor": "Google"})
    return await handler(request)


async def metadata_root(request: web.Request) -> web.Response:
    return _metadata_response("computeMetadata/\n")


async def metadata_identity(request: web.Request) -> web.Response:
    state: EmulatorState = request.app[STATE_KEY]
    audience = request.query.get("audience")
    if not audience:
        return web.Response(status=400, text="non-empty audience parameter required\n",
                            headers={"Metadata-Flavor": "Google"})
    sa = state.service_accounts[METADATA_SA_EMAIL]
    extra = None
    if request.query.get("format") == "full":
        extra = {"google": {"compute_engine": {"project_id": PROJECT, "project_number": int(PROJECT_NUMBER),
                                               "zone": "europe-west1-b", "instance_name": "iapd-emulator"}}}
    state.counters[f"metadata_identity:{audience}"] += 1
    return _metadata_response(state.metadata_id_token(sa, audience, request.query.get("format") == "full", extra))


async def metadata_email(request: web.Request) -> web.Response:
    return _metadata_response(METADATA_SA_EMAIL)


async def metadata_sa_info(request: web.Request) -> web.Response:
    info = {"aliases": ["default"], "email": METADATA_SA_EMAIL,
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
    return _metadata_response(json.dumps(info), "application/json")


async def metadata_token(request: web.Request) -> web.Response:
    state: EmulatorState = request.app[STATE_KEY]
    body = {"access_token": state.issue_access_token(METADATA_SA_EMAIL),
            "expires_in": state.token_lifetime, "token_type": "Bearer"}
    return _metadata_response(json.dumps(body), "application/json")


async def _impersonation(request: web.Request, permission: str) -> tuple[dict, str] | web.Response:
    """Authenticate the caller and check the delegation chain caller → delegates… → target.
    Returns (request body, target email) or the error response."""
    state: EmulatorState = request.app[STATE_KEY]
    caller = _caller(request)
    if caller is None:
        return google_error(*UNAUTHENTICATED)
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise TypeError
        delegates = [d.removeprefix("projects/-/serviceAccounts/") for d in body.get("delegates") or []]
    except (ValueError, KeyError, TypeError, AttributeError):
        return google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
    target_email = request.match_info["sa"]
    chain = [*delegates, target_email]
    for hop in chain:
        if hop not in state.service_accounts:
            return google_error(404, "NOT_FOUND", f"Not found; Gaia id not found for email {hop}")
    # Each delegate needs implicitDelegation granted by the one before it; the last actor needs
    # the method's own permission on the target (getOpenIdToken is not getAccessToken).
    actor = caller
    for i, hop in enumerate(chain):
        needed = permission if i == len(chain) - 1 else "implicitDelegation"
        if not state.may(actor, needed, hop):
            return google_error(403, "PERMISSION_DENIED",
                                f"Permission 'iam.serviceAccounts.{needed}' denied on resource (or it may not exist).")
        actor = hop
    return body, target_email


async def generate_id_token(request: web.Request) -> web.Response:
    """POST /v1/projects/-/serviceAccounts/{sa}:generateIdToken (IAM Credentials)."""
    state: EmulatorState = request.app[STATE_KEY]
    checked = await _impersonation(request, "getOpenIdToken")
    if isinstance(checked, web.Response):
        return checked
    body, target = checked
    audience = body.get("audience")
    if not isinstance(audience, str) or not audience:
        return google_error(400, "INVALID_ARGUMENT", "audience is required.")
    state.counters[f"generate_id_token:{audience}"] += 1
    token = state.sa_id_token(state.service_accounts[target], audience, bool(body.get("includeEmail", False)))
    return web.json_response({"token": token})


MAX_SIGN_JWT_EXP = 12 * 3600  # signJwt refuses an `exp` more than 12 hours away


async def sign_jwt(request: web.Request) -> web.Response:
    """POST /v1/projects/-/serviceAccounts/{sa}:signJwt (IAM Credentials): the payload, signed
    with one of the account's keys (its id in the header's `kid`)."""
    state: EmulatorState = request.app[STATE_KEY]
    checked = await _impersonation(request, "signJwt")
    if isinstance(checked, web.Response):
        return checked
    body, target = checked
    try:
        payload = json.loads(body["payload"])
        if not isinstance(payload, dict):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        return google_error(400, "INVALID_ARGUMENT", "payload must be a JSON object serialized as a string.")
    exp = payload.get("exp")
    if not isinstance(exp, (int, float)) or exp > state.now() + MAX_SIGN_JWT_EXP:
        return google_error(400, "INVALID_ARGUMENT",
                            "The exp claim is missing, or more than 12 hours in the future.")
    key = state.service_accounts[target].key
    state.counters["sign_jwt"] += 1
    return web.json_response({"keyId": key.kid, "signedJwt": key.sign(payload)})


async def service_account_x509(request: web.Request) -> web.Response:
    """GET /service_accounts/v1/metadata/x509/{email} (www.googleapis.com): the account's public
    keys, key id → X.509 certificate PEM, where IAP and anyone else checks its signed JWTs."""
    state: EmulatorState = request.app[STATE_KEY]
    sa = state.service_accounts.get(request.match_info["email"])
    if sa is None:
        return google_error(404, "NOT_FOUND", f"Service account {request.match_info['email']} not found.")
    return web.json_response({sa.key.kid: sa.key.cert_pem})


async def generate_access_token(request: web.Request) -> web.Response:
    """POST /v1/projects/-/serviceAccounts/{sa}:generateAccessToken (how external accounts and
    impersonated credentials become a service account)."""
    state: EmulatorState = request.app[STATE_KEY]
    checked = await _impersonation(request, "getAccessToken")
    if isinstance(checked, web.Response):
        return checked
    _, target = checked
    expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.now() + state.token_lifetime))
    return web.json_response({"accessToken": state.issue_access_token(target), "expireTime": expire})


TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


async def sts_token(request: web.Request) -> web.Response:
    """POST /v1/token (Security Token Service): an external OIDC token for a federated token.

    The emulator plays the external IdP too: the subject token must be signed by the emulator's
    key with iss = WIF_ISSUER and aud = the pool provider, as GitHub's would be for a real pool."""
    state: EmulatorState = request.app[STATE_KEY]
    form = await request.post()
    if form.get("grant_type") != TOKEN_EXCHANGE:
        return oauth_error("unsupported_grant_type", "grant_type must be token-exchange")
    if form.get("audience") != WIF_AUDIENCE:
        return oauth_error("invalid_target", "The target service indicated by the \"audience\" parameters is invalid.")
    key = state.signing_key
    try:
        claims = google_jwt.decode(str(form.get("subject_token", "")), certs={key.kid: key.cert_pem},
                                   audience=WIF_AUDIENCE, clock_skew_in_seconds=int(abs(state.clock_offset)) + 10)
    except (auth_exceptions.GoogleAuthError, ValueError) as exc:
        return oauth_error("invalid_grant", f"The subject token is invalid: {str(exc)[:120]}")
    if claims.get("iss") != WIF_ISSUER:
        return oauth_error("invalid_grant", "The issuer of the subject token is not trusted by the provider.")
    return web.json_response({"access_token": state.issue_access_token(WIF_PRINCIPAL),
                              "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                              "token_type": "Bearer", "expires_in": state.token_lifetime})
