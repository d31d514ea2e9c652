"""The browser login, driven by the daemon so the client stays tiny.

Authorization code flow with PKCE (S256) and `state`, redirected to a loopback listener on
127.0.0.1 and an ephemeral port (never a fixed one: flyte-iap's fixed port 4444 let any stray
request end or hang its login). Here a request without the right `state` and a `code` gets an
error page and the flow goes on; the flow ends on success, on the IdP's error, or on timeout.

One flow per credential (desktop client) at a time: a second login request joins it. Without a
browser on this machine, the pasted redirect URL completes the same flow (`complete`).

Other local users: a browser's argv is world-readable (/proc/PID/cmdline), and so is the
listener's port (/proc/net/tcp). A browser is therefore given a one-time start URL on the
listener, which redirects to Google: `state` and the PKCE challenge never appear in an argv.
And the listener serves only connections of our own uid (iapd.guard), so nobody else can
deliver a code of theirs (a login takeover) or hold its file descriptors.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from iapd.errors import BadRequest, IapdError, UpstreamError, without_message
from iapd.guard import Gate, GuardedSite, can_check_loopback_peers, loopback_peer_uid
from iapd.sources.oidc import OidcCredential
from iapd.sources.user import UserCredential

LoginCredential = UserCredential | OidcCredential  # what can be logged in to

log = logging.getLogger("iapd.login")
START_PATH = "/start/"
LISTENER_MAX_CONNECTIONS = 32  # a browser opens a handful; the rest would be someone's flood
ABANDON_GRACE_SECONDS = 3.0  # a client between two long-polls is back within milliseconds


def _page(title: str, text: str, status: int = 200) -> web.Response:
    body = (f"<!DOCTYPE html><html><head><title>iapd: {html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>")
    return web.Response(text=body, status=status, content_type="text/html")


@dataclass
class LoginFlow:
    credential: LoginCredential
    verifier: str
    state: str
    redirect_uri: str
    auth_url: str  # the provider's (Google's, an issuer's), with `state` and the PKCE challenge: never in an argv
    browser_url: str  # our one-time start URL, which redirects to auth_url: what a browser is given
    start_nonce: str
    deadline: float  # wall clock, for reporting
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    runner: web.AppRunner | None = None
    callback_path: str = "/oauth2/callback"
    user_code: str | None = None  # the device grant's code for the person to enter
    poller: asyncio.Task | None = None  # the device grant's polling of the token endpoint
    finishing: bool = False
    browser_started: bool = False  # the one-time start URL was fetched
    waiters: int = 0  # clients long-polling its outcome right now
    paste_only: bool = False  # the listener cannot tell users apart: only a pasted redirect completes it
    started_mono: float = field(default_factory=time.monotonic)

    def public(self) -> dict[str, Any]:
        if self.user_code is not None:
            return {"state": "pending", "device": True, "verification_url": self.auth_url, "user_code": self.user_code,
                    "auth_url": self.auth_url, "expires_in": max(0, round(self.deadline - time.time())),
                    "waiters": self.waiters}
        return {"state": "pending", "auth_url": self.auth_url, "browser_url": self.browser_url,
                "redirect_uri": self.redirect_uri, "expires_in": max(0, round(self.deadline - time.time())),
                "browser_opened": self.browser_started, "age": round(time.monotonic() - self.started_mono, 1),
                "waiters": self.waiters, "paste_required": self.paste_only}


class LoginManager:
    def __init__(self, timeout: float, on_login, header_timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.header_timeout = header_timeout  # a connection to the listener that sends no request is dropped
        self.on_login = on_login  # callback(credential_key) after a successful login
        self.flows: dict[str, LoginFlow] = {}
        self.opening: dict[str, asyncio.Task] = {}  # flows being set up (the secret is read first)
        self.results: dict[str, dict[str, Any]] = {}  # last outcome per credential, for polling
        self._tasks: set[asyncio.Task] = set()  # listener shutdowns under way (kept referenced)

    async def start(self, credential: LoginCredential, device: bool = False) -> tuple[LoginFlow, bool]:
        """The flow for this credential, and whether it was already in flight (joined).

        One flow per account from the very first request: setting one up takes a second (the
        client secret is read in a child process), and flytekit's parallel `iapctl token` calls
        must not open a browser tab each. So a flow being set up is joined too."""
        key = credential.key
        flow = self.flows.get(key)
        if flow is not None and not flow.done.done():
            return flow, True
        opening = self.opening.get(key)
        if opening is not None:
            return await asyncio.shield(opening), True
        opening = self.opening[key] = asyncio.create_task(self._begin(credential, device))
        # Forget it when it is done, whoever was waiting (a caller that went away included).
        opening.add_done_callback(lambda task: self.opening.get(key) is task and self.opening.pop(key))
        return await asyncio.shield(opening), False

    async def _begin(self, credential: LoginCredential, device: bool) -> LoginFlow:
        # Whatever the login needs from elsewhere, now, not after the user has clicked through
        # the browser: Google's client secret (anew, it may have been rotated), an issuer's
        # discovery document.
        await credential.prepare_login()
        flow = await (self._open_device(credential) if device else self._open(credential))
        self.flows[credential.key] = flow
        asyncio.get_running_loop().call_later(self.timeout, self._expire, flow)
        log.info("%s: login started, listening on %s", credential.key, flow.redirect_uri)
        return flow

    async def _open_device(self, credential: LoginCredential) -> LoginFlow:
        """RFC 8628: no listener; the person enters a code at the issuer's page on any device,
        while the daemon polls the token endpoint."""
        device = await credential.start_device()
        if not isinstance(device.get("device_code"), str) or not isinstance(device.get("verification_uri"), str):
            raise UpstreamError("the issuer's device authorization answer has no device_code or verification_uri")
        lifetime = min(float(device.get("expires_in") or self.timeout), self.timeout)
        page = device.get("verification_uri_complete") or device["verification_uri"]
        flow = LoginFlow(credential, "", "", "", page, page, "", time.time() + lifetime,
                         user_code=str(device.get("user_code", "")), callback_path="")
        deadline = asyncio.get_running_loop().time() + lifetime

        async def poll() -> None:
            try:
                email = await credential.poll_device(device, deadline)
            except IapdError as exc:
                self._settle(flow, exc)
                return
            self._settle(flow, email)
            self.on_login(credential.key)
            log.info("%s: logged in as %s (device grant)", credential.key, email)

        flow.poller = asyncio.create_task(poll())
        return flow

    async def _open(self, credential: LoginCredential) -> LoginFlow:
        verifier = secrets.token_urlsafe(64)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(24)
        nonce = secrets.token_urlsafe(24)
        flow: LoginFlow | None = None

        async def route(request: web.Request) -> web.Response:
            if flow is None:  # a request raced the set-up; nothing to do yet
                return _page("Not ready", "The login is still starting; try again.", 503)
            try:
                return await self._route(flow, request)
            except web.HTTPException:
                raise
            except Exception as exc:  # noqa: BLE001 - the flow ends with a message, never a hang
                log.error("%s: login listener failed: %s", flow.credential.key, without_message(exc))
                error = IapdError(f"the login failed inside iapd ({type(exc).__name__}); see its log")
                self._settle(flow, error)
                return _page("Login failed", error.message, 500)

        app = web.Application(client_max_size=16 * 1024)
        app.router.add_route("*", "/{tail:.*}", route)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        port, path = credential.redirect()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            await runner.cleanup()
            raise BadRequest(f"cannot listen on 127.0.0.1:{port} for the login's redirect ({exc.strerror}); "
                             "is another login using it?") from None
        sock.listen(128)
        sock.setblocking(False)
        # Every local user can see this port; only our own uid's connections are served, few
        # at a time, each with a deadline (see iapd.guard).
        # Fail closed: where the kernel cannot be asked who a peer is (neither sock_diag nor
        # /proc/net/tcp: macOS, or a seccomp filter with a pid-only /proc), anyone may reach the
        # listener and nobody can be told apart, so the redirect alone completes nothing: the
        # person pastes it through the uid-checked socket.
        checkable = can_check_loopback_peers()
        identify = loopback_peer_uid if checkable else (lambda _transport: os.getuid())
        gate = Gate("login listener", identify, header_timeout=self.header_timeout,
                    max_connections=LISTENER_MAX_CONNECTIONS)
        await GuardedSite(runner, sock, gate).start()
        port = sock.getsockname()[1]
        redirect_uri = credential.redirect_uri(port)
        flow = LoginFlow(credential, verifier, state, redirect_uri,
                         await credential.authorization_url(redirect_uri, state, challenge),
                         f"http://127.0.0.1:{port}{START_PATH}{nonce}", nonce, time.time() + self.timeout,
                         runner=runner, callback_path=path, paste_only=not checkable)
        return flow

    async def _route(self, flow: LoginFlow, request: web.Request) -> web.Response:
        if request.method == "GET" and request.path.startswith(START_PATH):
            return self._start_page(flow, request.path[len(START_PATH):])
        if request.method != "GET" or request.path != flow.callback_path:
            return _page("Not found", "This is iapd's login listener; there is nothing here.", 404)
        if flow.paste_only:
            # Nobody's uid can be told here: the browser's redirect is not proof of who sent it.
            return _page("Paste this address", "To finish the login, copy this page's address from the address "
                         "bar and paste it at iapctl's prompt. (On this machine iapd cannot tell which user's "
                         "browser reached it, so it does not take the login from the browser alone.)")
        outcome = await self._finish(flow, dict(request.query))
        if outcome is None:
            return _page("Not this login", "This request does not belong to the login in progress; it goes on.", 400)
        if isinstance(outcome, IapdError):
            return _page("Login failed", outcome.message, 400)
        return _page("Logged in", f"iapd is logged in as {outcome}. You can close this tab.")

    def _start_page(self, flow: LoginFlow, nonce: str) -> web.Response:
        """The one-time start URL: the browser's argv (readable by every local user in
        /proc/PID/cmdline) carries only this, and it works once, for the first browser."""
        if not secrets.compare_digest(nonce, flow.start_nonce):
            return _page("Not found", "This is iapd's login listener; there is nothing here.", 404)
        if flow.browser_started or flow.done.done():
            return _page("Link already used", "This login link works once. Go back to the terminal; "
                         "run `iapctl login` again for a new one.", 409)
        flow.browser_started = True
        raise web.HTTPFound(flow.auth_url, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    async def complete(self, credential: LoginCredential, redirect_url: str) -> dict[str, Any]:
        """--no-browser: the user pastes the URL the browser was redirected to."""
        flow = self.flows.get(credential.key)
        if flow is None or flow.done.done():
            raise BadRequest("no login in progress for this profile; start one with `iapctl login`")
        parts = urlsplit(redirect_url.strip())
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        outcome = await self._finish(flow, params)
        if outcome is None:
            raise BadRequest("that URL does not belong to the login in progress (wrong or missing state/code)")
        return self.result(credential.key)

    async def _finish(self, flow: LoginFlow, params: dict[str, str]) -> str | IapdError | None:
        """Returns the email on success, the error if the flow failed, None if `params` is stray."""
        if params.get("state") != flow.state or flow.done.done() or flow.finishing:
            return None
        if "error" in params:
            err = UpstreamError(f"the login was refused: {params['error']} {params.get('error_description', '')}".strip())
            self._settle(flow, err)
            return err
        if not params.get("code"):
            return None
        flow.finishing = True  # a code is single-use: a second callback with it is stray
        try:
            email = await flow.credential.exchange_code(params["code"], flow.redirect_uri, flow.verifier)
        except IapdError as exc:
            self._settle(flow, exc)
            return exc
        except OSError as exc:
            # The store could not be written (a full disk, say): end the login now, saying so.
            where = "the keyring" if flow.credential.store.kind == "keyring" else flow.credential.store.path.parent
            error = IapdError(f"the login worked but could not be saved in {where}: "
                              f"{exc.strerror or str(exc) or type(exc).__name__}")
            log.error("%s: %s", flow.credential.key, error.message)
            self._settle(flow, error)
            return error
        self._settle(flow, email)
        self.on_login(flow.credential.key)
        log.info("%s: logged in as %s", flow.credential.key, email)
        return email

    def _settle(self, flow: LoginFlow, outcome: str | IapdError) -> None:
        if flow.done.done():
            return
        if isinstance(outcome, IapdError):
            self.results[flow.credential.key] = {"state": "failed", "error": outcome.code, "message": outcome.message}
            flow.done.set_exception(outcome)
            flow.done.exception()  # mark retrieved: pollers may never come
        else:
            self.results[flow.credential.key] = {"state": "done", "email": outcome}
            flow.done.set_result(outcome)
        # Close the listener after this response has been sent.
        asyncio.get_running_loop().call_later(0.5, self._close_soon, flow)

    def _close_soon(self, flow: LoginFlow) -> None:
        task = asyncio.create_task(self._close(flow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expire(self, flow: LoginFlow) -> None:
        if not flow.done.done():
            log.warning("%s: login timed out after %.0fs", flow.credential.key, self.timeout)
            if flow.user_code is not None:
                where = "the code was not entered and approved at the issuer's page"
            else:
                where = "the browser never came back" if flow.browser_started else "no browser ever opened the login page"
            self._settle(flow, BadRequest(f"the login was not completed within {self.timeout:.0f}s: {where}"))

    async def _close(self, flow: LoginFlow) -> None:
        if flow.poller is not None and not flow.poller.done():
            flow.poller.cancel()
        if flow.runner is not None:
            runner, flow.runner = flow.runner, None
            await runner.cleanup()
        if self.flows.get(flow.credential.key) is flow:
            del self.flows[flow.credential.key]

    def result(self, key: str) -> dict[str, Any]:
        flow = self.flows.get(key)
        if flow is not None and not flow.done.done():
            return flow.public()
        return self.results.get(key, {"state": "none"})

    async def wait(self, key: str, timeout: float) -> dict[str, Any]:
        """Long-poll the outcome. A login belongs to whoever waits for it: when the last waiter
        goes away mid-wait (Ctrl-C, killed) and nobody comes back within a grace period (a
        client re-polls at once), the flow is cancelled and its listener closed."""
        flow = self.flows.get(key)
        if flow is not None and not flow.done.done():
            flow.waiters += 1
            try:
                await asyncio.wait_for(asyncio.shield(flow.done), timeout)
            except (asyncio.TimeoutError, IapdError):
                pass
            except asyncio.CancelledError:
                if flow.waiters == 1:
                    asyncio.get_running_loop().call_later(ABANDON_GRACE_SECONDS, self._abandon_if_unwatched, flow)
                raise
            finally:
                flow.waiters -= 1
        return self.result(key)

    def _abandon_if_unwatched(self, flow: LoginFlow) -> None:
        if not flow.done.done() and flow.waiters == 0:
            log.info("%s: login abandoned (nobody waits for it any more)", flow.credential.key)
            self._settle(flow, BadRequest("the login was abandoned: nobody was waiting for it any more"))

    def cancel(self, key: str) -> dict[str, Any]:
        """End the flow now (Ctrl-C in the client): the next login starts afresh."""
        flow = self.flows.get(key)
        if flow is not None and not flow.done.done():
            log.info("%s: login cancelled by the client", flow.credential.key)
            self._settle(flow, BadRequest("the login was cancelled"))
        return self.result(key)

    async def close(self) -> None:
        for opening in list(self.opening.values()):
            opening.cancel()
        for flow in list(self.flows.values()):
            if not flow.done.done():
                flow.done.cancel()
            await self._close(flow)
