"""A login: a refresh token and where it may go, shared by every profile and audience using it.

(`iapd.login` runs the interactive flows that *make* a login; this module keeps one.)

oidc-agent's accounts are the model: one object per login owns the refresh token, its lock and
its store record, and the cache asks it, never holds it. That is what makes rotation safe:

* **One refresh at a time per login**, whichever profile or audience asked. Issuers that rotate
  refresh tokens (Okta, Auth0, Keycloak, node-oidc-provider) treat a spent token presented again
  as theft and revoke the whole grant, so two audiences refreshing at once — after a login, or
  when a suspend makes every renewal due together — would log the user out. The stored token is
  read *after* taking the lock: the refresh before may have rotated it.
* **Compare-and-swap**: a rotated token is stored only if the store still holds the one that was
  presented. A login or logout that happened meanwhile wins; the stale grant's new token is
  revoked rather than left live.
* **A failed write loses nothing**: the rotated token stays in memory as the live one (the issuer
  has already spent the old), the write is retried before the next refresh, and a token known to
  be spent is never presented again.
* **A refresh is not cut in half**: it runs in a task of its own, so a cancelled request, a
  login's `forget` or the daemon's stop lets a rotation that reached the issuer finish and be
  stored (`close` waits a few seconds for those). No refresh starts after `close`.
* **Bound to where it was minted**: the record keeps the token and revocation endpoints of its
  login, and the refresh token goes to no other URL, whatever a config or a discovery document
  says later. Profiles whose endpoint differs are different logins (see `login_key`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, Awaitable, Callable

from iapd.config import GOOGLE_REVOKE_URL, GOOGLE_TOKEN_URL
from iapd.errors import LoginRequired, UpstreamUnavailable, ViaLoginRequired, without_message
from iapd.store import CredentialStore

log = logging.getLogger("iapd.logins")

CLOSE_GRACE_SECONDS = 5.0  # how long a stop waits for a rotation already at the issuer

Exchange = Callable[[str], Awaitable[dict[str, Any]]]  # refresh token → the token endpoint's answer
Revoke = Callable[[str], Awaitable[str | None]]  # a refresh token → None, or why it was not revoked


def is_legacy_google_key(key: str) -> bool:
    """A Google desktop login's key of before binding (it names no endpoint): Google's own."""
    return key.startswith("user:") and "@" not in key


def user_login_key(client_id: str, token_url: str) -> str:
    """A Google desktop client's login. Google's own endpoint keeps the historical key (stores
    written before logins were bound read as bound to it); any other endpoint is another login."""
    return f"user:{client_id}" if token_url == GOOGLE_TOKEN_URL else f"user:{client_id}@{token_url}"


def oidc_login_key(issuer: str, client_id: str, token_endpoint: str | None) -> str:
    """An issuer's client. A configured token endpoint is part of the key: a profile that sends
    refresh tokens elsewhere never shares the login of one that does not."""
    base = f"oidc:{issuer.rstrip('/')}:{client_id}"
    return base if token_endpoint is None else f"{base}@{token_endpoint}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Login:
    def __init__(self, key: str, store: CredentialStore, default_endpoint: str | None = None) -> None:
        self.key = key
        self.store = store
        # Where a record without a recorded endpoint may be sent: Google's, for records of
        # before binding; None (an issuer's) adopts the first endpoint it is sent to.
        self.default_endpoint = default_endpoint
        self._lock = asyncio.Lock()
        self._pending: str | None = None  # a rotated token whose write failed: the live one
        self._spent: set[str] = set()  # digests of refresh tokens the issuer has rotated away
        self._inflight: set[asyncio.Task] = set()
        self.closed = False

    # -- what the others ask -----------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        return self.store.get(self.key) or {}

    def refresh_token(self) -> str | None:
        return self._pending or self.record().get("refresh_token")

    def logged_in(self) -> bool:
        return bool(self.refresh_token())

    def identity(self) -> str | None:
        return self.record().get("email")

    def bound_endpoint(self) -> str | None:
        return self.record().get("token_endpoint") or self.default_endpoint

    def revocation_endpoint(self) -> str | None:
        """Where this login's refresh token is revoked: the endpoint recorded at login; for a
        Google login stored before logins were bound, Google's; else not known (None)."""
        record = self.record()
        if record.get("revocation_endpoint"):
            return record["revocation_endpoint"]
        return GOOGLE_REVOKE_URL if record and is_legacy_google_key(self.key) else None

    # -- refreshing ---------------------------------------------------------------------------

    async def refresh(self, endpoint: str, exchange: Exchange, revoke: Revoke) -> dict[str, Any]:
        """Present the refresh token at `endpoint` (through `exchange`) and keep what comes back.
        Waits for any refresh of this login already under way."""
        if self.closed:
            raise UpstreamUnavailable("iapd is stopping")
        task = asyncio.create_task(self._refresh(endpoint, exchange, revoke))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved by the awaiter, or nobody
        # Shielded: the caller may go away; the exchange with the issuer may not stop halfway.
        return await asyncio.shield(task)

    async def _refresh(self, endpoint: str, exchange: Exchange, revoke: Revoke) -> dict[str, Any]:
        async with self._lock:
            if self.closed:
                raise UpstreamUnavailable("iapd is stopping")
            await self._write_pending()
            presented = self.refresh_token()
            record = self.record()
            if not presented:
                raise LoginRequired(record.get("login_reason") or "not logged in")
            if _digest(presented) in self._spent:  # cannot happen while writes work; never risk it
                raise LoginRequired("the stored refresh token was already used; log in again")
            bound = self.bound_endpoint()
            if bound is not None and bound != endpoint:
                raise LoginRequired(f"the stored login was made at {bound} and is sent nowhere else, "
                                    f"but this profile's token endpoint is {endpoint}: log in again")
            try:
                body = await exchange(presented)
            except ViaLoginRequired:
                raise  # another login's trouble: ours is fine
            except LoginRequired as exc:
                # The grant is dead: never present it again, and say so in the store — unless a
                # login replaced it meanwhile (then the store holds another token: leave it).
                self._spent.add(_digest(presented))
                try:
                    if self._pending is not None:  # the dead one was only in memory
                        self._pending = None
                        await self.store.update(self.key, refresh_token=None, login_reason=exc.message)
                    else:
                        await self.store.swap(self.key, presented, refresh_token=None, login_reason=exc.message)
                except OSError as write_error:
                    log.error("%s: could not record that the login is dead (%s)", self.key,
                              type(write_error).__name__)
                raise
            # A record of before binding adopts the endpoint it now works at, with this write.
            fields = {} if bound is not None else {"token_endpoint": endpoint}
            rotated = body.get("refresh_token")
            if isinstance(rotated, str) and rotated and rotated != presented:
                self._spent.add(_digest(presented))
                if not await self._keep(presented, rotated, **fields):
                    # A login or logout replaced this login while we talked to the issuer: the
                    # answer belongs to a grant nobody keeps. Revoke its new token, and look again.
                    await revoke(rotated)
                    raise UpstreamUnavailable("the login changed during a refresh; try again")
            elif fields:
                await self._keep(presented, presented, **fields)
            return body

    async def _keep(self, presented: str, new: str, **fields: Any) -> bool:
        """Store `new` if the store still holds `presented`; False if something else replaced
        it. A write that fails keeps `new` in memory as the live token (retried later)."""
        try:
            if self._pending is not None:
                # The store still holds what an earlier failed write meant to replace, and only
                # a login or logout (under this lock, which clear `_pending`) could change it.
                await self.store.update(self.key, refresh_token=new, **fields)
                swapped = True
            else:
                swapped = await self.store.swap(self.key, presented, refresh_token=new, **fields)
        except OSError as exc:
            self._pending = new
            log.error("%s: could not store the rotated refresh token (%s); keeping it in memory and "
                      "retrying the write", self.key, type(exc).__name__)
            return True
        if swapped:
            self._pending = None
        return swapped

    async def _write_pending(self) -> None:
        if self._pending is None:
            return
        try:
            await self.store.update(self.key, refresh_token=self._pending)
        except OSError as exc:
            log.error("%s: the rotated refresh token is still not stored (%s)", self.key, type(exc).__name__)
            return
        self._pending = None
        log.info("%s: stored the rotated refresh token that an earlier write failed to", self.key)

    # -- logging in and out -------------------------------------------------------------------

    async def save(self, record: dict[str, Any], revoke: Revoke) -> None:
        """A new login's record (refresh token, endpoints, who). The grant it replaces is revoked:
        a login mints a new refresh token, and the old one must not live on."""
        async with self._lock:
            previous = self.refresh_token()
            try:
                await self.store.put(self.key, record)
            except OSError:
                await revoke(record["refresh_token"])  # a grant nobody can keep must not live on
                raise
            self._pending = None
            self._spent.discard(_digest(record["refresh_token"]))
        if previous and previous != record["refresh_token"]:
            await revoke(previous)

    async def logout(self, revoke: Revoke) -> dict[str, Any]:
        """Revoke at the issuer it came from (best effort, reported), then wipe the record."""
        async with self._lock:
            token, record = self.refresh_token(), self.record()
            result: dict[str, Any] = {"credential": self.key, "email": record.get("email"), "revoked": False,
                                      "wiped": False}
            if token:
                error = await revoke(token)
                result["revoked"] = error is None
                if error is not None:
                    result["revoke_error"] = error
            self._pending = None
            result["wiped"] = await self.store.delete(self.key)
            return result

    async def close(self, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """No refresh starts from now on; one already at the issuer may finish and be stored."""
        self.closed = True
        if self._inflight:
            done, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                log.warning("%s: a refresh did not finish within %.0fs of the stop", self.key, grace)
                task.cancel()
        if self._pending is not None:
            await self._write_pending()


class Logins:
    """Every login the daemon knows, by key: profiles and reloads come and go, a login stays
    one object (its lock, its in-memory state) for the daemon's life."""

    def __init__(self, store: CredentialStore) -> None:
        self.store = store
        self._by_key: dict[str, Login] = {}

    def get(self, key: str, default_endpoint: str | None = None) -> Login:
        login = self._by_key.get(key)
        if login is None:
            login = self._by_key[key] = Login(key, self.store, default_endpoint)
        return login

    async def close(self) -> None:
        results = await asyncio.gather(*(login.close() for login in self._by_key.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                log.error("closing a login failed: %s", without_message(result))
