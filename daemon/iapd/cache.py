"""Token cache and renewal: one entry per (credential, audience), renewed *before* it expires.

Policy, per token, from its own lifetime L measured on receipt:
  * advisory window  W = clamp(max(renew_before, fraction·L), ≤ L/2), jittered down to 0.8·W:
    a renewal starts in the background when that much is left, so requests never wait;
  * mandatory margin M = min(margin, W/2): a token with less than M left is never served —
    the request waits for a refresh instead (one refresh per entry, however many wait).
Failures are of three kinds. Transient (5xx, 429, network): exponential backoff with jitter up
to a cap while the still-valid token keeps being served, and the backoff of every entry is reset
the moment any refresh succeeds again (the network is back). A permanent refusal (a 4xx that is
not `invalid_grant`): retried only hourly, and at once after a login. A configuration problem
(a missing key file, no audience): never retried until the profile changes. Login-required stops
all renewal of that credential until a new login. At most `max_concurrent_refreshes` run at once:
after a suspend every audience is due together. Entries nobody asked for in `idle_seconds` are
not renewed ahead of time (on demand still).

Entries never hold a refresh token: a source asks its login (iapd.logins), which runs one
refresh at a time per login whichever entry asked — entries of one login may refresh "together"
here and still reach the issuer one after the other, each with the token the last one left.

One supervisor task sleeps until the next renewal is due, but never longer than `tick_seconds`:
timers stop while a laptop sleeps, and every wake-up (and every request) re-checks both clocks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Callable, NoReturn

from iapd.clock import Clock
from iapd.config import DaemonSettings
from iapd.errors import (ConfigProblem, IapdError, LoginRequired, UpstreamError, UpstreamUnavailable,
                         ViaLoginRequired, without_message)
from iapd.jwt import fingerprint
from iapd.sources.base import IdToken, TokenSource

log = logging.getLogger("iapd.cache")
FRESH_ATTEMPTS = 3  # asks for a token that keeps the margin, before the refresh counts as failed


def renewal_window(lifetime: float, settings: DaemonSettings) -> tuple[float, float]:
    """(advisory window, mandatory margin) in seconds of remaining life."""
    window = min(max(settings.renew_before_seconds, settings.renew_fraction * lifetime), lifetime / 2)
    return window, min(settings.margin_seconds, window / 2)


@dataclass
class Entry:
    source: TokenSource
    audience: str | None
    token: IdToken | None = None
    renew_when_left: float = 0.0  # jittered advisory window of the current token
    margin: float = 0.0
    task: asyncio.Task | None = None
    failures: int = 0
    retry_at: float = 0.0  # mono clock
    last_error: IapdError | None = None
    last_attempt_wall: float | None = None
    refresh_count: int = 0
    last_request_mono: float = 0.0
    waited: int = 0  # requests that ever had to wait for a refresh (0 in steady state is the goal)

    @property
    def login_required(self) -> bool:
        """This entry's own login is needed. A `via` profile's login is that profile's business:
        this entry retries (with backoff, and at once after any login)."""
        return isinstance(self.last_error, LoginRequired) and not isinstance(self.last_error, ViaLoginRequired)

    def error_to_raise(self) -> IapdError:
        """The last error, as a fresh exception: re-raising one stored object would append this
        request's frames to its traceback every time — a leak in a long-lived daemon."""
        assert self.last_error is not None
        return self.last_error.with_extra()


