"""Logging in never strands a person: a real terminal (a pseudo-terminal that is the controlling
terminal of `iapctl`, as over SSH), browsers that fail, Ctrl-C, and logins joined.

The "person" here reads what `iapctl` writes on the terminal and types into it; stdout and
stderr are pipes, as under flytekit, and must stay exactly as the contract says.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import subprocess
import termios
import time

import pytest
import requests

from conftest import browse, stop_process, wait_for
from iapd.jwt import unverified_claims
from test_client import CURL_BROWSER, IAPCTL

URL = re.compile(r"http://\S+")


class Person:
    """`iapctl ARGS` with a pseudo-terminal as its controlling terminal, and a person at it."""

    def __init__(self, *args: str, env: dict) -> None:
        self.master, slave = os.openpty()

        def controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # A person's shell gives its commands Ctrl-C; `make test` run as a background job
            # of a non-interactive shell ignores SIGINT, and its children would inherit that.
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.proc = subprocess.Popen([IAPCTL, *args], env=env, stdin=slave, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=controlling_terminal)
        os.close(slave)
        self.screen = ""

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        """Read the terminal until `pattern` shows (what a person waits for with their eyes)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.screen)
            if found:
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} never showed on the terminal:\n{self.screen}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the other side closed: iapctl is gone
                    chunk = b""
                assert chunk, f"iapctl left before {pattern!r} showed:\n{self.screen}"
                self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 30) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        try:
            while select.select([self.master], [], [], 0.1)[0]:
                chunk = os.read(self.master, 4096)
                if not chunk:
                    break
                self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")
        except OSError:
            pass
        os.close(self.master)
        return out.decode(), err.decode()


