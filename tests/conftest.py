"""Fixtures that run the real things: the emulator as a subprocess over HTTP, and (in the daemon
tests) `iapd serve` as a subprocess on a real unix socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class EmulatorProcess:
    """A running `iapd emulator` and its test controls (`/_emulator/...`)."""

    proc: subprocess.Popen
    info: dict
    config_path: Path

    def url(self, key: str) -> str:
        return self.info[key]

    def _post(self, action: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(f"{self.info['control_url']}/{action}", data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def settings(self, **values) -> dict:
        return self._post("settings", values)

    def fault(self, kind: str, endpoint: str = "token", count: int = 1, delay: float = 0.0) -> None:
        self._post("faults", {"endpoint": endpoint, "kind": kind, "count": count, "delay": delay})

    def revoke_user(self, email: str | None = None) -> int:
        return self._post("revoke_user", {"email": email} if email else {})["revoked"]

    def state(self) -> dict:
        with urllib.request.urlopen(self.info["control_url"], timeout=10) as resp:
            return json.load(resp)

    def counters(self) -> dict:
        return self.state()["counters"]

    def reset(self) -> None:
        self.settings(token_lifetime=3600, clock_offset=0, approve="auto", rotate_refresh_tokens=False,
                      user_email="demo@example.com", metadata_cache=True,
                      metadata_cache_until_left=300, iap_access_level=False)
        self._post("oidc", {"user": "alice@example.com", "token_lifetime": 3600, "device_interval": 5, "slow_down_polls": 0,
                            "auth_methods": ["client_secret_basic", "client_secret_post"]})
        self._post("clear_faults")
        self._post("allowlist", {"clients": ["123456789012-desktop.apps.googleusercontent.com"]})
        self._post("reset_counters")


def start_emulator(folder: Path, *extra: str) -> EmulatorProcess:
    config = folder / "config.toml"
    proc = subprocess.Popen([sys.executable, "-m", "iapd", "emulator", "--write-config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the ready line; the emulator prints nothing before it
    if not line:
        proc.wait(timeout=10)
        raise RuntimeError(f"emulator did not start: {proc.stderr.read()}")
    return EmulatorProcess(proc, json.loads(line), config)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def emulator_session(tmp_path_factory) -> EmulatorProcess:
    emu = start_emulator(tmp_path_factory.mktemp("emulator"))
    yield emu
    stop_process(emu.proc)


@pytest.fixture
def emulator(emulator_session) -> EmulatorProcess:
    """The shared emulator, with settings, faults and counters reset for this test."""
    emulator_session.reset()
    return emulator_session


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Never touch the real user's config, state or socket."""
    home = tmp_path / "home"
    home.mkdir()
    for var, sub in [("XDG_CONFIG_HOME", "config"), ("XDG_STATE_HOME", "state"), ("XDG_RUNTIME_DIR", "run")]:
        (home / sub).mkdir(mode=0o700)
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("IAPD_CONFIG", raising=False)
    monkeypatch.delenv("IAPD_SOCKET", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("BROWSER", raising=False)


# -- the daemon ---------------------------------------------------------------------------------

from iapctl import wire  # noqa: E402  (stdlib-only client transport, the same one iapctl uses)


class DaemonProcess:
    """A running `iapd serve` on its own socket, config and state directory."""

    def __init__(self, folder: Path, config_path: Path, daemon_settings: str = "", env: dict | None = None) -> None:
        self.folder = folder
        self.socket = str(folder / "run" / "iapd.sock")
        self.state_dir = folder / "state"
        self.config = folder / "iapd.toml"
        text = config_path.read_text()
        settings = f'state_dir = "{self.state_dir}"\n{daemon_settings}'
        self.config.write_text(f"[daemon]\n{settings}\n{text}" if "[daemon]" not in text
                               else text.replace("[daemon]\n", f"[daemon]\n{settings}\n", 1))
        self.log_path = folder / "iapd.log"
        self.env = {**os.environ, "IAPD_CONFIG": str(self.config), "IAPD_SOCKET": self.socket, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, expect_ready: bool = True, prefix: list[str] | None = None) -> "DaemonProcess":
        """Start `iapd serve`; `prefix` runs it under another command (prlimit, say)."""
        import socket as socket_mod

        notify_path = str(self.folder / f"notify-{os.getpid()}.sock")
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        listener = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
        listener.bind(notify_path)
        listener.settimeout(30)
        try:
            log = open(self.log_path, "a")
            self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "iapd", "serve", "--test-clock",
                                          "--log-level", "debug"],
                                         env={**self.env, "NOTIFY_SOCKET": notify_path}, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
            log.close()
            if expect_ready:
                # The daemon says READY=1 on NOTIFY_SOCKET (as to systemd): no polling needed.
                message = listener.recv(4096).decode()
                assert "READY=1" in message, message
        finally:
            listener.close()
            os.unlink(notify_path)
        return self

    def request(self, method: str, target: str, body: dict | None = None, timeout: float = 30) -> wire.Response:
        data = json.dumps(body).encode() if body is not None else None
        return wire.request(self.socket, method, target, data, timeout=timeout)

    def token(self, profile: str) -> str:
        resp = self.request("GET", f"/v1/token/{profile}")
        assert resp.status == 200, resp.body
        return resp.body.decode()

    def status(self) -> dict:
        return self.request("GET", "/v1/status").json()

    def supervisor_passes(self, count: int = 3) -> None:
        """Let the renewal supervisor look at every entry `count` more times: what a test of
        "nothing was renewed" waits for, instead of sleeping and hoping the daemon kept up."""
        start = self.status()["daemon"]["supervisor_passes"]
        wait_for(lambda: self.status()["daemon"]["supervisor_passes"] >= start + count, what="supervisor passes")

    def profile_status(self, name: str) -> dict:
        return next(p for p in self.status()["profiles"] if p["name"] == name)

    def set_clock(self, wall_offset: float, mono_offset: float = 0.0) -> None:
        """Shift the daemon's clocks: the wall clock alone (NTP, a person), or both (a suspend)."""
        body = {"wall_offset": wall_offset, "mono_offset": mono_offset}
        assert self.request("POST", "/v1/test/clock", body).status == 200

    def login(self, profile: str = "demo-user") -> dict:
        """Start a login, let a 'browser' (curl following redirects) complete it, wait for it."""
        started = self.request("POST", f"/v1/login/{profile}").json()
        assert started.get("state") == "pending", started
        browse(started["auth_url"])
        return self.request("GET", f"/v1/login/{profile}?wait=20").json()

    def records(self) -> dict:
        """The credential store as the daemon last wrote it."""
        path = self.state_dir / "credentials.json"
        return json.loads(path.read_text())["credentials"] if path.exists() else {}

    def record(self, prefix: str = "user:") -> dict:
        """The one stored login whose key starts with `prefix` (a login's key names its
        client and, unless it is Google's own, the endpoint it is bound to)."""
        found = [r for k, r in self.records().items() if k.startswith(prefix)]
        assert len(found) == 1, sorted(self.records())
        return found[0]

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int:
        assert self.proc is not None
        stop_process(self.proc)
        return self.proc.returncode


