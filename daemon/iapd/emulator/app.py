"""The emulator as one object: Google's endpoints on one port, IAP on a second, the app behind
IAP on a third — all on loopback. Tests start it in-process; `iapd emulator` runs it as a command.

Test controls live under `/_emulator/` on the Google port: token lifetime, clock offset, approve
mode, refresh-token rotation, fault injection on any endpoint, revoking a user, call counters.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from iapd.emulator import gcp, iap, issuer, oauth
from iapd.emulator.files import write_demo_files
from iapd.emulator.gateway import Gateway, make_gateway_app
from iapd.emulator.iap import IAPProxy, iap_redirect_uri, make_backend_app, make_iap_app
from iapd.emulator.state import (
    DEMO_SA_EMAIL, DESKTOP_CLIENT_ID, IAP_CLIENT_ID, METADATA_SA_EMAIL, PROJECT, ROLES, EmulatorState,
)

log = logging.getLogger("iapd.emulator")


@web.middleware
async def emulated_clock(request: web.Request, handler):
    """`Date` from the emulated clock, so that a skewed Google looks skewed to its clients too."""
    date = email.utils.formatdate(request.app[oauth.STATE_KEY].now(), usegmt=True)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # redirects and 4xx raised by handlers and the router
        exc.headers["Date"] = date
        raise
    response.headers["Date"] = date
    return response


@web.middleware
async def counters_and_faults(request: web.Request, handler):
    """Counts every call per endpoint, then applies the next injected fault for it, if any."""
    route = request.match_info.route.name
    if route is None or route.startswith("control"):
        return await handler(request)
    state: EmulatorState = request.app[oauth.STATE_KEY]
    state.counters[route] += 1
    in_flight = f"in_flight:{route}"
    state.counters[in_flight] += 1
    state.counters[f"max_{in_flight}"] = max(state.counters[f"max_{in_flight}"], state.counters[in_flight])
    try:
        return await _with_faults(state, route, request, handler)
    finally:
        state.counters[in_flight] -= 1


async def _with_faults(state: EmulatorState, route: str, request: web.Request, handler):
    fault = state.pop_fault(route)
    if fault is None:
        return await handler(request)
    state.counters[f"fault:{route}:{fault.kind}"] += 1
    if fault.kind == "delay":
        # The whole request has arrived (read now): a client that goes away during the delay
        # does not take it back — as at Google, where a request that arrived is carried out.
        await request.read()
        await asyncio.sleep(fault.delay)
        return await handler(request)
    if fault.kind == "drop":
        # The connection goes away with no response, as a reset or a dying load balancer would.
        await request.read()
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError
    if fault.kind == "invalid_grant":
        return oauth.oauth_error("invalid_grant", "Token has been expired or revoked.")
    if fault.kind == "invalid_rapt":
        # Google's answer when a reauthentication policy (session length) expires the grant.
        return oauth.oauth_error("invalid_grant", "reauth related error (invalid_rapt)",
                                 error_uri="https://support.google.com/a/answer/9368756", error_subtype="invalid_rapt")
    status = int(fault.kind)
    names = {500: "INTERNAL", 503: "UNAVAILABLE", 429: "RESOURCE_EXHAUSTED"}
    if route == "token":
        return oauth.oauth_error("internal_failure" if status >= 500 else "rate_limit_exceeded",
                                 "Injected fault", status=status)
    return gcp.google_error(status, names[status], "Injected fault")


async def control_get(request: web.Request) -> web.Response:
    state: EmulatorState = request.app[oauth.STATE_KEY]
    return web.json_response({
        "counters": dict(state.counters),
        "token_lifetime": state.token_lifetime,
        "clock_offset": state.clock_offset,
        "approve": state.approve,
        "user_email": state.user_email,
        "metadata_cache": state.metadata_cache,
        "iap_access_level": state.iap_access_level,
        "allowlisted_clients": sorted(state.allowlisted_clients),
        "rotate_refresh_tokens": state.rotate_refresh_tokens,
        "live_refresh_tokens": len(state.refresh_tokens),
        "pending_faults": {k: len(v) for k, v in state.faults.items() if v},
        "oidc": {"user": state.issuer.user, "token_lifetime": state.issuer.token_lifetime,
                 "auth_methods": state.issuer.auth_methods, "device_interval": state.issuer.device_interval,
                 "client_secrets": {c.client_id: c.secret for c in state.issuer.clients.values() if c.secret},
                 "live_refresh_tokens": len(state.issuer.refresh),
                 "device_poll_gaps": [round(b - a, 2) for a, b in zip(state.issuer.device_polls,
                                                                      state.issuer.device_polls[1:])]},
    })


async def control_post(request: web.Request) -> web.Response:
    """POST /_emulator/{action} with a JSON body; a clear 400 for anything else."""
    state: EmulatorState = request.app[oauth.STATE_KEY]
    action = request.match_info["action"]
    try:
        body = await request.json() if request.can_read_body else {}
        if action == "settings":
            for key in ("token_lifetime", "clock_offset", "approve", "rotate_refresh_tokens", "user_email",
                        "metadata_cache", "metadata_cache_until_left", "iap_access_level"):
                if key in body:
                    setattr(state, key, type(getattr(state, key))(body[key]))
            if "metadata_cache" in body:
                state.metadata_tokens.clear()
            if state.approve not in ("auto", "consent", "deny"):
                raise ValueError("approve must be auto, consent or deny")
        elif action == "faults":
            state.push_fault(body.get("endpoint", "token"), str(body["kind"]), int(body.get("count", 1)),
                             float(body.get("delay", 0)))
        elif action == "clear_faults":
            state.faults.clear()
        elif action == "oidc":
            for key in ("user", "token_lifetime", "auth_methods", "device_interval", "slow_down_polls"):
                if key in body:
                    setattr(state.issuer, key, body[key])
            state.issuer.device_polls.clear()
        elif action == "grant":  # a role on a service account: {target, member, role}
            if body["role"] not in ROLES or body["target"] not in state.service_accounts:
                raise ValueError(f"role must be one of {sorted(ROLES)} and target a service account")
            state.grant(str(body["target"]), str(body["member"]), str(body["role"]))
        elif action == "allowlist":  # IAP's programmatic allowlist: {clients: [client ids]}
            state.allowlisted_clients = {str(c) for c in body["clients"]}
        elif action == "rotate_client_secret":
            state.rotate_client_secret()
        elif action == "reset_counters":
            state.counters.clear()
        elif action == "revoke_user":
            revoked = state.revoke_user(body.get("email") or state.user_email, body.get("client_id", DESKTOP_CLIENT_ID))
            return web.json_response({"revoked": revoked})
        else:
            return web.json_response({"error": f"unknown action {action}"}, status=404)
    except (ValueError, KeyError, TypeError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return await control_get(request)


def make_google_app(state: EmulatorState) -> web.Application:
    app = web.Application(middlewares=[emulated_clock, gcp.metadata_flavor, counters_and_faults])
    app[oauth.STATE_KEY] = state
    r = app.router
    r.add_get("/o/oauth2/v2/auth", oauth.authorize, name="auth")
    r.add_post("/o/oauth2/v2/auth/approve", oauth.approve, name="approve")
    r.add_post("/token", oauth.token, name="token")
    r.add_post("/revoke", oauth.revoke, name="revoke")
    r.add_get("/oauth2/v1/certs", oauth.certs_pem, name="certs")
    r.add_get("/oauth2/v3/certs", oauth.certs_jwks, name="jwks")
    r.add_get("/.well-known/openid-configuration", oauth.discovery, name="discovery")
    r.add_get("/v1/projects/{project}/secrets/{secret}/versions/{version:[^/:]+}:access", gcp.secret_access,
              name="secret_manager")
    r.add_post("/v1/projects/-/serviceAccounts/{sa:[^/:]+}:generateIdToken", gcp.generate_id_token,
               name="iam_credentials")
    r.add_post("/v1/projects/-/serviceAccounts/{sa:[^/:]+}:generateAccessToken", gcp.generate_access_token,
               name="iam_access_token")
    r.add_post("/v1/projects/-/serviceAccounts/{sa:[^/:]+}:signJwt", gcp.sign_jwt, name="iam_sign_jwt")
    r.add_get("/service_accounts/v1/metadata/x509/{email}", gcp.service_account_x509, name="sa_certs")
    r.add_get("/iap/v1/oauth/clientIds/{client:[^/:]+}:handleRedirect", iap.handle_redirect, name="iap_redirect")
    r.add_post("/v1/token", gcp.sts_token, name="sts")
    r.add_get("/", gcp.metadata_root, name="metadata_root")
    md = "/computeMetadata/v1/instance/service-accounts/{account}"
    r.add_get(md + "/identity", gcp.metadata_identity, name="metadata")
    r.add_get(md + "/email", gcp.metadata_email, name="metadata_email")
    r.add_get(md + "/", gcp.metadata_sa_info, name="metadata_info")
    r.add_get(md + "/token", gcp.metadata_token, name="metadata_token")
    issuer.add_routes(app, state.issuer)
    r.add_get("/_emulator", control_get, name="control")
    r.add_post("/_emulator/{action}", control_post, name="control_post")
    return app


@dataclass
class EmulatorURLs:
    base: str
    iap: str
    backend: str
    gateway: str
    flyte: str

    def as_dict(self) -> dict[str, str]:
        b = self.base
        return {
            "oauth_auth_url": f"{b}/o/oauth2/v2/auth",
            "token_url": f"{b}/token",
            "revoke_url": f"{b}/revoke",
            "certs_url": f"{b}/oauth2/v1/certs",
            "jwks_url": f"{b}/oauth2/v3/certs",
            "discovery_url": f"{b}/.well-known/openid-configuration",
            "secret_manager_url": b,
            "metadata_url": b,
            "metadata_host": b.removeprefix("http://"),
            "iam_credentials_url": b,
            "sts_url": f"{b}/v1/token",
            "control_url": f"{b}/_emulator",
            "oidc_issuer": f"{b}{issuer.PREFIX}",
            "iap_url": self.iap,
            "backend_url": self.backend,
            "gateway_url": self.gateway,  # oauth2-proxy-like, trusting the /oidc issuer's ID tokens
            # flyteadmin behind IAP: a second IAP-protected app, whose backend is the /oidc issuer
            # (its authorization server), for `via` profiles and the browser walk through IAP.
            "flyte_url": self.flyte,
            "flyte_issuer": f"{self.flyte}{issuer.PREFIX}",
            "sa_certs_url": f"{b}/service_accounts/v1/metadata/x509",
        }


class Emulator:
    """Start with `await Emulator(...).start()`; stop with `await emulator.stop()`."""

    def __init__(self, state: EmulatorState | None = None, host: str = "127.0.0.1", port: int = 0,
                 iap_port: int = 0, backend_url: str | None = None) -> None:
        self.state = state or EmulatorState.demo()
        self.host, self.port, self.iap_port = host, port, iap_port
        self.external_backend = backend_url
        self._runners: list[web.AppRunner] = []
        self.urls: EmulatorURLs | None = None

    async def _serve(self, app: web.Application, port: int) -> str:
        # A stop does not wait a minute (aiohttp's default) for clients' idle keep-alive connections.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        self._runners.append(runner)
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal goes in brackets
        return f"http://{host}:{sock.getsockname()[1]}"

    async def start(self) -> "Emulator":
        base = await self._serve(make_google_app(self.state), self.port)
        backend = self.external_backend or await self._serve(make_backend_app(), 0)
        # IAP's own OAuth client comes back to IAP's redirect URI after a browser sign-in.
        self.state.clients[IAP_CLIENT_ID].redirect_uris.add(iap_redirect_uri(base))
        iap = await self._serve(make_iap_app(IAPProxy(self.state, base, backend)), self.iap_port)
        flyte = await self._serve(make_iap_app(IAPProxy(self.state, base, base)), 0)
        gateway = Gateway(self.state.issuer, f"{base}{issuer.PREFIX}", ["kubeflow-cli"], backend)
        self.urls = EmulatorURLs(base, iap, backend, await self._serve(make_gateway_app(gateway), 0), flyte)
        return self

    async def stop(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    def ready_line(self, config_path: str | None = None) -> str:
        assert self.urls is not None
        info = {**self.urls.as_dict(), "desktop_client_id": DESKTOP_CLIENT_ID, "iap_client_id": IAP_CLIENT_ID,
                "user_email": self.state.user_email, "service_account": DEMO_SA_EMAIL,
                "metadata_service_account": METADATA_SA_EMAIL, "project": PROJECT, "pid": os.getpid()}
        if config_path:
            info["config"] = config_path
        return json.dumps(info, sort_keys=True)

    def write_config(self, path: str | os.PathLike[str]) -> Path:
        """Write a ready-to-use iapd config and the credential files it references.

        `demo-user`: the desktop client, its secret in the emulated Secret Manager, read with an
        `authorized_user` ADC file whose token_uri is ours. `demo-sa`: a key file we issued.
        """
        assert self.urls is not None
        return write_demo_files(Path(path), self.state, self.urls.as_dict())

