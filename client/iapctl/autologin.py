"""Logging in, from `iapctl login` or from `iapctl token` when it is needed — without ever
stranding the person.

Where a login can happen: a browser (a graphical display, or `$BROWSER` set), else a person at
a terminal who opens the URL elsewhere — on their laptop over SSH — and either pastes back the
address the browser ends on or forwards the listener's port (`ssh -L`, whose exact line we
print). `iapctl token` logs in by itself only where a person can see it: flytekit captures
stdout and flytectl hides stderr, so it talks on the controlling terminal (/dev/tty), and
with no terminal it says one line on stderr. Never in CI, cron or a service.

A login is owned by whoever waits for it: Ctrl-C cancels it in the daemon (DELETE), and the
daemon cancels one whose last waiter vanished. A login already in flight is joined (and its
browser opened, if nobody opened it yet). After an abandoned or failed auto-login we hold off
for a while instead of opening a tab on every one of flytekit's retries. `IAPD_AUTO_LOGIN=0` or
`[client] auto_login = false` turns auto-login off.
"""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time

from iapctl import paths
from iapctl.cli import EXIT_CODE_OF_ERROR, LOGIN_REQUIRED, Cancelled, Failure, call, error_of
from iapctl.shown import shown

COOLDOWN_SECONDS = 300
WAIT_SLICE = 25.0  # each long-poll; the daemon's own login timeout ends the whole wait
ORPHAN_AGE_SECONDS = 5.0  # an owner opens its browser (or starts waiting) well within this


# -- who we talk to ------------------------------------------------------------------------------

