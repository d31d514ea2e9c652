"""`iapctl doctor`: one line per thing iapctl depends on, and a fix for each that is wrong.

Not on any hot path, so it may take its time (a second for the config's validation, a network
round trip for the clock). The config is validated by the daemon's own code (`iapd.config`,
installed alongside), so doctor and daemon never disagree about it.
"""

from __future__ import annotations

import os
import sys
import time
from email.utils import parsedate_to_datetime

from iapctl import __version__, paths
from iapctl.cli import Failure, call
from iapctl.shown import shown

SKEW_LIMIT = 60.0  # seconds: beyond this, tokens look expired or not yet valid to IAP


class Report:
    def __init__(self) -> None:
        self.problems = 0

    def ok(self, what: str, detail: str) -> None:
        print(shown(f"ok       {what}: {detail}"))

    def problem(self, what: str, detail: str, fix: str) -> None:
        self.problems += 1
        print(shown(f"PROBLEM  {what}: {detail} → {fix}"))

    def note(self, what: str, detail: str) -> None:
        print(shown(f"-        {what}: {detail}"))


def _config(report: Report):
    path = paths.config_path()
    if not os.path.exists(path):
        report.problem("config", f"{path} does not exist", "write a profile there (see the README's Configuration)")
        return None
    try:
        from iapd.config import ConfigError, load_config
    except ImportError:
        report.note("config", f"{path} exists (iapd is not installed here to validate it)")
        return None
    try:
        config = load_config(path)
    except ConfigError as exc:
        report.problem("config", str(exc), "fix that key, then `iapctl reload`")
        return None
    report.ok("config", f"{path}: {len(config.profiles)} profile(s)")
    return config


def _socket(report: Report) -> str:
    path = paths.socket_path()
    folder = os.path.dirname(path)
    reason = paths.unsafe_dir(folder)
    if reason is not None:
        report.problem("socket", f"{path}: {reason}", "set IAPD_SOCKET or XDG_RUNTIME_DIR to a directory only you can write")
    elif len(os.fsencode(path)) >= 104:
        report.problem("socket", f"{path} is {len(os.fsencode(path))} bytes, too long for a unix socket",
                       "set IAPD_SOCKET (or [daemon] socket) to a shorter path")
    else:
        report.ok("socket", path)
    return path


def _daemon(report: Report, socket_path: str) -> dict | None:
    from iapctl.autostart import when_not_running

    try:
        resp = call("GET", "/v1/status", autostart=False, timeout=5)
    except Failure as exc:
        if not exc.message.startswith("iapd is not running"):  # something answers that is not ours
            report.problem("daemon", exc.message, "see the message")
            return None
        fix = when_not_running()
        if fix is None:  # a healthy set-up without a service: nothing runs until it is needed
            report.note("daemon", "not running; it starts by itself on the first `iapctl token`")
        else:
            report.problem("daemon", exc.message, fix)
        return None
    status = resp.json()
    daemon = status["daemon"]
    mine = os.path.realpath(paths.config_path())
    if os.path.realpath(daemon["config"]) != mine:
        # `iapctl token` talks to the daemon on this socket: its config, not the one this shell names.
        report.problem("daemon config", f"the daemon on this socket serves {daemon['config']}, but this shell's "
                       f"config is {paths.config_path()} ($IAPD_CONFIG): `iapctl token` gets the daemon's profiles",
                       "`iapctl restart` from this shell to serve this config, or give it its own [daemon] socket")
    if daemon["version"] != __version__:
        report.problem("daemon", f"iapd {daemon['version']} runs, iapctl is {__version__}", "`iapctl restart`")
    else:
        managed = f", run by {daemon['service']}" if daemon.get("service") else ""
        report.ok("daemon", f"iapd {daemon['version']}, pid {daemon['pid']}{managed}")
    if daemon.get("config_error"):
        report.problem("daemon config", f"the running daemon refused the edited config: {daemon['config_error']}",
                       "fix the file; it is picked up by itself (or `iapctl reload`)")
    for path in daemon.get("unreadable_stores") or []:
        report.problem("store", f"{path} was unreadable and set aside", "`iapctl logout --all` revokes and removes it")
    return status