def wait_for(predicate, timeout: float = 20, what: str = "condition"):
    """Wait on another process's state (a daemon's background renewal): bounded, short polls.
    Only for what cannot be awaited: the daemon's own timers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def browse(url: str) -> None:
    """What `BROWSER='curl -sSL -o /dev/null %s'` does: follow redirects to the loopback listener."""
    subprocess.run(["curl", "-sSL", "-o", "/dev/null", url], check=True, timeout=30)


@pytest.fixture
def daemon_factory(tmp_path, emulator):
    started: list[DaemonProcess] = []

    def make(daemon_settings: str = "", name: str = "d", config: Path | None = None, start: bool = True,
             env: dict | None = None, prefix: list[str] | None = None) -> DaemonProcess:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        daemon = DaemonProcess(folder, config or emulator.config_path, daemon_settings, env)
        started.append(daemon)
        return daemon.start(prefix=prefix) if start else daemon

    yield make
    for daemon in started:
        if daemon.proc is not None:
            stop_process(daemon.proc)


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory()


@pytest.fixture
def outside_tmp():
    """A folder that is not under /tmp (pytest's tmp_path is, and so may the checkout be): for
    what a service with a private /tmp must reach, which `iapctl service install` rightly refuses
    to find there. In the user's real home directory (not the isolated one), removed after."""
    import pwd
    import shutil
    import tempfile

    home = os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir)
    if home == "/tmp" or home.startswith(("/tmp/", "/var/tmp/")):
        pytest.skip(f"the home directory {home} is under /tmp itself")
    root = Path(home) / ".cache"
    root.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="iapd-test-", dir=root))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# -- a disk that fills up -----------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB tmpfs (we run as root here and in CI): a full disk, not a faked write error."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Fill the disk `folder` is on, with a file named `filler`."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass  # the disk is full
    finally:
        os.close(fd)


# -- an OpenID Provider someone else wrote ------------------------------------------------------

OP_DIR = Path(__file__).parent / "oidc_provider"


@pytest.fixture(scope="session")
def independent_op():
    """node-oidc-provider (certified, from npm) as a real server on loopback: its issuer URL.
    `make test` installs it; plain pytest without it skips, saying how to get it."""
    import shutil

    if shutil.which("node") is None:
        pytest.skip("node is missing: install Node.js (Debian: apt-get install nodejs npm), then `make test`")
    if not (OP_DIR / "node_modules" / "oidc-provider").exists():
        pytest.skip("node-oidc-provider is missing: `make test` installs it (npm ci in tests/oidc_provider)")
    proc = subprocess.Popen(["node", "server.mjs"], cwd=OP_DIR, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    line = proc.stdout.readline()
    assert line, "node-oidc-provider did not start"
    yield json.loads(line)["issuer"]
    stop_process(proc)


def self_signed_certificate(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for `host` (an IP address or a name) that is its own CA, and its key: a TLS
    server of the test's own that a client trusts by naming the certificate (kubectl's
    certificate-authority, the daemon's SSL_CERT_FILE)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([alt]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{host}.crt", folder / f"{host}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path
