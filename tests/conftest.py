"""Fixtures that run the real things: the emulator as a subprocess over HTTP, and (in the daemon
tests) `iapd serve` as a subprocess on a real unix socket."""

from __future__ import annotations

import json
import subprocess
import sys
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
        self.settings(token_lifetime=3600, clock_offset=0, approve="auto", rotate_refresh_tokens=False)
        self._post("clear_faults")
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