def _service(report: Report) -> None:
    from iapctl.autostart import LAUNCHD_LABEL, SYSTEMD_SOCKET_UNIT, systemd_user_manager_reachable

    if sys.platform.startswith("linux"):
        config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        installed = os.path.exists(os.path.join(config_home, "systemd", "user", SYSTEMD_SOCKET_UNIT))
        reachable = systemd_user_manager_reachable()
        if installed and not reachable:
            report.note("service", "systemd units installed, but no user manager here: iapctl starts iapd itself")
        elif installed:
            report.ok("service", f"systemd user unit {SYSTEMD_SOCKET_UNIT} installed")
        else:
            report.note("service", "no login service (iapctl starts iapd when needed; `iapctl service install` "
                        + ("is available)" if reachable else "needs a systemd user manager, not found here)"))
    elif sys.platform == "darwin":
        plist = os.path.join(os.path.expanduser("~"), "Library", "LaunchAgents", f"{LAUNCHD_LABEL}.plist")
        report.note("service", f"launchd agent {'installed' if os.path.exists(plist) else 'not installed'}")


def _clock(report: Report, config) -> None:
    if config is None:
        return
    import urllib.error
    import urllib.request

    url = config.endpoints.token_url
    try:
        request = urllib.request.Request(url, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                date = resp.headers.get("Date")
        except urllib.error.HTTPError as exc:  # the token endpoint answers GET with 4xx: its Date is all we want
            date = exc.headers.get("Date")
    except (OSError, ValueError) as exc:
        report.problem("clock", f"cannot reach {url} ({exc})", "check the network (or HTTPS_PROXY)")
        return
    if not date:
        report.note("clock", f"{url} sent no Date header")
        return
    skew = parsedate_to_datetime(date).timestamp() - time.time()
    if abs(skew) > SKEW_LIMIT:
        report.problem("clock", f"this machine's clock is {abs(skew):.0f}s {'behind' if skew > 0 else 'ahead of'} "
                       f"{url}'s", "synchronise it (timedatectl set-ntp true; or your OS's time settings)")
    else:
        report.ok("clock", f"within {abs(skew):.0f}s of {url}")


FIXES = {
    "login_required": "`iapctl login {name}`",
    "config_error": "fix the profile in the config",
    "refused": "check the profile's audience and client ids (`iapctl status` shows Google's answer)",
    "error": "Google or the network failed; it retries by itself",
}


def _profiles(report: Report, status: dict | None) -> None:
    if status is None:
        return
    daemon = status.get("daemon") or {}
    if daemon.get("store_error"):
        report.problem("store", daemon["store_error"], "do as it says")
    elif daemon.get("store_kind") == "keyring":
        report.ok("store", "logins in the OS keyring")
    for profile in status["profiles"]:
        proxy = profile.get("proxy")
        if proxy and proxy.get("error"):
            report.problem(f"proxy {profile['name']}", proxy["error"], "fix [profiles." + profile["name"] +
                           ".proxy] (another port, or a unix socket path), then `iapctl reload`")
        elif proxy:
            report.ok(f"proxy {profile['name']}", f"{proxy['listen']} → {proxy['upstream']}")
        name, state = profile["name"], profile["state"]
        if state in ("ready", "idle"):
            who = profile.get("identity") or "(not yet fetched)"
            report.ok(f"profile {name}", f"{state}, {who}")
        else:
            message = (profile.get("last_error") or {}).get("message") or state
            report.problem(f"profile {name}", f"{state}: {message}", FIXES.get(state, "see `iapctl status`").format(name=name))


def _flytekit(report: Report) -> None:
    """`authType: iapd` needs the `flytekit.auth` entry-point group: flytekit 1.16.24 or newer.
    An older one logs "Authentication type iapd does not exist, defaulting to standard" and
    starts a browser login of its own (or hangs in CI)."""
    from importlib import metadata

    from iapctl.flytekit_plugin import MIN_FLYTEKIT

    try:
        version = metadata.version("flytekit")
    except metadata.PackageNotFoundError:
        return  # nothing to check: proxyCommand works with any flytekit
    numbers = tuple(int(part) for part in version.split(".")[:3] if part.isdigit())
    wanted = ".".join(map(str, MIN_FLYTEKIT))
    if numbers < MIN_FLYTEKIT:
        report.problem("flytekit", f"{version} is older than {wanted}: `authType: iapd` is unknown to it",
                       f"pip install 'flytekit>={wanted}', or use proxyCommand/ExternalCommand with `iapctl token`")
    else:
        report.ok("flytekit", f"{version}: `authType: iapd` works")


def run_doctor() -> int:
    report = Report()
    config = _config(report)
    socket_path = _socket(report)
    status = _daemon(report, socket_path)
    _service(report)
    _clock(report, config)
    _profiles(report, status)
    _flytekit(report)
    return _done(report)


# -- `iapctl doctor URL`: would IAP there let this profile's token in? ----------------------------

def _choose_profile(status: dict, guard, url: str, name: str | None) -> dict:
    from iapctl.cli import USAGE

    profiles = status.get("profiles") or []
    if name is not None:
        found = [p for p in profiles if p["name"] == name]
        if not found:
            raise Failure(f"no profile named {name!r} (profiles: {', '.join(p['name'] for p in profiles) or 'none'})",
                          USAGE)
        return found[0]
    from iapctl.probe import jwt_covers, without_query

    # The profiles meant for this app: IAP's client as their audience, or a signed JWT's aud covering it.
    matching = [p for p in profiles if (guard.client_id and p.get("audience") == guard.client_id)
                or (p.get("mode") == "signed_jwt" and jwt_covers(p.get("audience") or "", without_query(url)))]
    if len(matching) == 1:
        return matching[0]
    if len(profiles) == 1:
        return profiles[0]
    if matching:
        hint = f" (profiles for this app: {', '.join(p['name'] for p in matching)})"
    elif guard.client_id:
        hint = f" (none has audience {guard.client_id}: `iapctl setup URL --profile NAME` writes one)"
    else:
        hint = ""
    raise Failure(f"name the profile to check: `iapctl doctor URL --profile NAME`{hint}", USAGE)


def run_doctor_url(url: str, name: str | None) -> int:
    from iapctl import probe
    from iapctl.cli import UPSTREAM, error_of

    report = Report()
    try:
        import tomllib

        with open(paths.config_path(), "rb") as fh:
            config = tomllib.load(fh)
    except (OSError, ValueError):
        config = {}  # what is wrong with it is plain `iapctl doctor`'s business
    try:
        guard = probe.who_guards(url, probe.sign_in_url(config))
    except (OSError, ValueError) as exc:
        raise Failure(str(exc), UPSTREAM) from None
    if guard.kind in ("google_iap", "oidc"):
        report.ok("app", guard.seen)
    else:
        report.problem("app", guard.seen, "is this the app's URL, and is IAP on for it?")

    resp = call("GET", "/v1/status")
    profile = _choose_profile(resp.json() if resp.status == 200 else {}, guard, url, name)
    pname = profile["name"]
    resp = call("GET", f"/v1/token/{pname}?format=json")
    if resp.status != 200:
        error = error_of(resp)
        fix = "`iapctl login {name}`" if error.get("error") == "login_required" else "see `iapctl status`"
        report.problem(f"profile {pname}", f"no token: {error.get('message')}", fix.format(name=pname))
        return _done(report)
    token = resp.json()["token"]
    claims = probe.claims_of(token)
    kind = "a signed JWT" if probe.is_signed_jwt(claims) else f"an ID token from {claims.get('iss')}"
    report.ok(f"profile {pname}", f"{kind} for {claims.get('aud')}, as {claims.get('email') or claims.get('sub')}")
    for finding in probe.before_sending(claims, url, guard, profile):
        report.problem("token", finding.what, finding.fix)
    try:
        answer = probe.fetch(url, token)
    except (OSError, ValueError) as exc:
        report.problem("request", str(exc), "check the URL and the network")
        return _done(report)
    finding = probe.verdict(answer, claims, guard, profile)
    if finding.ok:
        report.ok("request", finding.what)
    else:
        report.problem("request", finding.what, finding.fix)
    return _done(report)


def _done(report: Report) -> int:
    print(f"\n{report.problems} problem(s)." if report.problems else "\nAll good.")
    return 1 if report.problems else 0
