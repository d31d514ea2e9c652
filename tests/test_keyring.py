"""`[daemon] store = "keyring"`: logins in a real Secret Service — gnome-keyring-daemon on a
private D-Bus session — and, for macOS, `security` command lines against a stand-in on PATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_client import CURL_BROWSER, failed, iapctl
from test_oidc import env_of

HAVE_KEYRING = shutil.which("gnome-keyring-daemon") and shutil.which("dbus-daemon")
needs_keyring = pytest.mark.skipif(not HAVE_KEYRING, reason="gnome-keyring-daemon and dbus-daemon are not installed "
                                   "(`make test` installs them: apt-get install gnome-keyring dbus-daemon)")
PASSWORD = "keyring-test-password"
USER_KEY = "123456789012-desktop.apps.googleusercontent.com"


class SecretService:
    """A D-Bus session of its own with gnome-keyring's secrets component, its login keyring
    created and unlocked with PASSWORD; keyring files under `home`."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address = self.bus.stdout.readline().strip()
        self.env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.address, "HOME": str(home),
                    "XDG_DATA_HOME": str(home / "data")}
        self.keyring = subprocess.Popen(["gnome-keyring-daemon", "--unlock", "--foreground", "--components=secrets"],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=self.env, text=True)
        self.keyring.stdin.write(PASSWORD)
        self.keyring.stdin.close()
        deadline = time.monotonic() + 15
        while self.run("print(len(list(c.get_all_items())) >= 0)").returncode != 0:
            assert time.monotonic() < deadline, "gnome-keyring did not come up"
            time.sleep(0.1)

    def run(self, code: str) -> subprocess.CompletedProcess:
        script = "import secretstorage\nconn = secretstorage.dbus_init()\nc = secretstorage.get_default_collection(conn)\n"
        return subprocess.run([sys.executable, "-c", script + code], env=self.env, capture_output=True, text=True,
                              timeout=30)

    def items(self) -> dict:
        """key → (secret fields' names, modified time): never the secret values themselves."""
        out = self.run("import json\nprint(json.dumps({i.get_attributes().get('key'): "
                       "[sorted(json.loads(i.get_secret())), i.get_modified()] "
                       "for i in c.search_items({'application': 'iapd'})}))")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def lock(self) -> None:
        assert self.run("c.lock()").returncode == 0

    def unlock(self) -> None:
        # gnome-keyring unlocks a collection for this password over its control socket, as a desktop login does.
        out = subprocess.run(["gnome-keyring-daemon", "--unlock", "--replace", "--components=secrets", "--daemonize"],
                             input=PASSWORD, env=self.env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr

    def stop(self) -> None:
        for proc in (self.keyring, self.bus):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def secret_service(tmp_path):
    service = SecretService(tmp_path / "kr")
    yield service
    service.stop()


def keyring_daemon(daemon_factory, emulator, service, name="kr", store="keyring"):
    return daemon_factory(f'store = "{store}"', name=name, env={"DBUS_SESSION_BUS_ADDRESS": service.address})


def secrets_on_disk(state_dir: Path, *values: str) -> list[str]:
    """Files under the state dir that hold any of `values` (by content, not by name)."""
    return [str(p) for p in state_dir.rglob("*") if p.is_file() and any(v.encode() in p.read_bytes() for v in values)]


@needs_keyring
def test_a_login_lives_in_the_keyring_and_survives_a_restart_without_a_file_holding_it(
        daemon_factory, emulator, secret_service, tmp_path):
    daemon = keyring_daemon(daemon_factory, emulator, secret_service)
    assert daemon.login()["state"] == "done"
    assert daemon.token("demo-user")
    items = secret_service.items()
    assert len(items) == 1 and USER_KEY in next(iter(items))
    key = next(iter(items))
    assert items[key][0] == ["client_secret", "refresh_token"]
    record = json.loads((daemon.state_dir / "credentials.json").read_text())
    assert record["store"] == "keyring"
    assert all("refresh_token" not in r and "client_secret" not in r for r in record["credentials"].values())
    # (the desktop client's secret, GOCSPX-…, in no file of ours either)
    assert secrets_on_disk(daemon.state_dir, "1//", "GOCSPX-") == []
    assert daemon.status()["daemon"]["store_kind"] == "keyring"

    # An ordinary refresh rotates nothing and writes nothing to the keyring.
    modified = items[key][1]
    time.sleep(1.1)  # the Secret Service's modified time has a resolution of one second
    daemon.set_clock(3600, 3600)
    assert daemon.token("demo-user")
    assert daemon.profile_status("demo-user")["refresh_count"] == 2
    assert secret_service.items()[key][1] == modified

    daemon.stop()
    daemon.start()
    assert daemon.token("demo-user")  # a restarted daemon serves without a new login
    out = iapctl("logout", "demo-user", env=env_of(daemon, tmp_path))
    assert out.returncode == 0, out.stderr
    assert secret_service.items() == {}


@needs_keyring
def test_a_rotated_refresh_token_is_written_to_the_keyring(daemon_factory, emulator, secret_service, tmp_path):
    emulator.settings(rotate_refresh_tokens=True)
    daemon = keyring_daemon(daemon_factory, emulator, secret_service)
    assert daemon.login()["state"] == "done"
    key, (_, before) = next(iter(secret_service.items().items()))
    time.sleep(1.1)  # the Secret Service's modified time has a resolution of one second
    daemon.set_clock(3600, 3600)
    assert daemon.token("demo-user")
    assert secret_service.items()[key][1] > before


@needs_keyring
def test_a_locked_keyring_is_one_clear_line_and_an_unlock_and_reload_bring_the_login_back(
        daemon_factory, emulator, secret_service, tmp_path):
    daemon = keyring_daemon(daemon_factory, emulator, secret_service)
    assert daemon.login()["state"] == "done"
    daemon.stop()
    secret_service.lock()
    daemon.start()
    env = env_of(daemon, tmp_path)
    error = daemon.status()["daemon"]["store_error"]
    assert "is locked" in error and "iapctl reload" in error and 'store = "file"' in error
    failed(iapctl("token", "demo-user", env=env), 4, "is locked")
    assert "note: the credential store cannot be used: " in iapctl("status", env=env).stdout
    assert "PROBLEM  store: " in iapctl("doctor", env=env).stdout
    assert daemon.token("demo-sa")  # what needs no login serves on
    # No login "works and is then forgotten": one while locked fails, and says why.
    started = daemon.request("POST", "/v1/login/demo-user").json()
    from conftest import browse

    assert "auth_url" in started, started

    browse(started["auth_url"])
    outcome = daemon.request("GET", "/v1/login/demo-user?wait=20").json()
    assert outcome["state"] == "failed" and "locked" in outcome["message"], outcome
    secret_service.unlock()
    assert iapctl("reload", env=env).returncode == 0
    assert daemon.status()["daemon"]["store_error"] is None
    assert daemon.token("demo-user")  # the login that was in the keyring all along


def test_no_secret_service_at_all_is_a_clear_line(daemon_factory, emulator, tmp_path):
    daemon = daemon_factory('store = "keyring"', name="nobus",
                            env={"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/no-such-bus"})
    error = daemon.status()["daemon"]["store_error"]
    assert error and ("Secret Service" in error or "D-Bus" in error) and 'store = "file"' in error, error
    failed(iapctl("token", "demo-user", env=env_of(daemon, tmp_path)), 4)


@needs_keyring
def test_switching_stores_moves_the_logins_across_and_leaves_nothing_behind(
        daemon_factory, emulator, secret_service, tmp_path):
    daemon = keyring_daemon(daemon_factory, emulator, secret_service, store="file")
    assert daemon.login()["state"] == "done"
    token = daemon.token("demo-user")
    assert secrets_on_disk(daemon.state_dir, "1//") != [] and secret_service.items() == {}
    daemon.config.write_text(daemon.config.read_text().replace('store = "file"', 'store = "keyring"'))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]
    assert secrets_on_disk(daemon.state_dir, "1//", "GOCSPX-") == [] and len(secret_service.items()) == 1
    assert daemon.token("demo-user") == token  # no new login, the same token
    daemon.set_clock(3600, 3600)
    assert daemon.token("demo-user")  # and the refresh token works from the keyring
    daemon.config.write_text(daemon.config.read_text().replace('store = "keyring"', 'store = "file"'))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]
    assert secret_service.items() == {} and secrets_on_disk(daemon.state_dir, "1//") != []
    daemon.stop()
    daemon.start()
    assert daemon.token("demo-user")


