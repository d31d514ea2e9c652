"""Shared by the benchmarks: start the emulator and a daemon on temp paths, wait for READY=1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def start_emulator(folder: Path, *args: str) -> tuple[subprocess.Popen, dict, Path]:
    config = folder / "config.toml"
    proc = subprocess.Popen([sys.executable, "-m", "iapd", "emulator", "--write-config", str(config), *args],
                            stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline()), config


def start_daemon(folder: Path, config: Path, settings: str = "", test_clock: bool = False) -> tuple[subprocess.Popen, dict]:
    """`iapd serve` with its own socket and state; `settings` go into a [daemon] section;
    `test_clock`: the daemon's clocks can be shifted (POST /v1/test/clock), to play hours in seconds."""
    if settings:
        text = config.read_text()
        config = folder / "bench.toml"
        config.write_text(f"[daemon]\n{settings}\n{text}")
    env = {**os.environ, "IAPD_CONFIG": str(config), "IAPD_SOCKET": str(folder / "run" / "iapd.sock"),
           "XDG_STATE_HOME": str(folder / "state"), "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0"}
    notify = folder / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(30)
    proc = subprocess.Popen([sys.executable, "-m", "iapd", "serve", "--log-level", os.environ.get("IAPD_BENCH_LOG", "warning"),
                             *(["--test-clock"] if test_clock else [])],
                            env={**env, "NOTIFY_SOCKET": str(notify)})
    while b"READY=1" not in listener.recv(4096):
        pass
    listener.close()
    notify.unlink()
    return proc, env


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def rss_mib(pid: int) -> float:
    """A process's resident memory now, in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def free_port() -> int:
    """A loopback TCP port nobody listens on (for a listener a config names)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
