"""Logging in from `iapctl token` when it is needed — safely.

flyte-iap users expect their first `pyflyte` call to open a browser. We do, but only where a
person can see it: a graphical display (then a browser), or a controlling terminal (then the
URL and a prompt for the redirected URL, on /dev/tty: flytekit captures stdout and flytectl
hides stderr). Never in CI, cron or a service. A login already in flight is joined, not opened
again; after an abandoned or failed login we hold off for a while instead of opening a browser
tab on every one of flytekit's retries. `IAPD_AUTO_LOGIN=0` or `[client] auto_login = false`
turns it off.
"""

from __future__ import annotations

import json
import os
import sys
import time

from iapctl import paths
from iapctl.cli import LOGIN_REQUIRED, Failure, call, error_of

COOLDOWN_SECONDS = 300
WAIT_SLICE = 25.0  # each long-poll; the daemon's own login timeout ends the whole wait


def _enabled(error: dict) -> bool:
    env = os.environ.get("IAPD_AUTO_LOGIN")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    return bool(error.get("auto_login", True))


def has_display() -> bool:
    if sys.platform == "darwin":
        return not os.environ.get("SSH_CONNECTION")  # a Mac's own session has a screen
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def open_tty():
    """The controlling terminal, or None (no terminal: CI, cron, a service, setsid)."""
    try:
        return open("/dev/tty", "r+", buffering=1, encoding="utf-8")
    except OSError:
        return None


def open_browser(url: str) -> bool:
    """Open `url` in the user's browser (honours $BROWSER); True if a browser took it.

    The browser must never share our stdout (flytekit reads it as the token) or stderr (one
    line there is ours): both point at /dev/null while it starts, and it inherits that."""
    import webbrowser

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        return bool(webbrowser.open(url))
    except webbrowser.Error:
        return False
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _cooldown_path(profile: str) -> str:
    return os.path.join(paths.state_dir(), f"autologin-{profile}.failed")


def _cooling_down(profile: str) -> float:
    try:
        age = time.time() - os.stat(_cooldown_path(profile)).st_mtime
    except OSError:
        return 0.0
    return max(0.0, COOLDOWN_SECONDS - age)


def _mark_failed(profile: str) -> None:
    os.makedirs(paths.state_dir(), mode=0o700, exist_ok=True)
    with open(_cooldown_path(profile), "w"):
        pass


def login_when_needed(profile: str, error: dict) -> None:
    """Complete a login for `profile` or raise Failure(LOGIN_REQUIRED) saying what to do."""
    reason = error.get("message", "not logged in")
    manual = Failure(f"login required for profile {profile} ({reason}): run `iapctl login {profile}`", LOGIN_REQUIRED)
    if not _enabled(error):
        raise manual
    display, tty = has_display(), open_tty()
    if not display and tty is None:
        raise manual  # nobody would see a browser or a prompt
    left = _cooling_down(profile)
    if left:
        raise Failure(f"login required for profile {profile}; a login was abandoned or failed recently, so "
                      f"none is opened for {left:.0f}s more: run `iapctl login {profile}`", LOGIN_REQUIRED)
    say = (lambda text: print(text, file=tty, flush=True)) if tty else (lambda text: print(text, file=sys.stderr))
    try:
        started = _json(call("POST", f"/v1/login/{profile}"))
        if not started.get("joined"):
            url = started["auth_url"]
            if display:
                say(f"iapctl: login required for profile {profile}; opening your browser. If it does not open, visit:\n  {url}")
                open_browser(started.get("browser_url") or url)
            else:
                _prompt_for_redirect(profile, url, tty, say)
        else:
            say(f"iapctl: waiting for the login in progress for profile {profile}")
        outcome = wait_for_login(profile)
        if outcome.get("state") != "done":
            _mark_failed(profile)
            raise Failure(f"login for profile {profile} did not complete "
                          f"({outcome.get('message', outcome.get('state'))}): run `iapctl login {profile}`",
                          LOGIN_REQUIRED)
        if tty is not None:  # say who: a login is only as good as the account it was made with
            say(f"iapctl: logged in as {outcome.get('email')} (profile {profile})")
    finally:
        if tty is not None:
            tty.close()


def _prompt_for_redirect(profile: str, url: str, tty, say) -> None:
    say(f"iapctl: login required for profile {profile}. Open this URL in a browser:\n  {url}\n"
        "then paste here the URL the browser was sent to at the end (it starts with http://127.0.0.1):")
    pasted = tty.readline().strip()
    if not pasted:
        _mark_failed(profile)
        raise Failure(f"no URL was pasted; run `iapctl login {profile} --no-browser` when ready", LOGIN_REQUIRED)
    _json(call("POST", f"/v1/login/{profile}/complete", json.dumps({"redirect_url": pasted}).encode()))


def wait_for_login(profile: str) -> dict:
    while True:
        outcome = _json(call("GET", f"/v1/login/{profile}?wait={WAIT_SLICE:.0f}", timeout=WAIT_SLICE + 10))
        if outcome.get("state") != "pending":
            return outcome


def _json(resp) -> dict:
    if resp.status != 200:
        error = error_of(resp)
        raise Failure(error.get("message", "login failed"), LOGIN_REQUIRED)
    return resp.json()