STAND_IN = r'''#!PYTHON
"""A stand-in for macOS's /usr/bin/security: generic passwords in a JSON file; every argv logged."""
import json, os, shlex, sys
db = os.environ["SECURITY_DB"]
items = json.load(open(db)) if os.path.exists(db) else {}
with open(db + ".argv", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")
def opt(args, name):
    return args[args.index(name) + 1] if name in args else None
def run(args):
    verb = args[0]
    key = f"{opt(args, '-s')}/{opt(args, '-a')}"
    if verb == "add-generic-password":
        if key in items and "-U" not in args:
            return 45
        items[key] = bytes.fromhex(opt(args, "-X")).decode()
    elif verb == "find-generic-password":
        if key not in items:
            return 44
        print(items[key])
    elif verb == "delete-generic-password":
        if items.pop(key, None) is None:
            return 44
    json.dump(items, open(db, "w"))
    return 0
if sys.argv[1:] == ["-i"]:
    code = 0
    for line in sys.stdin:
        code = run(shlex.split(line)) or code
    sys.exit(code)
sys.exit(run(sys.argv[1:]))
'''


def test_the_macos_keychain_path_runs_security_with_no_secret_in_argv(daemon_factory, emulator, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    security = bin_dir / "security"
    security.write_text(STAND_IN.replace("PYTHON", sys.executable))
    security.chmod(0o755)
    db = tmp_path / "keychain.json"
    daemon = daemon_factory('store = "keyring"', name="mac",
                            env={"IAPD_KEYRING": "keychain", "IAPD_SECURITY_PATH": str(bin_dir), "SECURITY_DB": str(db)})
    assert daemon.login()["state"] == "done"
    assert daemon.token("demo-user")
    items = json.loads(db.read_text())
    assert len(items) == 1 and next(iter(items)).startswith(f"iapd:{daemon.state_dir}/user:{USER_KEY}")
    argv = (tmp_path / "keychain.json.argv").read_text()
    value = next(iter(items.values()))
    assert json.loads(value)["refresh_token"] not in argv  # secrets went on stdin (hex), never in argv
    assert secrets_on_disk(daemon.state_dir, "1//", "GOCSPX-") == []
    daemon.stop()
    daemon.start()
    assert daemon.token("demo-user")
    assert iapctl("logout", "demo-user", env=env_of(daemon, tmp_path)).returncode == 0
    assert json.loads(db.read_text()) == {}


@needs_keyring
def test_a_switch_to_a_locked_keyring_is_refused_in_status_and_a_switch_back_needs_nothing(
        daemon_factory, emulator, secret_service, tmp_path):
    daemon = keyring_daemon(daemon_factory, emulator, secret_service, store="file")
    assert daemon.login()["state"] == "done"
    secret_service.lock()
    daemon.config.write_text(daemon.config.read_text().replace('store = "file"', 'store = "keyring"'))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]
    assert "is locked" in daemon.status()["daemon"]["store_error"]
    assert secrets_on_disk(daemon.state_dir, "1//") != []  # nothing was moved, nothing lost
    daemon.config.write_text(daemon.config.read_text().replace('store = "keyring"', 'store = "file"'))
    assert daemon.request("POST", "/v1/reload").json()["reloaded"]
    assert daemon.status()["daemon"]["store_error"] is None
    daemon.set_clock(3600, 3600)
    assert daemon.token("demo-user")  # the login in the file, refreshed