def refused(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def redirect_of(auth_url: str) -> str:
    """What a browser elsewhere ends on after the person approves: the loopback redirect URL."""
    return requests.get(auth_url, allow_redirects=False, timeout=10).headers["Location"]


@pytest.fixture
def env(daemon, tmp_path) -> dict:
    base = {k: v for k, v in daemon.env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER", "SSH_CONNECTION")}
    return {**base, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "1", "XDG_STATE_HOME": str(tmp_path / "client-state")}


def test_token_in_a_terminal_without_a_display_logs_in_by_paste_back(env, daemon):
    person = Person("token", "demo-user", env=env)
    url = person.wait_for(r"open this URL in a browser.*\n\s+(http://\S+)").group(1)
    person.wait_for(r"paste here")
    person.type(redirect_of(url) + "\n")
    out, err = person.finish()
    assert person.proc.returncode == 0, (err, person.screen)
    assert out.count("\n") == 1 and unverified_claims(out.strip())["email"] == "demo@example.com"
    assert err == ""  # the person was spoken to on the terminal
    assert "logged in as demo@example.com (profile demo-user)" in person.screen


def test_over_ssh_the_terminal_shows_the_exact_port_forward_and_a_forwarded_login_completes(env, daemon):
    person = Person("token", "demo-user", env={**env, "SSH_CONNECTION": "10.0.0.2 51000 10.0.0.1 22"})
    url = person.wait_for(r"open this URL in a browser.*\n\s+(http://\S+)").group(1)
    forward = person.wait_for(r"ssh -N -L (\d+):127\.0\.0\.1:(\d+) \S+@\S+")
    port = re.search(r"redirect_uri=http%3A%2F%2F127\.0\.0\.1%3A(\d+)", url).group(1)
    assert forward.group(1) == forward.group(2) == port
    browse(url)  # the laptop's browser, its redirect carried to the listener by the forwarded port
    out, err = person.finish()
    assert person.proc.returncode == 0 and err == "" and out.startswith("eyJ"), (err, person.screen)


def test_a_browser_command_that_fails_falls_back_to_the_terminal_at_once(env, daemon):
    person = Person("token", "demo-user", env={**env, "DISPLAY": ":0", "BROWSER": "false"})
    person.wait_for(r"could not open a browser with \$BROWSER \(false\)")
    url = person.wait_for(r"open this URL in a browser.*\n\s+(http://\S+)").group(1)
    person.type(redirect_of(url) + "\n")
    out, err = person.finish()
    assert person.proc.returncode == 0 and err == "" and out.startswith("eyJ"), (err, person.screen)


def test_a_browser_that_fails_with_nobody_at_a_terminal_says_so_at_once(env, daemon):
    started = time.monotonic()
    out = subprocess.run([IAPCTL, "token", "demo-user"], env={**env, "DISPLAY": ":0", "BROWSER": "no-such-browser-cmd"},
                         capture_output=True, text=True, timeout=60, start_new_session=True)
    assert out.returncode == 4 and out.stdout == ""
    assert out.stderr == ("iapctl: could not open a browser with $BROWSER (no-such-browser-cmd) to log in to profile "
                          "demo-user: run `iapctl login demo-user --no-browser`\n")
    assert time.monotonic() - started < 20  # not the login's 300 s
    assert daemon.request("GET", "/v1/login/demo-user").json()["state"] == "failed"  # and no flow is left behind


def test_ctrl_c_cancels_the_login_and_the_next_one_starts_afresh(env, daemon, emulator, tmp_path):
    argv = tmp_path / "argv"
    lazy = tmp_path / "lazy-browser"  # "opens" (exit 0) but never loads the page
    lazy.write_text(f"#!/bin/sh\necho \"$1\" > {argv}\n")
    lazy.chmod(0o755)
    person = Person("login", "demo-user", env={**env, "BROWSER": f"{lazy} %s"})
    first_port = re.search(r":(\d+)/", wait_for(lambda: argv.exists() and argv.read_text(), what="the browser")).group(1)
    time.sleep(0.3)  # the person looks at the screen, then gives up
    person.type("\x03")  # Ctrl-C: the terminal sends SIGINT to iapctl
    out, err = person.finish()
    assert person.proc.returncode == 130 and out == ""
    assert err.splitlines()[-1] == "iapctl: interrupted: the login for profile demo-user was cancelled", err
    assert "Traceback" not in err
    assert daemon.request("GET", "/v1/login/demo-user").json()["state"] == "failed"
    wait_for(lambda: refused(int(first_port)), timeout=10, what="its listener to close")
    again = subprocess.run([IAPCTL, "login", "demo-user"], env={**env, "BROWSER": CURL_BROWSER}, capture_output=True,
                           text=True, timeout=60, start_new_session=True)
    assert again.returncode == 0 and again.stdout == "Logged in as demo@example.com (profile demo-user).\n", again.stderr
    assert emulator.counters()["auth"] == 1  # the first flow's page was never loaded; the second's was


def test_a_killed_login_is_abandoned_by_the_daemon(env, daemon, tmp_path):
    lazy = tmp_path / "lazy-browser"
    lazy.write_text("#!/bin/sh\nexit 0\n")
    lazy.chmod(0o755)
    proc = subprocess.Popen([IAPCTL, "login", "demo-user"], env={**env, "BROWSER": f"{lazy} %s"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    proc.stderr.readline()  # it has opened the "browser" and is waiting on the daemon
    # Its long-poll is in flight (on a loaded machine that can take more than a moment).
    wait_for(lambda: daemon.request("GET", "/v1/login/demo-user").json().get("waiters") == 1, timeout=15,
             what="iapctl's long-poll")
    proc.kill()
    proc.wait()
    # Watched without waiting on it (a long-poll would be a waiter, and so its new owner).
    outcome = wait_for(lambda: (lambda o: o if o["state"] != "pending" else None)(
        daemon.request("GET", "/v1/login/demo-user").json()), timeout=15, what="the login to be abandoned")
    assert outcome["state"] == "failed" and "abandoned" in outcome["message"], outcome


def test_two_logins_at_once_share_one_flow_and_one_listener(env, daemon, emulator):
    login_env = {**env, "BROWSER": CURL_BROWSER}
    procs = [subprocess.Popen([IAPCTL, "login", "demo-user"], env=login_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for _ in range(2)]
    results = [p.communicate(timeout=60) for p in procs]
    try:
        for proc, (out, err) in zip(procs, results):
            assert proc.returncode == 0 and out == "Logged in as demo@example.com (profile demo-user).\n", err
        errs = sorted(err for _, err in results)
        auth = re.escape(emulator.url("oauth_auth_url"))
        assert re.fullmatch(r"iapctl: a browser was opened to log in to profile demo-user\. If you do not see it, "
                            rf"open:\n  {auth}\?\S+\n", errs[0]), errs[0]
        assert re.fullmatch(rf"iapctl: joining the login already in progress for profile demo-user; its URL:\n"
                            rf"  {auth}\?\S+\n", errs[1]), errs[1]
        assert URL.search(errs[0]).group(0) == URL.search(errs[1]).group(0)  # the same flow
        assert emulator.counters()["auth"] == 1  # one browser flow, one listener
    finally:
        for proc in procs:
            stop_process(proc)


def test_ctrl_c_at_the_prompt_of_iapctl_token_is_no_failed_login(env, daemon):
    """pyflyte's case: cancel, rerun. A cancel by the person must not start the cool-down that
    is meant for logins nobody answered."""
    person = Person("token", "demo-user", env=env)
    person.wait_for(r"paste here")
    person.type("\x03")
    out, err = person.finish()
    assert person.proc.returncode == 130 and out == "", (err, person.screen)
    again = Person("token", "demo-user", env=env)
    url = again.wait_for(r"open this URL in a browser.*\n\s+(http://\S+)").group(1)  # a login again, at once
    assert "abandoned or failed recently" not in again.screen
    again.type(redirect_of(url) + "\n")
    out, err = again.finish()
    assert again.proc.returncode == 0 and out.startswith("eyJ"), (err, again.screen)


def test_a_wrong_address_pasted_is_asked_for_again(env, daemon):
    person = Person("token", "demo-user", env=env)
    url = person.wait_for(r"open this URL in a browser.*\n\s+(http://\S+)").group(1)
    person.wait_for(r"paste here")
    person.type("http://127.0.0.1:9/oauth2/callback?code=nope&state=wrong\n")
    person.wait_for(r"does not belong to the login in progress.*paste it again")
    person.type(redirect_of(url) + "\n")
    out, err = person.finish()
    assert person.proc.returncode == 0 and out.startswith("eyJ"), (err, person.screen)


def test_a_browser_command_with_a_colon_inside_opens(env, daemon, tmp_path):
    """$BROWSER is colon-separated; `-H 'X-A: b'` has a colon inside one command."""
    out = subprocess.run([IAPCTL, "login", "demo-user"], env={**env, "BROWSER": "curl -sSL -o /dev/null -H 'X-A: b' %s"},
                         capture_output=True, text=True, timeout=60, start_new_session=True)
    assert out.returncode == 0 and out.stdout == "Logged in as demo@example.com (profile demo-user).\n", out.stderr


def test_a_browser_command_that_does_not_parse_is_one_line_and_leaves_no_login_behind(env, daemon):
    person = Person("token", "demo-user", env={**env, "DISPLAY": ":0", "BROWSER": "curl 'unbalanced %s"})
    person.wait_for(r"could not open a browser with \$BROWSER")
    person.wait_for(r"open this URL in a browser.*\n\s+(http://\S+)")
    person.type("\x03")
    out, err = person.finish()
    assert "Traceback" not in err and person.proc.returncode == 130, err
    state = daemon.request("GET", "/v1/login/demo-user").json()["state"]
    assert state != "pending"  # the next login is its own, not one joined blind
