"""Every promise of the README, the test that holds it, and the one-line change that must make
that test fail — run, not just listed.

A test that cannot fail is a defect. For each row below this script takes the line that keeps
the promise, replaces it (removes the check, inverts it, skips the step), runs the named tests,
and expects them to fail; then it puts the file back byte for byte. A mutation the tests survive
is a promise nobody holds, and the script says so and exits 1.

    .venv/bin/python tests/mutations.py            # all of them (~20 minutes on 2 cores)
    .venv/bin/python tests/mutations.py --check    # only that each line to change is still there, once
    .venv/bin/python tests/mutations.py --only proxy --only keyring
    .venv/bin/python tests/mutations.py --table    # the Markdown table of tests/README.md

It edits the working tree (the daemon the tests start imports it), so it refuses to touch a file
with uncommitted changes, and drops the file's cached bytecode after each edit (a mutation of the
same size in the same second would otherwise leave Python running stale bytecode).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds per mutation: a mutation that hangs a test is caught by the test's own timeouts first


@dataclass(frozen=True)
class Mutation:
    section: str  # the README section the promise is in
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    also: tuple[tuple[str, str, str], ...] = ()  # more (path, old, new): guards layered on purpose

    def edits(self) -> tuple[tuple[str, str, str], ...]:
        return ((self.path, self.old, self.new), *self.also)


def m(section: str, promise: str, path: str, old: str, new: str, *tests: str,
      also: tuple[tuple[str, str, str], ...] = ()) -> Mutation:
    return Mutation(section, promise, path, old, new, tests, also)


C, D, T = "client/iapctl/", "daemon/iapd/", "tests/"
MUTATIONS = [
    # -- the client's contract -------------------------------------------------------------------
    m("Commands", "`iapctl token`: the token and a newline on stdout, nothing else",
      C + "cli.py", 'sys.stdout.write((resp.body.decode() if fmt == "plain" else formatted(resp.json(), fmt)) + "\\n")',
      'sys.stdout.write((resp.body.decode() if fmt == "plain" else formatted(resp.json(), fmt)) + " \\n")',
      T + "test_client.py::test_token_prints_the_token_and_a_newline_only"),
    m("Commands", "on any failure stdout is empty and stderr has one line",
      C + "cli.py", 'sys.stderr.write(f"iapctl: {shown(message)}\\n")', 'sys.stdout.write(f"iapctl: {shown(message)}\\n")',
      T + "test_client.py::test_login_required_unknown_profile_and_upstream"),
    m("Commands", "one exit code per cause, the same for every command (4: login required)",
      C + "autologin.py", "({reason}): run `iapctl login {profile}`\", LOGIN_REQUIRED)", "({reason}): run `iapctl login {profile}`\", 6)",
      T + "test_first_week.py::test_one_exit_code_per_cause_whichever_command"),  # with `token` of a profile nobody logged in to
    m("Commands", "each request is bounded as a whole (`IAPCTL_TIMEOUT`), not per read",
      C + "wire.py", "            sock.settimeout(left)\n", "            sock.settimeout(None)\n",
      T + "test_client.py::test_garbage_and_hanging_servers_are_bounded"),
    m("Commands", "one daemon however many calls race to start it",
      C + "autostart.py", "        if _answers(socket_path):\n            return  # another client",
      "        if False:\n            return  # another client",
      T + "test_client.py::test_concurrent_first_calls_start_one_daemon"),
    m("Start at login", "no autostart where a systemd unit owns the socket",
      C + "autostart.py", "    if manager is not None:\n        raise Failure(", "    if False:\n        raise Failure(",
      T + "test_client.py::test_autostart_stays_away_from_an_installed_systemd_socket"),
    m("Logging in", "in CI (no terminal, no display) never a browser or a prompt: `login required`, exit 4",
      C + "autologin.py", "    if not browser and terminal is None:\n        raise manual",
      "    if False:\n        raise manual", T + "test_client.py::TestLoginWhenNeeded::test_no_browser_without_a_display_or_terminal"),
    m("Commands", "after a failed or abandoned login, none is opened for 5 minutes",
      C + "autologin.py", "    left = _cooling_down(profile)\n", "    left = 0\n",
      T + "test_client.py::TestLoginWhenNeeded::test_cooldown_after_a_failed_login"),
    m("Logging in", "a browser that cannot be opened is said at once, with the URL",
      C + "autologin.py", "                continue\n        return False", "                continue\n        return True", T + "test_login_terminal.py::test_a_browser_that_fails_with_nobody_at_a_terminal_says_so_at_once"),

    # -- configuration -----------------------------------------------------------------------
    m("Configuration", "a bad file is one line naming the key",
      D + "config.py", '    if kind == "extra_forbidden":\n        return "unknown key"',
      '    if kind == "extra_forbidden":\n        return "bad"', T + "test_config.py::test_bad_config_is_one_line_naming_the_key"),
    m("Configuration", "never serve a token with less than `margin_seconds` left",
      D + "cache.py", "        if left <= entry.margin:", "        if left <= 0:",
      T + "test_one_login.py::test_a_token_with_less_than_the_margin_left_is_never_served"),
    m("Configuration", "renewal *before* expiry: with 12–15 minutes of an hour left, no request waits",
      D + "cache.py", "    window = min(max(settings.renew_before_seconds, settings.renew_fraction * lifetime), lifetime / 2)",
      "    window = 0.0", T + "test_daemon.py::test_renewal_before_expiry_and_never_inside_margin"),
    m("Configuration", "a skewed IdP clock changes nothing: a token's life is counted from receipt",
      D + "sources/base.py", "            lifetime = min(lifetime, exp - server_date)", "            lifetime = min(lifetime, exp - wall)",
      T + "test_hardening.py::test_skewed_idp_clock_still_renews_on_time"),
    m("How faithful it is", "a token an upstream cached is served no longer than its own `exp` (by the issuer's `Date`)",
      D + "sources/base.py", "        if server_date is not None:\n            lifetime", "        if False:\n            lifetime",
      T + "test_faithful.py::test_a_cached_metadata_token_is_served_no_longer_than_its_exp"),
    m("Configuration", "transient failures: the valid token keeps being served through the backoff",
      D + "cache.py", "        # Even when login is required now, a still-valid token is still good at IAP: serve it.\n",
      "        if entry.last_error is not None:\n            return None\n",
      T + "test_daemon.py::test_transient_failures_keep_serving_the_valid_token"),
    m("Configuration", "a permanent refusal is retried only `refused_retry_seconds` later",
      D + "cache.py", "            return self.settings.refused_retry_seconds * random.uniform(0.9, 1.0)",
      "            return 0.0", T + "test_faithful.py::test_error_kinds_are_told_apart_and_retried_as_they_deserve"),
    m("Configuration", "renewals after a suspend run a few at a time — more than one, at most `max_concurrent_refreshes`",
      D + "cache.py", "asyncio.Semaphore(settings.max_concurrent_refreshes)", "asyncio.Semaphore(1)",
      T + "test_faithful.py::test_after_a_suspend_renewals_run_a_few_at_a_time"),
    m("Configuration", "an idle audience is not renewed ahead of time (three supervisor passes awaited, not a sleep)",
      D + "cache.py", "        if entry.token is None or entry.login_required or self._idle(entry):",
      "        if entry.token is None or entry.login_required:",
      T + "test_hardening.py::test_an_idle_audience_stops_being_renewed_ahead_of_time"),
    m("Configuration", "a profile that did not change keeps its token and login across a reload",
      D + "agent.py", "            kept = {name: p for name, p in self.profiles.items() if name in new.profiles",
      "            kept = {name: p for name, p in self.profiles.items() if False and name in new.profiles",
      T + "test_day_to_day.py::test_a_broken_edit_keeps_the_old_config_serving_and_unchanged_profiles_keep_their_tokens"),
    m("What a login is", "one refresh at a time per login, whichever profile asked",
      D + "logins.py", "-> dict[str, Any]:\n        async with self._lock:", "-> dict[str, Any]:\n        async with asyncio.Lock():",
      T + "test_one_login.py::test_two_profiles_on_one_rotating_login_asked_at_once_keep_it"),
    m("What a login is", "a rotated refresh token is stored only if the store still holds the one presented",
      D + "store.py", '            if (self._records.get(key) or {}).get("refresh_token") != expected:',
      '            if False:', T + "test_one_login.py::test_a_login_during_a_renewal_wins",
      # …and a login waits for the refresh under way: two guards, so both go.
      also=((D + "logins.py", "        async with self._lock:\n            previous = self.refresh_token()",
             "        async with asyncio.Lock():\n            previous = self.refresh_token()"),)),
    m("What a login is", "a rotated token whose write failed stays live in memory and is written again",
      D + "logins.py", "            self._pending = new\n", "            pass\n",
      T + "test_one_login.py::test_a_failed_write_of_a_rotated_token_loses_nothing"),
    m("What a login is", "a stop lets a refresh already at the issuer finish and be stored",
      D + "logins.py", "                swapped = await self.store.swap(self.key, presented, refresh_token=new, **fields)",
      "                swapped = True", T + "test_one_login.py::test_a_stop_during_a_rotation_lets_it_finish_and_be_stored"),
    m("What a login is", "a rotated Google refresh token is stored: a kill -9 right after the rotation loses nothing",
      D + "logins.py", "                swapped = await self.store.swap(self.key, presented, refresh_token=new, **fields)",
      "                swapped = True", T + "test_hardening.py::test_a_rotated_refresh_token_is_on_disk_once_the_renewal_is_done"),
    m("What a login is", "a stored login goes only to the token endpoint it was minted at",
      D + "logins.py", "        if bound is not None and bound != endpoint:", "        if False:",
      T + "test_one_login.py::test_a_config_that_names_another_token_endpoint_never_gets_the_stored_login",
      # …and the endpoint is part of the login's name: two guards, so both go.
      also=((D + "logins.py", '    return f"user:{client_id}" if token_url == GOOGLE_TOKEN_URL else f"user:{client_id}@{token_url}"',
             '    return f"user:{client_id}"'),)),
    m("What a login is", "the Secret Manager secret is read at login and kept with the refresh token",
      D + "sources/user.py", '        if not reread and record.get("client_secret") and record.get("client_secret_name") == name:',
      "        if False:", T + "test_daemon.py::test_restarted_daemon_serves_without_new_login_and_reads_secret_once"),
    m("Configuration", "an ADC file is read again when it changes",
      D + "sources/service_account.py", "    async def changed(self) -> bool:\n",
      "    async def changed(self) -> bool:\n        return False\n",
      T + "test_one_login.py::test_application_default_credentials_are_read_again_when_the_file_changes"),
    m("Changing the config", "a profile asked for that iapd does not know: the file is read again at once",
      D + "agent.py", "            await self.reload_if_changed()  # a profile just added to the file is served at once",
      "            pass",
      T + "test_day_to_day.py::test_a_profile_added_while_the_daemon_runs_is_served_at_once"),

    # -- OpenID Connect ---------------------------------------------------------------------
    m("Any OpenID Connect issuer", "discovery's `issuer` must be the one configured",
      D + "sources/oidc.py", '        if not isinstance(named, str) or named.rstrip("/") != issuer:', "        if False:",
      T + "test_trust.py::test_a_discovery_document_of_another_issuer_is_refused"),
    m("Any OpenID Connect issuer", "endpoints a discovery document names must be https (or loopback)",
      D + "sources/oidc.py", "        if not secure_url(url):", "        if False:",
      T + "test_trust.py::test_a_discovery_document_that_names_a_plain_http_endpoint_elsewhere_is_refused"),
    m("Any OpenID Connect issuer", "an ID token's `iss` is checked before it is served",
      D + "sources/oidc.py", "        if str(claims.get(\"iss\", \"\")).rstrip(\"/\") != self.config.issuer.rstrip(\"/\"):",
      "        if False:", T + "test_trust.py::test_an_id_token_of_another_issuer_or_client_is_not_served"),
    m("Any OpenID Connect issuer", "… and its `aud`",
      D + "sources/oidc.py", "        if self.config.client_id not in audiences:", "        if False:",
      T + "test_trust.py::test_an_id_token_of_another_issuer_or_client_is_not_served"),
    m("Any OpenID Connect issuer", "a `via` token goes only to its issuer's origin",
      D + "sources/oidc.py", "        if self.proxy_token is None or _origin(url) != _origin(self.config.issuer):",
      "        if self.proxy_token is None:", T + "test_trust.py::test_a_via_token_goes_only_to_the_issuers_origin"),
    m("Any OpenID Connect issuer", "the device grant's `interval` is clamped to 1–60 s",
      D + "sources/oidc.py", "        return 5.0", "        return 0.0",
      T + "test_trust.py::test_a_device_interval_that_is_not_a_small_positive_number_is_clamped"),
    m("Any OpenID Connect issuer", "an opaque access token's lifetime comes from `expires_in`",
      D + "sources/oidc.py", "        if not isinstance(expires_in, (int, float)) or expires_in <= 0:", "        if False:",
      T + "test_trust.py::test_impossible_numbers_from_an_issuer_are_refused_and_status_still_answers"),
    m("Any OpenID Connect issuer", "a plain-http issuer elsewhere than this machine is a config error",
      D + "config.py", "        if url is not None and not secure_url(url):", "        if False:",
      T + "test_trust.py::test_a_non_loopback_http_issuer_is_a_config_error"),

    # -- what iapd trusts --------------------------------------------------------------------
    m("What iapd trusts", "no redirect is followed by a request that carries a secret",
      D + "google_http.py", "allow_redirects=False", "allow_redirects=True",
      T + "test_trust.py::test_a_redirect_is_never_followed_with_credentials"),
    m("What iapd trusts", "an answer is at most 4 MiB",
      D + "google_http.py", "        if size > MAX_ANSWER_BYTES:", "        if False:",
      T + "test_trust.py::test_an_oversized_answer_is_refused[read-to-the-end]"),
    m("What iapd trusts", "… refused by its Content-Length before it is read",
      D + "google_http.py", "    if declared is not None and declared > MAX_ANSWER_BYTES:", "    if False:",
      T + "test_trust.py::test_an_oversized_answer_is_refused[content-length]"),
    m("What iapd trusts", "a token must be printable ASCII",
      D + "sources/base.py", '    if not value or not all("!" <= c <= "~" for c in value):', "    if not value:",
      T + "test_trust.py::test_a_token_with_a_line_break_is_refused"),
    m("What iapd trusts", "`exp`, `iat` and `expires_in` must be finite and sane",
      D + "sources/base.py", "        if not (math.isfinite(exp) and math.isfinite(iat)) or exp - iat > MAX_LIFETIME:",
      "        if False:", T + "test_trust.py::test_impossible_numbers_from_an_issuer_are_refused_and_status_still_answers"),
    m("What iapd trusts", "the config is refused unless it is yours and nobody else can write it or a directory above it",
      D + "config.py", "    if unsafe is not None:\n        raise ConfigError(", "    if False:\n        raise ConfigError(",
      T + "test_trust.py::test_a_config_in_a_directory_another_user_made_is_refused"),
    m("What iapd trusts", "`[daemon] environment` takes only network and credential settings",
      D + "config.py", "        if name not in DAEMON_ENVIRONMENT:", "        if False:",
      T + "test_trust.py::test_the_daemons_environment_takes_only_network_and_credential_settings"),
    m("What iapd trusts", "autostart passes its caller's environment by name, not whole",
      C + "autostart.py", "env=_daemon_env(socket_path, notify_path)", "env={**os.environ, **_daemon_env(socket_path, notify_path)}",
      T + "test_trust.py::test_autostart_gives_the_daemon_only_what_it_needs"),
    m("What iapd trusts", "one daemon per store: a second refuses to start and names the first",
      D + "store.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
      T + "test_trust.py::test_a_second_daemon_on_one_store_refuses_to_start"),
    m("What iapd trusts", "a request target with a line break never reaches the socket",
      C + "wire.py", '    if not all("!" <= c <= "~" for c in target):', "    if False:",
      T + "test_trust.py::test_a_request_target_with_a_line_break_never_reaches_the_socket"),

    # -- security model ----------------------------------------------------------------------
    m("Security model", "only your uid talks to the agent, whatever the socket's mode",
      D + "guard.py", "        if uid != os.getuid():", "        if False:",
      T + "test_daemon.py::test_another_uid_is_refused_even_on_a_0666_socket"),
    m("Security model", "the client talks only to a socket served by your uid",
      C + "wire.py", "        if uid != posix.getuid():", "        if False:",
      T + "test_local_users.py::test_the_client_refuses_a_socket_served_by_another_uid"),
    m("Security model", "… in a directory only you can write",
      C + "paths.py", "    if info.st_mode & 0o022:", "    if False:",
      T + "test_local_users.py::test_the_client_refuses_a_socket_in_a_directory_others_can_write"),
    m("Security model", "no imports from the caller's working directory (autostart runs `python -P`)",
      C + "autostart.py", '[sys.executable, "-P", "-m", "iapd", "serve"]', '[sys.executable, "-m", "iapd", "serve"]',
      T + "test_local_users.py::test_autostart_never_imports_from_the_working_directory"),
    m("Security model", "… nor for the Secret Manager reader",
      D + "secret_manager.py", 'sys.executable, "-P", "-m", "iapd.secret_manager"', 'sys.executable, "-m", "iapd.secret_manager"',
      T + "test_local_users.py::test_the_secret_manager_child_never_imports_from_the_working_directory"),
    m("Security model", "the login listener's one-time start URL works once",
      D + "login.py", "        if flow.browser_started or flow.done.done():", "        if flow.done.done():",
      T + "test_local_users.py::test_the_login_start_url_works_once"),
    m("Security model", "stray requests to the login listener get an error page and do not end the login",
      D + "login.py", '        if params.get("state") != flow.state or flow.done.done() or flow.finishing:',
      "        if flow.done.done() or flow.finishing:", T + "test_daemon.py::test_stray_requests_do_not_break_the_login"),
    m("Security model", "the listener caps its connections; an idle one gives way to a new one",
      D + "guard.py", "        if idle is None:", "        if True:",
      T + "test_local_users.py::test_a_flood_on_the_login_listener_starves_nothing"),
    m("Security model", "the login listener drops a connection that sends no request within `header_timeout_seconds`",
      D + "login.py", "header_timeout=self.header_timeout,", "header_timeout=1000.0,",
      T + "test_local_users.py::test_the_login_listener_drops_a_connection_that_sends_nothing"),
    m("Security model", "a socket client must send its request headers within `header_timeout_seconds`",
      D + "guard.py", "        self.timer = asyncio.get_running_loop().call_later(self.gate.header_timeout, self._too_slow)",
      "        self.timer = None", T + "test_hardening.py::test_slowloris_connections_do_not_delay_a_token"),
    m("Security model", "the daemon raises its soft descriptor limit to the hard one",
      D + "daemon.py", "            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))", "            pass",
      T + "test_local_users.py::test_the_daemon_raises_its_soft_descriptor_limit"),
    m("Security model", "`account` pins the login to one account",
      D + "sources/user.py", '        if want and str(claims.get("email", "")).lower() != want.lower():', "        if False:",
      T + "test_local_users.py::test_a_login_pinned_to_an_account_refuses_another"),
    m("Security model", "`hosted_domain` refuses an account of another Workspace domain",
      D + "sources/user.py", '        if domain and claims.get("hd") != domain:', "        if False:",
      T + "test_local_users.py::test_a_login_pinned_to_a_workspace_domain_refuses_an_account_of_another"),
    m("Security model", "the store is written atomically: a crash leaves the old file or the new one",
      D + "fsutil.py", "        os.replace(tmp, path)\n", "        os.replace(tmp, path) if False else path.write_bytes(data)\n",
      T + "test_hardening.py::test_kill_9_during_store_writes_leaves_old_or_new_never_broken"),
    m("Security model", "a failed write (a full disk) leaves the old file and no temp file",
      D + "fsutil.py", "        tmp.unlink(missing_ok=True)\n", "        pass\n",
      T + "test_local_users.py::test_a_full_disk_fails_the_login_at_once_and_leaves_no_temp_file"),
    m("Security model", "a store of the wrong shape is set aside, not a crash loop",
      D + "store.py", '        raise TypeError("a record is not an object")', "        pass",
      T + "test_local_users.py::test_a_store_of_the_wrong_shape_is_set_aside_not_a_crash_loop"),
    m("Security model", "`invalid_rapt` (a reauthentication policy) means login required, not a retry",
      D + "google_http.py", '        if subtype == "invalid_rapt" or "invalid_rapt" in description:', "        if False:",
      T + "test_daemon.py::test_invalid_grant_means_login_required_with_one_call[invalid_rapt-reauthentication policy]"),
    m("Security model", "text from elsewhere is shown with its control characters escaped",
      C + "shown.py", "    if text.isprintable():\n        return text", "    if True:\n        return text",
      T + "test_trust.py::test_text_from_an_issuer_reaches_the_terminal_escaped"),
    m("Security model", "where peers cannot be told apart, only a pasted redirect completes a login",
      D + "login.py", "        if flow.paste_only:\n", "        if False:\n",
      T + "test_trust.py::test_where_peers_cannot_be_told_apart_the_browser_alone_completes_no_login"),

    # -- socket API, logout, status ----------------------------------------------------------
    m("Commands", "logout revokes, then wipes; a kill during it leaves a clear `log in`",
      D + "agent.py", '        """One profile (and every profile sharing its login), or everything."""\n',
      '        """One profile (and every profile sharing its login), or everything."""\n        return {"results": []}\n',
      T + "test_hardening.py::test_kill_9_of_the_daemon_mid_operation[logout]"),
    m("Socket API", "an ad-hoc profile's name is taken by one definition only",
      D + "agent.py", "        if name in self.profiles and self.profiles[name] != profile:", "        if False:",
      T + "test_daemon.py::test_errors_are_json_with_codes"),
    m("Socket API", "a login whose last long-poll went away is abandoned",
      D + "login.py", "            self._settle(flow, BadRequest(\"the login was abandoned: nobody was waiting for it any more\"))",
      "            pass", T + "test_login_terminal.py::test_a_killed_login_is_abandoned_by_the_daemon"),
    m("Socket API", "`wait` must be a finite number",
      D + "server.py", "        if not math.isfinite(wait):", "        if False:",
      T + "test_local_users.py::test_wait_must_be_a_finite_number"),
    m("Start at login", "a live socket is never stolen; a stale one is replaced",
      D + "server.py", '            raise SystemExit(f"iapd: another iapd is already serving on {target}")',
      "            target.unlink()",
      T + "test_daemon.py::test_live_socket_not_stolen_stale_socket_replaced"),

    # -- service accounts, signed JWTs -------------------------------------------------------
    m("CI with service accounts", "a service account profile without an audience is a clear error",
      D + "sources/service_account.py", "    if not audience:\n        raise ConfigProblem(", "    if False:\n        raise ConfigProblem(",
      T + "test_service_accounts.py::test_service_account_without_audience_is_a_clear_error"),
    m("Signed JWTs", "the emulated IAP refuses a signed JWT whose `aud` does not cover the URL",
      D + "emulator/iap.py", '    return aud == url or (aud.endswith("/*") and url.startswith(aud[:-1]))', "    return True",
      T + "test_signed_jwt.py::test_the_emulated_iap_refuses_a_signed_jwt_for_another_url_too_long_expired_or_of_a_wrong_key"),
    m("Signed JWTs", "… and one more than an hour long",
      D + "emulator/iap.py", '        if claims["exp"] - claims["iat"] > MAX_JWT_LIFETIME:', "        if False:",
      T + "test_signed_jwt.py::test_the_emulated_iap_refuses_a_signed_jwt_for_another_url_too_long_expired_or_of_a_wrong_key"),
    m("Signed JWTs", "a `jwt_audience` that cannot work is a config error",
      D + "config.py", "    if not secure_url(value):\n        raise ValueError(f\"must be https",
      "    if False:\n        raise ValueError(f\"must be https",
      T + "test_signed_jwt.py::test_the_config_refuses_a_jwt_audience_that_cannot_work"),

    # -- the proxy ---------------------------------------------------------------------------
    m("A local proxy", "a request whose `Host` is not the listener's own is refused (421)",
      D + "proxy.py", "            return _plain(421,", "            pass or _plain(421,",
      T + "test_proxy.py::test_a_foreign_host_and_a_browser_origin_are_refused"),
    m("A local proxy", "the caller's `Proxy-Authorization` is never forwarded",
      D + "proxy.py", '"upgrade", "proxy-authenticate", "proxy-authorization"})', '"upgrade", "proxy-authenticate"})',
      T + "test_proxy.py::test_hop_by_hop_headers_and_the_callers_proxy_authorization_are_not_forwarded"),
    m("A local proxy", "a request a browser marks as made by a page is refused",
      D + "proxy.py", "            return _plain(403, f\"requests a web page makes", "            pass or _plain(403, f\"requests a web page makes",
      T + "test_proxy.py::test_a_foreign_host_and_a_browser_origin_are_refused"),

    # -- the emulator, held to Google --------------------------------------------------------
    m("How faithful it is", "the emulator's `Date` follows its clock",
      D + "emulator/app.py", '    response.headers["Date"] = date\n', "",
      T + "test_faithful.py::test_the_date_header_follows_the_emulated_clock"),
    # -- the store and the keyring -----------------------------------------------------------
    m("Where logins are kept", 'with `store = "keyring"` no file holds a refresh token or client secret',
      D + "store.py", '        kept = _without_secrets(records) if self.kind == "keyring" else records', "        kept = records",
      T + "test_keyring.py::test_a_login_lives_in_the_keyring_and_survives_a_restart_without_a_file_holding_it"),
    m("Where logins are kept", "switching `store` and reloading moves the logins across",
      D + "agent.py", "                await self.store.use(new.daemon.store)", "                pass",
      T + "test_keyring.py::test_switching_stores_moves_the_logins_across_and_leaves_nothing_behind"),
    m("Where logins are kept", "a switch to a locked keyring loses nothing, and a switch back needs nothing",
      D + "store.py", "        if not self._in_keyring:  # a switch to the keyring never happened", "        if False:  # a switch to the keyring never happened",
      T + "test_keyring.py::test_a_switch_to_a_locked_keyring_is_refused_in_status_and_a_switch_back_needs_nothing"),

    # -- setup and doctor URL ----------------------------------------------------------------
    m("From an app's URL", "`setup` appends the profile: the config's text stays byte for byte",
      C + "setup.py", '    new_text = kept + ("\\n" if kept and not kept.endswith("\\n") else "") + ("\\n" if kept else "") + \\',
      '    new_text = "" + ("\\n" if kept and not kept.endswith("\\n") else "") + ("\\n" if kept else "") + \\',
      T + "test_setup.py::test_setup_from_the_iap_url_writes_a_profile_reusing_the_login_and_proves_it"),
    m("From an app's URL", "`setup --dry-run` never prints a client secret",
      C + "setup.py", "        sys.stdout.write(re.sub(r'^(client_secret = ).*$', r'\\1\"…\"  # (as given: not shown)', block, flags=re.M))",
      "        sys.stdout.write(block)", T + "test_setup.py::test_setup_dry_run_never_prints_a_client_secret"),
    m("From an app's URL", "`setup` checks that iapd reads the config it writes",
      C + "setup.py", "    if reads and os.path.realpath(reads) != os.path.realpath(path):", "    if False:",
      T + "test_setup.py::test_setup_refuses_to_write_a_config_the_daemon_does_not_read"),
    m("From an app's URL", "`doctor URL` names a signed JWT whose `aud` does not cover the URL",
      C + "probe.py", "        if not isinstance(aud, str) or not jwt_covers(aud, without_query(url)):", "        if False:",
      T + "test_setup.py::test_doctor_url_names_a_signed_jwt_whose_aud_does_not_cover_the_url"),
    m("From an app's URL", "`doctor URL` names a wrong audience, both shown",
      C + "probe.py", '    elif guard.kind == "google_iap" and guard.client_id and aud != guard.client_id and profile.get("mode") != "allowlist":',
      "    elif False:", T + "test_setup.py::test_doctor_url_names_a_wrong_audience_showing_both"),

    # -- the proxy, continued ----------------------------------------------------------------
    m("A local proxy", "a token the app refuses early is renewed once and a bodyless request retried",
      D + "proxy.py", "            if upstream.status == 401 and attempt == 1 and not has_body \\",
      "            if False and upstream.status == 401 and attempt == 1 and not has_body \\",
      T + "test_proxy.py::test_a_token_the_app_refuses_early_is_renewed_once_and_the_request_retried"),

    # -- the launcher ------------------------------------------------------------------------
    m("Measured", "the launcher starts Python without `site` in a venv, normally elsewhere",
      "client/bin/iapctl", 'if [ -f "$here/../pyvenv.cfg" ] && [ -x "$here/python" ]; then', "if false; then",
      T + "test_packaging.py::test_the_launcher_starts_without_site_where_it_can_and_normally_anywhere_else"),

    # -- the emulator's IAP for people -------------------------------------------------------
    m("The emulator", "a browser without IAP's session cookie is sent to sign in; an AJAX request gets a 401",
      D + "emulator/iap.py", '                if request.headers.get("X-Requested-With", "").lower() == "xmlhttprequest":',
      "                if True:", T + "test_iap_browser.py::test_flytes_own_login_behind_iap_completes_in_a_browser_that_keeps_cookies"),

    # -- logging in, wherever you are --------------------------------------------------------
    m("Logging in", "Ctrl-C cancels the login in the daemon; the next one starts afresh",
      C + "autologin.py", "    except KeyboardInterrupt:\n        cancel(profile)\n", "    except KeyboardInterrupt:\n        pass\n",
      T + "test_login_terminal.py::test_ctrl_c_cancels_the_login_and_the_next_one_starts_afresh"),
    m("Logging in", "two logins at once share one flow (one browser tab, one listener)",
      D + "login.py", "        if flow is not None and not flow.done.done():\n            return flow, True",
      "        if False:\n            return flow, True",
      T + "test_faithful.py::test_a_login_asked_while_one_is_pending_joins_it"),
    m("Logging in", "… and two fired at the same moment share it from the very first request",
      D + "login.py", "        if opening is not None:\n            return await asyncio.shield(opening), True",
      "        if False:\n            return await asyncio.shield(opening), True",
      T + "test_login_terminal.py::test_two_logins_at_once_share_one_flow_and_one_listener"),
    m("Logging in", "over SSH, the exact `ssh -N -L` line to forward the login's port",
      C + "autologin.py", '    if not os.environ.get("SSH_CONNECTION") or not redirect_uri:', "    if True:",
      T + "test_login_terminal.py::test_over_ssh_the_terminal_shows_the_exact_port_forward_and_a_forwarded_login_completes"),
    m("What a login is", "a new login revokes the grant it replaces",
      D + "logins.py", '        if previous and previous != record["refresh_token"]:', "        if False:",
      T + "test_faithful.py::test_a_new_login_revokes_the_refresh_token_it_replaces"),
    m("Changing the config", "a config that does not parse is refused by `iapctl reload` (exit 5); the old one serves",
      C + "commands.py", '    if not result.get("reloaded"):', "    if False:",
      T + "test_day_to_day.py::test_a_broken_edit_keeps_the_old_config_serving_and_unchanged_profiles_keep_their_tokens"),

    # -- OpenID Connect, continued ------------------------------------------------------------
    m("Any OpenID Connect issuer", "a confidential client uses `client_secret_basic` unless only `client_secret_post` is offered",
      D + "sources/oidc.py", '        if "client_secret_basic" in methods or "client_secret_post" not in methods:', "        if False:",
      T + "test_oidc.py::test_client_credentials_with_the_auth_method_discovery_offers"),
    m("Any OpenID Connect issuer", "discovery falls back to RFC 8414's `/.well-known/oauth-authorization-server`",
      D + "sources/oidc.py", 'f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path}"]',
      'f"{parts.scheme}://{parts.netloc}/.well-known/openid-configuration{parts.path}"]',
      T + "test_oidc.py::test_an_issuer_without_openid_discovery_is_found_by_rfc_8414"),
    m("Any OpenID Connect issuer", "device polling backs off through a 5xx rather than ending the login",
      D + "sources/oidc.py", "            except UpstreamUnavailable:\n                backoff = min(max(backoff * 2, interval), MAX_DEVICE_INTERVAL)\n                continue",
      "            except ZeroDivisionError:\n                backoff = min(max(backoff * 2, interval), MAX_DEVICE_INTERVAL)\n                continue",
      T + "test_one_login.py::test_the_device_grant_keeps_polling_through_a_transient_failure"),
    m("Any OpenID Connect issuer", "PKCE (S256) on every authorization request",
      D + "sources/oidc.py", '"code_challenge": challenge,', '"code_challenge_": challenge,',
      T + "test_oidc.py::test_authorization_code_with_pkce_then_rotation_with_reuse_detection"),
    m("Any OpenID Connect issuer", "the expiry given (`--format json`, exec-credential) is the token's own less `margin_seconds`",
      D + "server.py", "        left = max(served.remaining(agent.clock) - agent.cache.margin_of(served), 0.0)",
      "        left = max(served.remaining(agent.clock), 0.0)",
      T + "test_one_login.py::test_the_advertised_expiry_is_the_tokens_less_the_margin"),
    m("Any OpenID Connect issuer", "a `via` profile's token is sent to its issuer as `Proxy-Authorization`",
      D + "sources/oidc.py", "        if self.proxy_token is None or _origin(url) != _origin(self.config.issuer):",
      "        if True:", T + "test_oidc.py::test_an_issuer_behind_iap_is_reached_via_another_profiles_token"),

    # -- service accounts ---------------------------------------------------------------------
    m("CI with service accounts", "the metadata server is asked with `Metadata-Flavor: Google`",
      D + "sources/service_account.py", 'params={"audience": audience, "format": "full"}, headers={"Metadata-Flavor": "Google"})',
      'params={"audience": audience, "format": "full"}, headers={})',
      T + "test_service_accounts.py::test_each_kind_yields_a_token_iap_admits"),
    m("CI with service accounts", "`key_file`: the JWT-bearer grant with `target_audience`",
      D + "sources/service_account.py", '"target_audience": audience}', '"target_audience": "x" + audience}',
      T + "test_daemon.py::test_service_account_key_file_profile"),

    # -- commands: service, completion, status -----------------------------------------------
    m("Start at login", "`service install` changes nothing where no user manager is reachable, and says so",
      C + "service.py", "    if why is not None:\n        raise Failure(f\"{why}; nothing was installed.", "    if False:\n        raise Failure(f\"{why}; nothing was installed.",
      T + "test_day_to_day.py::test_service_install_without_a_user_manager_changes_nothing_and_says_why"),
    m("Security model", "`service install` refuses a path with a control character (a newline would add a directive)",
      C + "service.py", "    if not value.isprintable():\n        raise Failure(f\"cannot write a systemd unit", "    if False:\n        raise Failure(f\"cannot write a systemd unit",
      T + "test_service.py::test_install_refuses_a_path_that_would_add_directives"),
    m("Commands", "completion offers the config's profiles — not those of a config others could write",
      C + "completion.py", "    if paths.unsafe_file(path) is not None:", "    if False:",
      T + "test_completion.py::test_the_profiles_of_an_unsafe_config_are_not_offered"),
    m("Start at login", "socket activation: iapd takes the socket systemd passes it",
      D + "server.py", '    if os.environ.get("LISTEN_PID") != str(os.getpid()):', "    if True:",
      T + "test_service.py::test_socket_activation_starts_the_daemon_on_first_token"),

    # -- secrets stay secret -----------------------------------------------------------------
    m("Security model", "libraries that would log request bodies are kept at warning",
      D + "daemon.py", '    for name in ("aiohttp.access", "google", "urllib3", "grpc"):', '    for name in ("aiohttp.access",):',
      T + "test_hardening.py::test_no_secret_ever_logged"),
    m("Security model", "logs name a token by a short hash, never the token",
      D + "cache.py", "fingerprint(token.value), token.lifetime", "token.value, token.lifetime",
      T + "test_hardening.py::test_no_secret_ever_logged"),

    # -- the emulator, continued: where it must refuse what Google refuses --------------------
    m("How faithful it is", "the metadata server hands back its cached ID token until 5 minutes before it expires",
      D + "emulator/state.py", "        if self.metadata_cache and cached is not None:", "        if False:",
      T + "test_faithful.py::test_the_metadata_server_hands_back_its_cached_token"),
    m("How faithful it is", "ID tokens only for the `openid` scope",
      D + "emulator/oauth.py", '    if "openid" in grant.scope.split():  # Google returns an ID token only for the openid scope',
      "    if True:", T + "test_faithful.py::test_no_id_token_without_the_openid_scope"),
    m("How faithful it is", "refresh tokens only for `access_type=offline`",
      D + "emulator/oauth.py", "    if grant.offline:  # and a refresh token only for access_type=offline", "    if True:",
      T + "test_faithful.py::test_a_refresh_token_only_for_offline_access"),
    m("How faithful it is", "`audience` on a refresh must be a client of the desktop client's project",
      D + "emulator/oauth.py", "        if target is None or target.project != client.project:", "        if target is None:",
      T + "test_faithful.py::test_an_audience_of_another_project_is_refused"),
    m("How faithful it is", "a refresh grant returns no new refresh token unless rotation is on",
      D + "emulator/oauth.py", "    if state.rotate_refresh_tokens and grant.client_id != ADC_CLIENT_ID:",
      "    if grant.client_id != ADC_CLIENT_ID:",
      T + "test_faithful.py::test_refresh_grants_return_a_new_refresh_token_only_with_rotation"),
    m("How faithful it is", "revocation answers 200 with an empty body",
      D + "emulator/oauth.py", "        return web.Response(status=200)\n", "        return web.json_response({})\n",
      T + "test_faithful.py::test_revocation_answers_200_with_an_empty_body"),
    m("The emulator", "the metadata server requires `Metadata-Flavor: Google`",
      D + "emulator/gcp.py", '    if request.path.startswith("/computeMetadata/") and request.headers.get("Metadata-Flavor") != "Google":',
      "    if False:", T + "test_emulator.py::test_metadata_server_with_google_auth"),
    m("The emulator", "the code exchange checks the PKCE verifier",
      D + "emulator/oauth.py", '    if grant.challenge and not _pkce_ok(grant, form.get("code_verifier")):', "    if False:",
      T + "test_emulator.py::test_pkce_code_reuse_and_redirect_checks"),
    m("The emulator", "Secret Manager needs a bearer token",
      D + "emulator/gcp.py", "    if _caller(request) is None:\n        return google_error(*UNAUTHENTICATED)",
      "    if False:\n        return google_error(*UNAUTHENTICATED)",
      T + "test_emulator.py::test_secret_manager_client_with_endpoint_override"),

    # -- the proxy, the rest -----------------------------------------------------------------
    m("A local proxy", "no hop-by-hop header is forwarded, including those named in `Connection`",
      D + "proxy.py", "        if lower in HOP_BY_HOP or lower in named or lower in drop:", "        if lower in HOP_BY_HOP or lower in drop:",
      T + "test_proxy.py::test_hop_by_hop_headers_and_the_callers_proxy_authorization_are_not_forwarded"),
    m("A local proxy", "no token to be had: a 503 with iapd's reason (`run iapctl login P`)",
      D + "proxy.py", 'return _plain(503, f"login required for profile {who} ({exc.message}): run `iapctl login {who}`")',
      'return _plain(503, f"no token for profile {who}")',
      T + "test_proxy.py::test_no_token_is_a_503_naming_the_login_and_no_upstream_a_502"),
    m("A local proxy", "WebSocket upgrades are relayed message by message",
      D + "proxy.py", '        if request.headers.get("Upgrade", "").lower() == "websocket":', "        if False:",
      T + "test_proxy.py::test_a_websocket_goes_through_the_proxy_and_iap"),
    m("A local proxy", "the upstream through `[daemon] environment`'s network proxy (a CONNECT; the token stays inside TLS)",
      D + "proxy.py", "        self.network_proxy = network_proxy_for(self.upstream)", "        self.network_proxy = None",
      T + "test_proxy.py::test_a_tls_upstream_is_verified_and_reached_through_the_daemons_corporate_proxy"),
    m("A local proxy", "the upstream's TLS certificate is verified (against `[daemon] environment`'s SSL_CERT_FILE)",
      D + "proxy.py", 'skip_auto_headers=("User-Agent", "Accept-Encoding"),\n                    proxy=self.network_proxy)',
      'skip_auto_headers=("User-Agent", "Accept-Encoding"),\n                    proxy=self.network_proxy, ssl=False)',
      T + "test_proxy.py::test_a_tls_upstream_is_verified_and_reached_through_the_daemons_corporate_proxy"),
    m("A local proxy", "where the kernel cannot say who connects, a TCP proxy does not start",
      D + "proxy.py", "        if not can_check_loopback_peers():", "        if False:",
      T + "test_proxy.py::test_where_peers_cannot_be_told_apart_a_tcp_proxy_does_not_start"),

    # -- the client's distribution, doctor, the state directory ------------------------------
    m("Install and first use", "the `iapctl` distribution is the standard library only: no dependencies",
      "client/pyproject.toml", "dependencies = []", 'dependencies = ["requests"]',
      T + "test_packaging.py::test_the_client_wheel_alone_has_no_dependencies_and_works"),
    m("Any OpenID Connect issuer", "`iapctl doctor` names a flytekit older than 1.16.24 (no `authType: iapd`)",
      C + "doctor.py", "    if numbers < MIN_FLYTEKIT:", "    if False:",
      T + "test_flytekit_plugin.py::test_doctor_names_a_flytekit_too_old_for_authtype_iapd"),
    m("Security model", "iapctl waits for the autostart lock no longer than its own timeout",
      C + "autostart.py", "            if time.monotonic() >= deadline:\n                raise Failure(", "            if False:\n                raise Failure(",
      T + "test_client.py::test_autostart_waits_for_its_lock_no_longer_than_the_clients_timeout"),
    m("Security model", "the state directory is refused if it is a symlink",
      C + "paths.py", "    if os.path.islink(path):", "    if False:",
      T + "test_hardening.py::test_world_writable_socket_dir_and_symlinked_state_dir_are_refused"),

    # -- the Python API ----------------------------------------------------------------------
    m("Any OpenID Connect issuer", "the Python API's errors are `iapctl.LoginRequired` and its kin, each with `iapctl token`'s exit code",
      C + "api.py", "        raise _BY_EXIT_CODE.get(exc.code, IapdError)(exc.message, profile) from None",
      "        raise IapdError(exc.message, profile) from None",
      T + "test_python_api.py::test_errors_carry_the_cause_and_the_exit_code"),
    m("Any OpenID Connect issuer", "`iapctl.BearerAuth` puts a fresh token under the header asked for",
      C + "api.py", '        request.headers[self.header] = f"Bearer {token(self.profile)}"',
      '        request.headers["X-Token"] = f"Bearer {token(self.profile)}"',
      T + "test_python_api.py::test_bearer_auth_reaches_the_app_behind_iap"),

]


def run_tests(tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """(failed, seconds, last lines): failed means the tests ran and at least one failed."""
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return True, time.monotonic() - start, "timed out (counted as failing)"
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    # 1: tests failed. 2 (interrupted), 4 (usage), 5 (nothing collected): the row itself is wrong.
    return done.returncode == 1, time.monotonic() - start, tail[0]


def _drop_bytecode(path: Path) -> None:
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink(missing_ok=True)


def check(mutation: Mutation) -> str | None:
    for name, old, _ in mutation.edits():
        count = (ROOT / name).read_text().count(old)
        if count != 1:
            return f"the line to change is in {name} {count} times (expected once): update this row"
    return None


def mutate_and_run(mutation: Mutation) -> tuple[bool, float, str]:
    names = sorted({name for name, _, _ in mutation.edits()})
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *names], cwd=ROOT, capture_output=True, text=True)
    if dirty.stdout.strip():
        raise SystemExit(f"{' '.join(names)}: uncommitted changes; commit them first (this script edits them)")
    originals = {name: (ROOT / name).read_bytes() for name in names}
    try:
        for name, old, new in mutation.edits():
            path = ROOT / name
            path.write_bytes(path.read_bytes().replace(old.encode(), new.encode(), 1))
            _drop_bytecode(path)
        return run_tests(mutation.tests)
    finally:
        for name, original in originals.items():
            (ROOT / name).write_bytes(original)
            _drop_bytecode(ROOT / name)


def _code(text: str) -> str:
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def change(old: str, new: str, context: int = 24) -> str:
    """What the mutation changes, as `…before…` → `…after…`: the lines' common start and end cut
    to a little context, so that a one-character mutation shows."""
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    end = 0
    while end < min(len(old), len(new)) - start and old[len(old) - 1 - end] == new[len(new) - 1 - end]:
        end += 1
    lead = max(0, start - context)
    prefix = ("…" if lead else "") + old[lead:start].lstrip()
    suffix = old[len(old) - end:][:context]
    suffix = suffix.rstrip() + ("…" if end > context else "")
    before, after = old[start:len(old) - end], new[start:len(new) - end]
    return f"{_code((prefix + before + suffix).strip())} → {_code((prefix + after + suffix).strip()) if (prefix + after + suffix).strip() else '(removed)'}"


def table(rows: list[Mutation]) -> str:
    lines = ["| README section | promise | test | mutation that makes it fail |", "|---|---|---|---|"]
    for r in rows:
        tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in r.tests)
        more = f"; and {len(r.also)} more (guards layered on purpose)" if r.also else ""
        lines.append(f"| {r.section} | {r.promise} | {tests} | `{r.path.split('/', 1)[1]}`: {change(r.old, r.new)}{more} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that every line to change is there, once")
    parser.add_argument("--table", action="store_true", help="print the Markdown table for tests/README.md")
    parser.add_argument("--only", action="append", default=[], help="rows whose README section, promise, file or test contains this (repeatable)")
    args = parser.parse_args()
    # A SIGTERM (a timeout, a CI runner stopping) must still put every file back: `finally` runs
    # only for exceptions, and Python's default SIGTERM is no exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = [r for r in MUTATIONS if not args.only
            or any(s in f"{r.section} {r.promise} {r.path} {' '.join(r.tests)}" for s in args.only)]
    if args.table:
        print(table(rows))
        return 0
    stale = [(r, why) for r in rows if (why := check(r))]
    for r, why in stale:
        print(f"STALE     {r.promise}: {why}")
    if args.check or stale:
        print(f"{len(rows) - len(stale)} of {len(rows)} rows can be applied")
        return 1 if stale else 0
    survived = []
    for i, r in enumerate(rows, 1):
        failed, seconds, tail = mutate_and_run(r)
        print(f"{'caught  ' if failed else 'SURVIVED'} {i:3}/{len(rows)} {seconds:5.0f}s  {r.promise}  [{tail[:80]}]",
              flush=True)
        if not failed:
            survived.append(r)
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations make their tests fail")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
