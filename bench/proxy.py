"""The local proxy against going straight to the app, side by side in one run.

The app is the emulator's echo backend; "direct" sends the token itself, "proxy" goes through
`[profiles.demo-sa.proxy]`, which adds it. A load generator (aiohttp, its own process) runs
`--seconds` per case at 1 and 64 concurrent clients and reports requests per second and p99
latency. Then the daemon's memory with 10 proxies listening against none.

Goals (issue 22): proxy ≥ 0.7× the direct rate; p99 ≤ 2× direct + 2 ms; 10 proxies ≤ 5 MiB.

    .venv/bin/python bench/proxy.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import free_port, rss_mib, start_daemon, start_emulator, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client"))
from iapctl import wire  # noqa: E402

LOAD = r'''
import asyncio, json, sys, time
import aiohttp

async def main(url, token, concurrency, seconds):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - start)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    print(json.dumps({"rps": len(latencies) / elapsed, "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
'''


def load(url: str, token: str, concurrency: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, url, token, str(concurrency), str(seconds)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory(prefix="iapd-proxy-") as tmp:
        folder = Path(tmp)
        emulator, info, config = start_emulator(folder)
        port = free_port()
        proxied = folder / "proxied.toml"
        proxied.write_text(config.read_text() + f'\n[profiles.demo-sa.proxy]\nlisten = "127.0.0.1:{port}"\n'
                                                f'upstream = "{info["backend_url"]}"\n')
        daemon, env = start_daemon(folder, proxied)
        try:
            token = wire.request(env["IAPD_SOCKET"], "GET", "/v1/token/demo-sa").body.decode()
            print(f"{'clients':>7}  {'direct rps':>10}  {'proxy rps':>9}  {'ratio':>5}  {'direct p99':>10}  {'proxy p99':>9}")
            for concurrency in (1, 64):
                direct = load(info["backend_url"] + "/x", token, concurrency, args.seconds)
                through = load(f"http://127.0.0.1:{port}/x", "", concurrency, args.seconds)
                ratio = through["rps"] / direct["rps"]
                p99_ok = through["p99_ms"] <= 2 * direct["p99_ms"] + 2
                ok = ok and ratio >= 0.7 and p99_ok
                print(f"{concurrency:>7}  {direct['rps']:>10.0f}  {through['rps']:>9.0f}  {ratio:>5.2f}  "
                      f"{direct['p99_ms']:>8.1f}ms  {through['p99_ms']:>7.1f}ms"
                      f"{'' if ratio >= 0.7 and p99_ok else '   (goal: ≥ 0.7×, p99 ≤ 2× + 2 ms)'}")
        finally:
            stop(daemon)

        # Memory: the same daemon with no proxy, then with 10 listening (each warmed by one request).
        plain, env = start_daemon(folder, config)
        wire.request(env["IAPD_SOCKET"], "GET", "/v1/token/demo-sa")
        time.sleep(0.5)
        without = rss_mib(plain.pid)
        stop(plain)
        ten = folder / "ten.toml"
        ports = [free_port() for _ in range(10)]
        text = config.read_text()
        for i, p in enumerate(ports):
            text += (f'\n[profiles.p{i}]\naudience = "{info["iap_client_id"]}"\n[profiles.p{i}.service_account]\n'
                     f'kind = "key_file"\nkey_file = "{folder / "emulator-sa-key.json"}"\n'
                     f'[profiles.p{i}.proxy]\nlisten = "127.0.0.1:{p}"\nupstream = "{info["backend_url"]}"\n')
        ten.write_text(text)
        many, env = start_daemon(folder, ten)
        import urllib.request

        wire.request(env["IAPD_SOCKET"], "GET", "/v1/token/demo-sa")
        for p in ports:
            urllib.request.urlopen(f"http://127.0.0.1:{p}/x", timeout=10).read()
        time.sleep(0.5)
        with_ten = rss_mib(many.pid)
        stop(many, emulator)
    grown = with_ten - without
    ok = ok and grown <= 5
    print(f"daemon RSS: {without:.1f} MiB without proxies, {with_ten:.1f} MiB with 10 listening "
          f"(+{grown:.1f} MiB; goal ≤ 5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
