"""Cold start to ready, and memory with 50 profiles each holding a token.

  * cold start: from spawning `iapd serve` to its READY=1 (what systemd and iapctl's autostart
    wait for), median of several starts; goal ≤ 300 ms (issue 25). Heavy imports (Secret Manager's client,
    cryptography, the emulator) must stay lazy for this.
  * memory: RSS of a daemon with 50 profiles (50 audiences), after every one has fetched its
    token from the emulator; goal ≤ 60 MiB. Measured twice: 50 user profiles sharing one login
    (a person with many IAP-protected apps), and 50 key-file profiles (CI; signing JWTs loads
    the cryptography library).

    .venv/bin/python bench/daemon_resources.py [--starts 7] [--profiles 50]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import rss_mib, start_daemon, start_emulator, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client"))
from iapctl import wire  # noqa: E402


def cold_starts(folder: Path, config: Path, count: int) -> list[float]:
    times = []
    for i in range(count):
        notify = folder / f"notify-{i}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(str(notify))
        listener.settimeout(30)
        env = {**os.environ, "IAPD_CONFIG": str(config), "IAPD_SOCKET": str(folder / "cold" / "s.sock"),
               "XDG_STATE_HOME": str(folder / "cold-state"), "NOTIFY_SOCKET": str(notify)}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "iapd", "serve", "--log-level", "warning"], env=env)
        while b"READY=1" not in listener.recv(4096):
            pass
        times.append(time.perf_counter() - started)
        listener.close()
        stop(proc)
    return times


def measure(folder: Path, config: Path, name: str, profiles: str, count: int, login: bool) -> tuple[float, float, int]:
    many = folder / f"{name}.toml"
    many.write_text(config.read_text() + profiles)
    (folder / name).mkdir()
    daemon, env = start_daemon(folder / name, many)
    try:
        idle = rss_mib(daemon.pid)
        if login:
            subprocess.run([sys.executable, "-m", "iapctl", "login", "p0"], check=True, capture_output=True,
                           env={**env, "BROWSER": "curl -sSL -o /dev/null %s"})
        for i in range(count):
            resp = wire.request(env["IAPD_SOCKET"], "GET", f"/v1/token/p{i}")
            assert resp.status == 200, resp.body
        loaded = rss_mib(daemon.pid)
        status = json.loads(wire.request(env["IAPD_SOCKET"], "GET", "/v1/status").body)
        ready = sum(1 for p in status["profiles"] if p["state"] == "ready")
    finally:
        stop(daemon)
    return idle, loaded, ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=7)
    parser.add_argument("--profiles", type=int, default=50)
    args = parser.parse_args()
    n = args.profiles
    with tempfile.TemporaryDirectory(prefix="iapd-res-") as tmp:
        folder = Path(tmp)
        emulator, info, config = start_emulator(folder, "--extra-iap-clients", str(n))
        adc, key = folder / "emulator-adc.json", folder / "emulator-sa-key.json"
        users = "".join(
            f'\n[profiles.p{i}]\naudience = "123456789012-iap-{i}.apps.googleusercontent.com"\n[profiles.p{i}.user]\n'
            f'client_id = "{info["desktop_client_id"]}"\n'
            'client_secret_name = "projects/iapd-demo/secrets/iap-desktop-client-secret/versions/latest"\n'
            f'secret_manager_credentials = "{adc}"\n' for i in range(n))
        keys = "".join(f'\n[profiles.p{i}]\naudience = "audience-{i}.example.com"\n[profiles.p{i}.service_account]\n'
                       f'kind = "key_file"\nkey_file = "{key}"\n' for i in range(n))
        try:
            starts = cold_starts(folder, config, args.starts)
            results = {"user profiles": measure(folder, config, "users", users, n, login=True),
                       "key-file profiles": measure(folder, config, "keys", keys, n, login=False)}
        finally:
            stop(emulator)
    median = statistics.median(starts)
    print(f"cold start to READY=1: median {median * 1000:.0f} ms (min {min(starts) * 1000:.0f}, "
          f"max {max(starts) * 1000:.0f}, {len(starts)} starts) — {'meets' if median <= 0.3 else 'MISSES'} ≤ 300 ms")
    for name, (idle, loaded, ready) in results.items():
        print(f"RSS with {n} {name}: {idle:.1f} MiB before any token, {loaded:.1f} MiB with {ready} tokens cached"
              f" — {'meets' if loaded <= 60 else 'MISSES'} ≤ 60 MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