class Terminal:
    """The controlling terminal: prompts and the pasted URL. Two streams on two descriptors —
    a terminal is not seekable, so one read-write buffered file cannot be opened on it."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    def open(cls) -> "Terminal | None":
        """The controlling terminal, or None (no terminal: CI, cron, a service, setsid)."""
        try:
            reader = open(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY), encoding="utf-8", errors="replace")
        except OSError:
            return None
        try:
            writer = open(os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY), "w", encoding="utf-8", buffering=1)
        except OSError:
            reader.close()
            return None
        return cls(reader, writer)

    def say(self, text: str) -> None:
        self.writer.write(shown(text, keep_lines=True) + "\n")
        self.writer.flush()

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


class Console:
    """`iapctl login`'s own streams: messages on stderr, the pasted URL on stdin."""

    reader = sys.stdin

    def say(self, text: str) -> None:
        print(shown(text, keep_lines=True), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def read_line(stream, timeout: float) -> str | None:
    """A line from `stream` if one arrives within `timeout`, else None; "" at end of input."""
    try:
        ready, _, _ = select.select([stream], [], [], timeout)
    except (ValueError, OSError):
        ready = [stream]  # not selectable (a closed stream): let readline say so
    return stream.readline() if ready else None


# -- environment ---------------------------------------------------------------------------------

def _enabled(error: dict) -> bool:
    env = os.environ.get("IAPD_AUTO_LOGIN")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    return bool(error.get("auto_login", True))


def has_display() -> bool:
    if sys.platform == "darwin":
        return not os.environ.get("SSH_CONNECTION")  # a Mac's own session has a screen
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def can_open_browser() -> bool:
    """A browser is worth trying: a display, or a `$BROWSER` the user chose."""
    return has_display() or bool(os.environ.get("BROWSER"))


def open_browser(url: str) -> bool:
    """Open `url` in the user's browser (honours $BROWSER); True if a browser took it.

    The browser must never share our stdout (flytekit reads it as the token) or stderr (one
    line there is ours; `gio` and friends write theirs): both point at /dev/null while it
    starts, and it inherits that."""
    import webbrowser

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        chosen = os.environ.get("BROWSER", "")
        if not chosen.strip():
            return bool(webbrowser.open(url))
        # $BROWSER alone: webbrowser.open would go on to any other browser it finds when the
        # chosen one fails, and report success for a browser the person never picked.
        for command in browser_commands(chosen):
            try:
                if webbrowser.get(command).open(url):
                    return True
            except (webbrowser.Error, OSError):
                continue
        return False
    except webbrowser.Error:
        return False
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def browser_commands(value: str) -> list[str]:
    """$BROWSER's commands, as far as they can be run. It is colon-separated, but a colon may be
    inside one command (`curl -H 'X-A: b' %s`): the whole value is tried first when it parses as
    one command. Parts that do not parse (an unbalanced quote) are left out — webbrowser would
    raise ValueError on them — and the caller says the browser could not be opened."""
    import shlex

    def parses(command: str) -> bool:
        try:
            return bool(shlex.split(command))
        except ValueError:
            return False

    parts = [c for c in value.split(os.pathsep) if c.strip()]
    whole = [value] if len(parts) > 1 and parses(value) else []
    return whole + [c for c in parts if parses(c)]


def _ssh_forward_hint(redirect_uri: str) -> str | None:
    """Over SSH, the browser's redirect lands on the laptop's 127.0.0.1: forwarding the
    listener's port from the laptop brings it here. The exact line, with the real port."""
    if not os.environ.get("SSH_CONNECTION") or not redirect_uri:
        return None
    port = redirect_uri.split("//", 1)[-1].split("/", 1)[0].rpartition(":")[2]
    import getpass

    return (f"or forward the login's port from your laptop, in another terminal there:\n"
            f"    ssh -N -L {port}:127.0.0.1:{port} {getpass.getuser()}@{os.uname().nodename}\n"
            "  then open the URL on the laptop: the login completes here by itself.")


# -- the login itself ----------------------------------------------------------------------------

def login(profile: str, ui, browser: bool, device: bool = False) -> dict:
    """Start (or join) the login of `profile` and see it through: a browser when `browser` and
    one opens, else the URL to open elsewhere, the pasted redirect or a forwarded port; for the
    device grant, a code to enter at the issuer's page. Returns the daemon's outcome (`state`
    done or failed). Ctrl-C cancels the login in the daemon."""
    started = _json(call("POST", f"/v1/login/{profile}" + ("?device=1" if device else "")))
    try:
        if started.get("device"):
            if ui.reader is None:  # nobody would see the code
                cancel(profile)
                raise Failure(f"login required for profile {profile}: run `iapctl login {profile}`", LOGIN_REQUIRED)
            ui.say(f"iapctl: to log in to profile {profile}, open on any device:\n  {started['verification_url']}\n"
                   f"and enter the code {started['user_code']}")
            return wait_for_login(profile)
        if started.get("joined"):
            ui.say(f"iapctl: joining the login already in progress for profile {profile}; its URL:\n  {started['auth_url']}")
            if not _orphaned(started):
                return wait_for_login(profile)  # its owner is on it
            if browser and open_browser(started["browser_url"]):
                return wait_for_login(profile)
        if started.get("paste_required"):
            # This machine cannot tell whose browser reaches the login's listener: the address
            # the browser ends on is pasted here, through iapd's own (uid-checked) socket.
            if ui.reader is None:
                cancel(profile)
                raise Failure(f"login required for profile {profile}: run `iapctl login {profile}` in a terminal "
                              "(here the browser's address must be pasted back)", LOGIN_REQUIRED)
            if browser:
                open_browser(started.get("browser_url") or started["auth_url"])
            return _paste_or_forwarded(profile, started, ui)
        if browser:
            if open_browser(started.get("browser_url") or started["auth_url"]):
                ui.say(f"iapctl: a browser was opened to log in to profile {profile}. If you do not see it, open:\n"
                       f"  {started['auth_url']}")
                return wait_for_login(profile)
            chosen = os.environ.get("BROWSER")
            why = "could not open a browser" + (f" with $BROWSER ({chosen})" if chosen else "")
            if ui.reader is None:  # nobody to paste a URL either: say what to do, now
                cancel(profile)
                raise Failure(f"{why} to log in to profile {profile}: run `iapctl login {profile} --no-browser`",
                              LOGIN_REQUIRED)
            ui.say(f"iapctl: {why}.")
        return _paste_or_forwarded(profile, started, ui)
    except KeyboardInterrupt:
        cancel(profile)
        raise Cancelled(f"interrupted: the login for profile {profile} was cancelled") from None
    except Failure:
        raise
    except BaseException:
        # Whatever else ends this client (a bug, a broken $BROWSER, a kill it can see), the flow
        # it started must not stay pending for the next login to join blind.
        cancel(profile)
        raise


def _orphaned(flow: dict) -> bool:
    """A flow nobody is seeing through: no browser ever fetched its start page, nobody waits on
    it, and its owner had time to do both (it was killed before it could, say)."""
    return not flow.get("browser_opened") and not flow.get("waiters") and flow.get("age", 0) > ORPHAN_AGE_SECONDS


def _paste_or_forwarded(profile: str, started: dict, ui) -> dict:
    """Print the URL; finish on whichever comes first: the pasted redirect URL, or the flow
    completing by itself (a forwarded port, a browser elsewhere that reached the listener)."""
    lines = [f"iapctl: to log in to profile {profile}, open this URL in a browser (on any machine):",
             f"  {started['auth_url']}",
             "then paste here the address the browser ends on (http://127.0.0.1:…; the page may not load),"]
    # A forwarded port completes nothing where the listener takes only pasted addresses.
    hint = None if started.get("paste_required") else _ssh_forward_hint(started.get("redirect_uri", ""))
    if hint:
        lines.append(hint)
    ui.say("\n".join(lines))
    outcome: dict = {}
    finished = threading.Event()

    def poll() -> None:
        try:
            outcome.update(wait_for_login(profile))
        except Failure as exc:
            outcome.update(state="failed", message=exc.message)
        finished.set()

    threading.Thread(target=poll, name="iapctl-login-poll", daemon=True).start()
    while not finished.is_set():
        line = read_line(ui.reader, 0.5)
        if line is None:
            continue
        if line == "":  # end of input, and the login is not done: nothing more will come
            cancel(profile)
            raise Failure(f"no URL was pasted; the login was cancelled: run `iapctl login {profile}` again",
                          LOGIN_REQUIRED)
        if line.strip():
            resp = call("POST", f"/v1/login/{profile}/complete", json.dumps({"redirect_url": line.strip()}).encode())
            if resp.status == 400:  # not this login's address (a typo, another tab): ask again
                ui.say(f"iapctl: {error_of(resp).get('message', 'that is not the address')}; paste it again:")
                continue
            return _json(resp)
    return outcome


def cancel(profile: str) -> None:
    """Best effort: end the daemon's flow now (its listener closes); the next login is fresh."""
    try:
        call("DELETE", f"/v1/login/{profile}", timeout=2, autostart=False)
    except Failure:
        pass


def wait_for_login(profile: str) -> dict:
    while True:
        outcome = _json(call("GET", f"/v1/login/{profile}?wait={WAIT_SLICE:.0f}", timeout=WAIT_SLICE + 10))
        if outcome.get("state") != "pending":
            return outcome


def not_completed(profile: str, outcome: dict) -> Failure:
    """The one line for a login that did not complete, with what to do next."""
    message = outcome.get("message", outcome.get("state"))
    return Failure(f"the login for profile {profile} did not complete ({message}): run `iapctl login {profile}` "
                   f"(or `iapctl login {profile} --no-browser` to open the URL yourself)", LOGIN_REQUIRED)


def _json(resp) -> dict:
    if resp.status != 200:
        error = error_of(resp)
        # The same exit code as `iapctl token` for the same cause: an unknown profile is 5, not 4.
        raise Failure(error.get("message", "login failed"), EXIT_CODE_OF_ERROR.get(error.get("error"), LOGIN_REQUIRED))
    return resp.json()


# -- from `iapctl token` -------------------------------------------------------------------------

def _cooldown_path(profile: str) -> str:
    return os.path.join(paths.state_dir(), f"autologin-{profile}.failed")


def _cooling_down(profile: str) -> float:
    try:
        age = time.time() - os.stat(_cooldown_path(profile)).st_mtime
    except OSError:
        return 0.0
    return max(0.0, COOLDOWN_SECONDS - age)


def _mark_failed(profile: str) -> None:
    try:
        paths.ensure_private_dir(paths.state_dir())
        os.close(os.open(_cooldown_path(profile), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        os.utime(_cooldown_path(profile))
    except (OSError, paths.UnsafePath):
        pass  # the cool-down is a courtesy; its absence must not hide the real error


def login_when_needed(profile: str, error: dict) -> None:
    """Complete a login for `profile` or raise Failure(LOGIN_REQUIRED) saying what to do."""
    reason = error.get("message", "not logged in")
    manual = Failure(f"login required for profile {profile} ({reason}): run `iapctl login {profile}`", LOGIN_REQUIRED)
    if not _enabled(error):
        raise manual
    # A browser only where a person can see it (a display): a $BROWSER alone, in CI, is not one.
    browser, terminal = has_display(), Terminal.open()
    if not browser and terminal is None:
        raise manual  # nobody would see a browser or a prompt
    left = _cooling_down(profile)
    if left:
        if terminal is not None:
            terminal.close()
        raise Failure(f"login required for profile {profile}; a login was abandoned or failed recently, so "
                      f"none is opened for {left:.0f}s more: run `iapctl login {profile}`", LOGIN_REQUIRED)
    try:
        if terminal is not None:
            terminal.say(f"iapctl: login required for profile {profile} ({reason})")
        # With no terminal, a browser does the talking (Silent), and one line at the end is all.
        outcome = login(profile, terminal if terminal is not None else Silent(), browser)
        if outcome.get("state") != "done":
            raise not_completed(profile, outcome)  # and cool down (below)
        # Say who: a login is only as good as the account it was made with. On the terminal if
        # there is one; else this is our one line on stderr.
        who = f"iapctl: logged in as {outcome.get('email')} (profile {profile})"
        terminal.say(who) if terminal is not None else print(shown(who), file=sys.stderr)
    except Cancelled:
        raise  # the person's choice, not a login nobody answered: no cool-down
    except Failure:
        _mark_failed(profile)
        raise
    finally:
        if terminal is not None:
            terminal.close()


class Silent:
    """No terminal and no stderr chatter (one line at the end is all): a browser does the talking."""

    reader = None

    def say(self, text: str) -> None:
        pass

