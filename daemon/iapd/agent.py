"""The agent: profiles from the config, their token sources, the cache, logins and logouts.

The server translates HTTP to these calls and nothing else; the sources know nothing of
sockets. Data flows one way: source → cache → agent → server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from iapd import __version__
from iapd.cache import TokenCache
from iapd.clock import Clock
from iapd.config import GOOGLE_REVOKE_URL, Config, ConfigError, Profile, ProxySettings, config_stamp, load_config
from iapd.errors import BadRequest, LoginRequired, UnknownProfile, without_message
from iapd.google_http import revoke
from iapd.login import LoginManager
from iapd.logins import Logins, is_legacy_google_key, oidc_login_key, user_login_key
from iapd.google_creds import GoogleAuth
from iapd.sources.base import IdToken, SourceContext, TokenSource
from iapd.sources.service_account import ADCCredential, build_service_account_source
from iapd.sources.signed_jwt import SignedJwtSource, build_signed_jwt_source
from iapd.proxy import PROXY_IDLE_SECONDS, LocalProxy, Proxies
from iapd.sources.oidc import OidcCredential
from iapd.sources.user import UserCredential
from iapd.store import CredentialStore

log = logging.getLogger("iapd.agent")
ADHOC_NAME = re.compile(r"adhoc-[0-9a-f]{16}")


class Agent:
    def __init__(self, config: Config, config_path: str, store: CredentialStore, session: aiohttp.ClientSession,
                 clock: Clock, socket_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.store = store
        self.session = session
        self.clock = clock
        self.socket_path = socket_path
        self.started_mono = clock.mono()
        self.source_context = SourceContext(session, clock, config.endpoints, config.daemon.http_timeout_seconds,
                                            GoogleAuth(config.daemon.http_timeout_seconds))
        self.cache = TokenCache(config.daemon, clock)
        self.logins = LoginManager(config.daemon.login_timeout_seconds, self.cache.forget,
                                   config.daemon.header_timeout_seconds)  # the flows that make logins
        self.accounts = Logins(store)  # the logins they made: one object per login, for the daemon's life
        self.profiles: dict[str, Profile] = {}
        self.sources: dict[str, TokenSource] = {}
        self.adhoc: set[str] = set()
        for name, profile in config.profiles.items():
            self._add_profile(name, profile)
        self.service: str | None = None  # "systemd" | "launchd" when a service manager runs us
        self.config_stamp = config_stamp(config_path)
        self.config_error: str | None = None  # a reload that was refused: the old config serves
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task] = set()  # reloads under way, kept referenced
        self.cache.on_tick = self.reload_soon
        self.proxies = Proxies(self._make_proxy)
        self._proxy_session: aiohttp.ClientSession | None = None

    # -- config reload ----------------------------------------------------------------------

    def reload_soon(self, why: str | None = None) -> None:
        """From a signal or the supervisor's tick: reload now (`why` given: SIGHUP), or only if the
        file changed (the check runs in a thread). A task of its own, kept referenced."""
        if why is None and self._reload_lock.locked():
            return
        task = asyncio.create_task(self.reload(why) if why else self.reload_if_changed())
        self._reloads.add(task)
        task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task) -> None:
        self._reloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("config reload failed: %s", without_message(task.exception()))

    async def reload_if_changed(self) -> None:
        if await asyncio.to_thread(config_stamp, self.config_path) != self.config_stamp:
            await self.reload("the config file changed")
        else:
            await self._check_credential_files()

    async def _check_credential_files(self) -> None:
        """Application-default credentials are a file of gcloud's, not ours: read it again when
        it changes (`gcloud auth application-default login`), with a fresh start for its profiles."""
        for source in {s for s in self.sources.values() if isinstance(s, (ADCCredential, SignedJwtSource))}:
            if await source.changed():
                log.info("%s: the credentials file changed; reading it again", source.key)
                self.cache.forget_source(source)

    async def reload(self, why: str) -> dict[str, Any]:
        """Re-read the config. Profiles that did not change keep their sources, tokens and logins;
        a config that does not parse is refused — the old one keeps serving, the error shows in
        status and the log. [daemon] socket and state_dir take effect at the next start."""
        async with self._reload_lock:
            stamp = await asyncio.to_thread(config_stamp, self.config_path)
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                self.config_stamp = stamp  # said once, until the file changes again
                self.config_error = str(exc)
                log.error("reload refused (%s), the previous config keeps serving: %s", why, exc)
                return {"reloaded": False, "error": self.config_error}
            self.config_stamp, self.config_error = stamp, None
            self._apply(new)
            if new.daemon.store != self.store.kind or self.store.error:
                # A switch moves the logins across; a keyring that was locked is tried again.
                await self.store.use(new.daemon.store)
                for key in self.store.keys():
                    self.cache.forget_login_state(key)
            await self.sync_proxies()
            await self._check_credential_files()
            log.info("reloaded the config (%s): %d profiles", why, len(new.profiles))
            return {"reloaded": True, "profiles": sorted(new.profiles)}

    def _apply(self, new: Config) -> None:
        old = self.config
        self.config = new
        if new.endpoints != old.endpoints or new.daemon.http_timeout_seconds != old.daemon.http_timeout_seconds:
            # Every source talks to other endpoints now: none is kept.
            self.source_context = SourceContext(self.session, self.clock, new.endpoints,
                                                new.daemon.http_timeout_seconds,
                                                GoogleAuth(new.daemon.http_timeout_seconds))
            kept: dict[str, Profile] = {}
        else:
            # A profile whose proxy alone changed keeps its source (the proxy is only served here).
            kept = {name: p for name, p in self.profiles.items() if name in new.profiles
                    and new.profiles[name].model_copy(update={"proxy": None}) == p.model_copy(update={"proxy": None})}
        # Every other profile gets a source built from its new settings (and so a fresh cache
        # entry, without the old one's error and backoff); its login, if the same, is kept.
        self.cache.settings = new.daemon
        self.logins.timeout = new.daemon.login_timeout_seconds
        self.logins.header_timeout = new.daemon.header_timeout_seconds
        adhoc = {name: self.profiles[name] for name in self.adhoc if name in self.profiles}
        previous_sources = self.sources
        self.profiles, self.sources = {}, {}
        for name, profile in new.profiles.items():
            if name in kept:
                self.profiles[name], self.sources[name] = profile, previous_sources[name]
        for name, profile in {**new.profiles, **adhoc}.items():
            if name not in self.profiles:
                self._add_profile(name, profile)
        for source in set(previous_sources.values()) - set(self.sources.values()):
            self.cache.drop(source)  # nobody uses that source any more

    def _add_profile(self, name: str, profile: Profile) -> None:
        """One source object per set of source settings: profiles that differ only in name or
        audience share it (and so its cache entries). Profiles whose settings differ get sources
        of their own, which share the *login* when they name the same one (iapd.logins)."""
        settings = _source_settings(profile)
        shared = next((self.sources[n] for n, p in self.profiles.items() if _source_settings(p) == settings), None)
        self.profiles[name] = profile
        self.sources[name] = shared or self._source_for(name, profile)

    @staticmethod
    def cache_audience(profile: Profile) -> str | None:
        """The second half of a cache entry's key (the first is the credential): the audience for
        Google; for OpenID Connect, everything that makes its token different — profiles of one
        login may ask for other scopes, another audience, the other token, through another proxy."""
        if profile.oidc is None:
            return profile.jwt_audience or profile.audience
        o = profile.oidc
        return f"{o.token}|{' '.join(o.scopes)}|{o.audience or ''}|{o.resource or ''}|{o.via or ''}"

    def add_adhoc_profile(self, definition: dict[str, Any]) -> str:
        """Register a profile given by a client (flyte-iap's flags). The client names it by its
        definition (so the same flags land on the same profile, cache entry and login, and its
        next call is a plain GET on the fast path); a name already taken by another definition is
        refused. Without a name, one is derived here."""
        definition = dict(definition)
        name = definition.pop("name", None)
        try:
            profile = Profile.model_validate(definition)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "profile"
            raise BadRequest(f"invalid ad-hoc profile: {where}: {err['msg']}") from None
        if name is None:
            canonical = json.dumps(profile.model_dump(mode="json"), sort_keys=True)
            name = "adhoc-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]
        if not isinstance(name, str) or not ADHOC_NAME.fullmatch(name):
            raise BadRequest("an ad-hoc profile's name must be adhoc- and 16 hex digits")
        if name in self.profiles and self.profiles[name] != profile:
            raise BadRequest(f"the ad-hoc profile {name} exists with another definition")
        if name not in self.profiles:
            self._add_profile(name, profile)
            self.adhoc.add(name)
            log.info("registered ad-hoc profile %s", name)
        return name

    def _source_for(self, name: str, profile: Profile) -> TokenSource:
        endpoints = self.source_context.endpoints
        if profile.user is not None:
            login = self.accounts.get(user_login_key(profile.user.client_id, endpoints.token_url), endpoints.token_url)
            return UserCredential(profile.user, login, self.source_context)
        if profile.oidc is not None:
            o = profile.oidc
            via = o.via
            proxy_token = (lambda: self.token(via)) if via else None
            login = self.accounts.get(oidc_login_key(o.issuer, o.client_id, o.token_endpoint), o.token_endpoint)
            return OidcCredential(name, o, login, self.source_context, proxy_token)
        assert profile.service_account is not None
        if profile.jwt_audience is not None:
            return build_signed_jwt_source(name, profile.service_account, self.source_context)
        return build_service_account_source(name, profile.service_account, self.source_context)

    def profile(self, name: str) -> tuple[Profile, TokenSource]:
        profile = self.profiles.get(name)
        if profile is None:
            if self.config_stamp is None:
                raise UnknownProfile(f"no profile named {name!r}: the config file {self.config_path} does not exist "
                                     "(see `iapctl --help` and the README's Configuration)")
            known = ", ".join(sorted(self.config.profiles)) or "none"
            broken = f"; the file has an error: {self.config_error}" if self.config_error else ""
            raise UnknownProfile(f"no profile named {name!r} in {self.config_path} (profiles: {known}){broken}")
        return profile, self.sources[name]

    def login_credential(self, name: str) -> UserCredential | OidcCredential:
        _, source = self.profile(name)
        if isinstance(source, OidcCredential) and source.config.grant == "client_credentials":
            raise BadRequest(f"profile {name!r} uses client credentials; there is nothing to log in to")
        if not isinstance(source, (UserCredential, OidcCredential)):
            raise BadRequest(f"profile {name!r} uses a service account; there is nothing to log in to")
        return source

    def cached_token(self, name: str) -> str | None:
        """A token servable right now without waiting, or None (then ask `token`)."""
        profile = self.profiles.get(name)
        if profile is None:
            return None
        token = self.cache.peek(self.sources[name], self.cache_audience(profile))
        return token.value if token is not None else None

    async def replace_token(self, name: str, rejected: IdToken) -> IdToken:
        profile, source = self.profile(name)
        return await self.cache.replace(source, self.cache_audience(profile), rejected)

    # -- proxies ----------------------------------------------------------------------------

    def _proxy_settings(self) -> dict[str, ProxySettings]:
        """Each profile's proxy, its header resolved: Proxy-Authorization for IAP (the app keeps
        its own Authorization), Authorization for an OpenID Connect gateway."""
        return {name: p.proxy.model_copy(update={"header": p.proxy.header or (
                    "authorization" if p.oidc is not None else "proxy-authorization")})
                for name, p in self.profiles.items() if p.proxy is not None}

    def _make_proxy(self, name: str, settings: ProxySettings) -> LocalProxy:
        if self._proxy_session is None:
            # Its own session: no total timeout (a download may take an hour), bytes as they come
            # (no decompression). Not trust_env: aiohttp then reads the environment and ~/.netrc
            # on every request (measured: 2.5× the proxy's cost at 64 clients); the network
            # proxy is looked up once per listener instead (LocalProxy.network_proxy).
            self._proxy_session = aiohttp.ClientSession(
                auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.daemon.http_timeout_seconds,
                                              sock_read=PROXY_IDLE_SECONDS))
        header = "Authorization" if settings.header == "authorization" else "Proxy-Authorization"
        return LocalProxy(name, settings, header, lambda: self.token_info(name),
                          lambda rejected: self.replace_token(name, rejected), self._proxy_session, self.clock.mono,
                          self.config.daemon.header_timeout_seconds)

    async def sync_proxies(self) -> None:
        await self.proxies.sync(self._proxy_settings())

    async def close_proxies(self) -> None:
        await self.proxies.close()
        if self._proxy_session is not None:
            await self._proxy_session.close()

    async def token(self, name: str) -> str:
        return (await self.token_info(name)).value

    async def token_info(self, name: str) -> IdToken:
        if name not in self.profiles:
            await self.reload_if_changed()  # a profile just added to the file is served at once
        profile, source = self.profile(name)
        try:
            return await self.cache.get(source, self.cache_audience(profile))
        except LoginRequired as exc:
            # The client needs the profile (ad-hoc ones have generated names) and whether it may
            # start a login by itself.
            # A `via` profile's login names that profile: that is the one to log in.
            raise exc.with_extra(profile=exc.extra.get("profile") or name,
                                 auto_login=self.config.client.auto_login) from None

    # -- login / logout ---------------------------------------------------------------------

    async def login(self, name: str, device: bool = False) -> dict[str, Any]:
        credential = self.login_credential(name)
        device = device or (isinstance(credential, OidcCredential) and credential.config.grant == "device_code")
        flow, joined = await self.logins.start(credential, device)
        return {"profile": name, "joined": joined, **flow.public()}

    async def login_status(self, name: str, wait: float) -> dict[str, Any]:
        credential = self.login_credential(name)
        return {"profile": name, **await self.logins.wait(credential.key, wait)}

    def login_cancel(self, name: str) -> dict[str, Any]:
        credential = self.login_credential(name)
        return {"profile": name, **self.logins.cancel(credential.key)}

    async def login_complete(self, name: str, redirect_url: str) -> dict[str, Any]:
        return {"profile": name, **await self.logins.complete(self.login_credential(name), redirect_url)}

    async def logout(self, name: str | None) -> dict[str, Any]:
        """One profile (and every profile sharing its login), or everything."""
        if name is not None:
            self.profile(name)
            targets = {self.sources[name].key: self.sources[name]}
        else:
            targets = {source.key: source for source in self.sources.values()}
        results = []
        for key, source in targets.items():
            # First: nothing of this login is served from now on. A refresh already at the
            # issuer finishes inside the login (before the logout takes its lock); its waiters
            # look again and find no login.
            self.cache.forget(key)
            if isinstance(source, (UserCredential, OidcCredential)):
                result = await source.logout()
            else:
                result = {"credential": key, "email": source.identity(), "revoked": False, "wiped": False}
            result["profiles"] = sorted(n for n, s in self.sources.items() if s.key == key)
            self.cache.forget(key)
            results.append(result)
        if name is None:
            # Logins of profiles since removed from the config are wiped too.
            for key in self.store.keys():
                if key not in targets:
                    await self.store.delete(key)
                    results.append({"credential": key, "profiles": [], "revoked": False, "wiped": True})
            results.extend([await self._logout_unreadable(path) for path in list(self.store.unreadable)])
        return {"results": results}

    async def _logout_unreadable(self, path: Path) -> dict[str, Any]:
        """A store moved aside as unreadable may still hold live refresh tokens: revoke them,
        then remove the file."""
        try:
            tokens = await asyncio.to_thread(self.store.refresh_tokens_in, path)
        except OSError:
            tokens = []
        # Each at the issuer it came from, never one that did not mint it (a Google login of
        # before binding, whose record names no endpoint, is Google's).
        errors = []
        for key, token, url in tokens:
            url = url or (GOOGLE_REVOKE_URL if is_legacy_google_key(key) else None)
            error = await revoke(self.session, url, token) if url else "its issuer is not known"
            if error:
                errors.append(error)
        await asyncio.to_thread(path.unlink, True)
        self.store.unreadable.remove(path)
        result: dict[str, Any] = {"credential": f"unreadable store {path.name}", "profiles": [],
                                  "revoked": bool(tokens) and not errors, "wiped": True}
        if errors:
            result["revoke_error"] = errors[0]
        return result

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "daemon": {
                "version": __version__, "pid": os.getpid(), "uptime": round(self.clock.mono() - self.started_mono),
                "socket": self.socket_path, "config": self.config_path, "store": str(self.store.path),
                "unreadable_stores": [str(p) for p in self.store.unreadable],
                "store_kind": self.store.kind, "store_error": self.store.error,
                "supervisor_passes": self.cache.passes,
                "config_error": self.config_error, "service": self.service,
            },
            "profiles": [self._profile_status(name) for name in sorted(self.profiles)],
        }

    def _profile_status(self, name: str) -> dict[str, Any]:
        profile, source = self.profile(name)
        entry = self.cache.entries.get((source, self.cache_audience(profile)))
        logs_in = isinstance(source, (UserCredential, OidcCredential))
        login = self.logins.result(source.key) if logs_in else {"state": "none"}
        out: dict[str, Any] = {
            "name": name, "adhoc": name in self.adhoc, "kind": source.kind, "credential": source.key, "identity": source.identity(),
            "audience": profile.oidc.audience if profile.oidc else (profile.jwt_audience or profile.audience),
            "mode": "oidc" if profile.oidc else "signed_jwt" if profile.jwt_audience else (
                "audience" if profile.audience else "allowlist"),
            "expires_in": None, "next_renewal_in": None, "refresh_count": 0, "waited_requests": 0,
            "last_refresh": None, "last_error": None, "login": login["state"], "proxy": self.proxies.status(name),
        }
        token = entry.token if entry else None
        remaining = token.remaining(self.clock) if token else None
        if logs_in and not source.logged_in():
            out["state"] = "login_required"
        elif entry is not None and entry.login_required:
            out["state"] = "login_required"
        elif remaining is not None and remaining > entry.margin:
            out["state"] = "ready"
        elif entry is not None and entry.last_error is not None:
            # config_error: never retried until the profile changes; refused: retried hourly.
            out["state"] = {"bad_config": "config_error", "upstream_error": "refused"}.get(entry.last_error.code, "error")
        else:
            out["state"] = "idle"  # nothing fetched yet: the first request will
        if entry is not None:
            if token is not None:
                out["identity"] = out["identity"] or token.email
                out["expires_in"] = round(max(remaining or 0, 0))
            renewal = self.cache.next_renewal_in(entry)
            out["next_renewal_in"] = None if renewal is None else round(renewal)
            out["refresh_count"] = entry.refresh_count
            out["waited_requests"] = entry.waited
            out["last_refresh"] = {"ok": entry.last_error is None, "at": _iso(entry.last_attempt_wall)} \
                if entry.last_attempt_wall else None
            if entry.last_error is not None:
                out["last_error"] = {"code": entry.last_error.code, "message": entry.last_error.message}
        if out["state"] == "login_required" and out["last_error"] is None and logs_in:
            record = self.store.get(source.key) or {}
            out["last_error"] = {"code": "login_required", "message": record.get("login_reason") or "not logged in"}
        return out


def _source_settings(profile: Profile) -> object:
    """What a profile's source is made of (its audience is the cache's business, not the source's).
    A signed JWT is another source than the same account's Google-issued ID tokens."""
    if profile.jwt_audience is not None:
        return ("signed_jwt", profile.service_account)
    return profile.user or profile.oidc or profile.service_account


def _iso(wall: float | None) -> str | None:
    if wall is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def default_state_dir(config: Config) -> Path:
    from iapctl.paths import state_dir

    return Path(config.daemon.state_dir or state_dir())