class TokenCache:
    def __init__(self, settings: DaemonSettings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        # Keyed by the source *object*: profiles share one when their settings are the same, and a
        # reload that changes a profile's settings gives it a new one (and so a fresh entry).
        self.entries: dict[tuple[TokenSource, str | None], Entry] = {}
        self.stopped = False
        self._wake = asyncio.Event()
        self._supervisor: asyncio.Task | None = None
        self._slots = asyncio.Semaphore(settings.max_concurrent_refreshes)
        # How many times the supervisor has looked at every entry: what proves that it *would*
        # have started a renewal (status shows it; tests wait on it rather than sleep).
        self.passes = 0
        self.on_tick: Callable[[], None] | None = None  # the agent's config check, each wake-up

    # -- the request path -------------------------------------------------------------------

    def entry(self, source: TokenSource, audience: str | None) -> Entry:
        key = (source, audience)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = Entry(source, audience)
            # A new entry of a credential already known to need a login inherits that state.
            sibling = next((e for e in self.entries.values() if e.source.key == source.key and e.login_required), None)
            if sibling is not None:
                entry.last_error = sibling.last_error
        return entry

    async def get(self, source: TokenSource, audience: str | None) -> IdToken:
        """A token with at least the mandatory margin left; waits for a refresh only if needed."""
        entry = self.entry(source, audience)
        entry.last_request_mono = self.clock.mono()
        deadline = self.clock.mono() + self.settings.request_timeout_seconds
        entry.waited += 1
        while True:
            token = self.peek(source, audience)
            if token is not None:
                return token
            if entry.login_required:
                raise entry.error_to_raise()
            if entry.task is None:
                if self.stopped:
                    raise UpstreamUnavailable("iapd is stopping; try again in a moment")
                if entry.last_error is not None and self.clock.mono() < entry.retry_at:
                    raise entry.error_to_raise()  # backing off: fail fast instead of hammering the IdP
                self._start(entry)
            assert entry.task is not None
            task = entry.task
            try:
                return await asyncio.wait_for(asyncio.shield(task), max(deadline - self.clock.mono(), 0.0))
            except asyncio.TimeoutError:
                raise UpstreamUnavailable("the token endpoint is slow to answer; try again shortly") from None
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this request itself is being cancelled (its client went away)
                # The refresh was cancelled under us (a login or logout forgot the entry):
                # look again — a new refresh, or the new state's answer, not a dropped connection.

    async def replace(self, source: TokenSource, audience: str | None, rejected: IdToken) -> IdToken:
        """The app refused `rejected` before its time (revoked early): a new one. Everyone who saw
        the same token refused shares one refresh (only the token still cached is dropped)."""
        entry = self.entry(source, audience)
        if entry.token is rejected:
            entry.token = None
        return await self.get(source, audience)

    def peek(self, source: TokenSource, audience: str | None) -> IdToken | None:
        """The cached token if it can be served as it is (more than the margin left), else None.
        Synchronous: the socket's fast path answers from this without an await."""
        entry = self.entries.get((source, audience))
        if entry is None or entry.token is None:
            return None
        left = entry.token.remaining(self.clock)
        if left <= entry.margin:
            return None
        # Even when login is required now, a still-valid token is still good at IAP: serve it.
        entry.last_request_mono = self.clock.mono()
        if left <= entry.renew_when_left and entry.task is None:
            self._wake.set()  # due: the supervisor starts the renewal, this request does not wait
        return entry.token

    # -- refreshing -------------------------------------------------------------------------

    def _start(self, entry: Entry) -> None:
        if self.stopped:
            return
        entry.task = asyncio.create_task(self._refresh(entry))
        # A refresh nobody awaits (background renewal) must not log "exception never retrieved".
        entry.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _retry_delay(self, entry: Entry, exc: IapdError) -> float:
        if isinstance(exc, ConfigProblem):
            return float("inf")  # until the profile changes (a reload or a restart)
        if isinstance(exc, UpstreamError):
            return self.settings.refused_retry_seconds * random.uniform(0.9, 1.0)
        delay = min(self.settings.backoff_cap_seconds, self.settings.backoff_initial_seconds * 2 ** (entry.failures - 1))
        return delay * random.uniform(0.5, 1.0)

    async def _refresh(self, entry: Entry) -> IdToken:
        me = asyncio.current_task()
        try:
            async with self._slots:
                entry.last_attempt_wall = self.clock.wall()
                token = await self._fetch_servable(entry)
        except LoginRequired as exc:
            if isinstance(exc, ViaLoginRequired):
                self._failed(entry, exc)  # the `via` profile's login: retried, never ours cleared
            log.warning("%s: login required: %s", entry.source.key, exc.message)
            for other in self.entries.values():
                if other.source.key == entry.source.key:
                    other.last_error = exc  # tokens still valid keep being served until their margin
            raise
        except Exception as exc:  # noqa: BLE001 - a source's surprise must not become a 500 loop
            if not isinstance(exc, IapdError):
                log.error("%s: unexpected error while refreshing: %s", entry.source.key, without_message(exc))
                exc = UpstreamUnavailable(f"unexpected error while getting a token ({type(exc).__name__}); "
                                          "see iapd's log")
            self._failed(entry, exc)
        finally:
            # Only our own slot: a cancelled refresh must not clear a newer one started after it.
            if entry.task is me:
                entry.task = None
            self._wake.set()
        window, _ = renewal_window(token.lifetime, self.settings)
        entry.token, entry.margin = token, self.margin_of(token)
        entry.renew_when_left = window * random.uniform(0.8, 1.0)
        entry.failures, entry.last_error = 0, None
        entry.refresh_count += 1
        self._network_is_back()
        log.info("%s aud=%s: new token %s, lifetime %.0fs, renewal when %.0fs left",
                 entry.source.key, entry.audience, fingerprint(token.value), token.lifetime, entry.renew_when_left)
        return token

    def margin_of(self, token: IdToken) -> float:
        """The mandatory margin, from the token's *full* lifetime: a token handed back from an
        upstream's cache with seconds left is not fresh, however recently it arrived."""
        return renewal_window(token.issued_lifetime, self.settings)[1]

    async def _fetch_servable(self, entry: Entry) -> IdToken:
        """A token that keeps the margin promise. An upstream that hands back a cached token
        near its end (the metadata server does) is asked again, a bounded number of times."""
        for _ in range(FRESH_ATTEMPTS):
            token = await entry.source.fetch(entry.audience)
            if token.remaining(self.clock) > self.margin_of(token):
                return token
        raise UpstreamUnavailable(f"the token endpoint keeps returning tokens with less than "
                                  f"{self.margin_of(token):.0f}s left; try again shortly")

    def _failed(self, entry: Entry, exc: IapdError) -> NoReturn:
        """Record a failed refresh (backoff by its kind) and raise it."""
        entry.failures += 1
        delay = self._retry_delay(entry, exc)
        entry.retry_at = self.clock.mono() + delay
        entry.last_error = exc
        left = entry.token.remaining(self.clock) if entry.token else 0
        log.warning("%s aud=%s: refresh failed (%s: %s), retry in %s; current token has %.0fs left",
                    entry.source.key, entry.audience, exc.code, exc.message,
                    "never (fix the profile)" if delay == float("inf") else f"≤{delay:.0f}s", max(left, 0))
        raise exc from None

    def _network_is_back(self) -> None:
        """A refresh just worked: entries backing off from transient failures try again now
        rather than at the end of a backoff grown during the outage (or the suspend)."""
        for other in self.entries.values():
            if isinstance(other.last_error, UpstreamUnavailable) and other.retry_at > self.clock.mono():
                other.retry_at = 0.0
                other.failures = 0
        self._wake.set()

    def _idle(self, entry: Entry) -> bool:
        return self.clock.mono() - entry.last_request_mono > self.settings.idle_seconds

    def next_renewal_in(self, entry: Entry) -> float | None:
        if entry.token is None or entry.login_required or self._idle(entry):
            return None
        due_in = entry.token.remaining(self.clock) - entry.renew_when_left
        if entry.last_error is not None:
            due_in = max(due_in, entry.retry_at - self.clock.mono())
        return max(due_in, 0.0)

    async def run(self) -> None:
        """The supervisor: start every renewal that is due; sleep until the next one (≤ tick)."""
        while True:
            self.passes += 1
            sleep = self.settings.tick_seconds
            for entry in list(self.entries.values()):
                if entry.task is not None:
                    continue
                due_in = self.next_renewal_in(entry)
                if due_in is None:
                    continue
                if due_in <= 0:
                    self._start(entry)
                else:
                    sleep = min(sleep, due_in)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(sleep, 0.05))
            except asyncio.TimeoutError:
                if self.on_tick is not None:
                    self.on_tick()

    def start(self) -> None:
        self._supervisor = asyncio.create_task(self.run(), name="iapd-renewal")
        self._supervisor.add_done_callback(self._supervisor_ended)

    def _supervisor_ended(self, task: asyncio.Task) -> None:
        """Renewal ahead of time must not stop silently: a supervisor that died (a bug) is
        logged and started again. Cancelled is a shutdown."""
        if task.cancelled():
            return
        exc = task.exception()
        log.error("the renewal supervisor stopped (%s); starting it again",
                  without_message(exc) if exc is not None else "it returned")
        self.start()

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """No refresh starts from now on. Those under way are cancelled here; a rotation that
        reached the issuer still finishes inside its login (see iapd.logins)."""
        self.stopped = True
        tasks = [t for t in [self._supervisor, *(e.task for e in self.entries.values())] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- login and logout -------------------------------------------------------------------

    def drop(self, source: TokenSource) -> None:
        """A source no profile uses any more (a reload removed or changed it): its entries go."""
        for key, entry in list(self.entries.items()):
            if entry.source is source:
                if entry.task is not None:
                    entry.task.cancel()
                del self.entries[key]

    def forget_source(self, source: TokenSource) -> None:
        """One source's entries start afresh (its credentials file changed): no token of the old
        identity, no error of the old file."""
        for entry in self.entries.values():
            if entry.source is source:
                if entry.task is not None:
                    entry.task.cancel()
                    entry.task = None
                entry.token, entry.last_error, entry.failures, entry.retry_at = None, None, 0, 0.0
        self._wake.set()

    def forget_login_state(self, credential_key: str) -> None:
        """The store changed under this login (another store, a keyring unlocked): a "login
        required" it caused is looked at again; tokens that are good stay."""
        for entry in self.entries.values():
            if entry.source.key == credential_key and entry.login_required:
                entry.last_error, entry.failures, entry.retry_at = None, 0, 0.0
        self._wake.set()

    def forget(self, credential_key: str) -> None:
        """After a login or a logout: drop tokens and errors, so the next request starts fresh.
        Entries waiting on a `via` profile's login try again too: this may have been it."""
        for entry in self.entries.values():
            if entry.source.key == credential_key:
                if entry.task is not None:
                    entry.task.cancel()  # its waiters look again (see get)
                    entry.task = None
                entry.token, entry.last_error, entry.failures, entry.retry_at = None, None, 0, 0.0
            elif isinstance(entry.last_error, ViaLoginRequired):
                entry.last_error, entry.failures, entry.retry_at = None, 0, 0.0
        self._wake.set()
