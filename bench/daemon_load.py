"""Throughput and latency of the daemon under 64 concurrent clients, against a bare aiohttp
handler on a unix socket measured in the same run (same load generator, same machine).

Every request opens a new connection, as `iapctl token` does, and sends iapctl's exact bytes.
The load generator is a separate process (uvloop, raw sockets); on a 2-core machine it competes
with the server for CPU — equally for both servers, so the ratio is the figure to read.
Goals: ≥ 0.8× the bare handler's requests/s, p99 ≤ 50 ms.

    .venv/bin/python bench/daemon_load.py [--seconds 5] [--rounds 2] [--clients 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import start_daemon, start_emulator, stop  # noqa: E402

BARE = """
import asyncio, os, sys
import uvloop
from aiohttp import web

TOKEN = "x" * 900

async def handle(request):
    return web.Response(text=TOKEN, content_type="text/plain")

async def main(path):
    app = web.Application()
    app.router.add_get("/v1/token/{profile}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

uvloop.run(main(sys.argv[1]))
"""

LOAD = """
import asyncio, json, sys, time
import uvloop

path, profile, clients, seconds, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
REQUEST = f"GET /v1/token/{profile} HTTP/1.1\\r\\nHost: iapd\\r\\nConnection: close\\r\\nUser-Agent: iapctl\\r\\n{extra}\\r\\n".encode()

async def client(deadline, latencies, errors):
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(REQUEST)
            data = await reader.read()
            writer.close()
            if not data.startswith(b"HTTP/1.1 200"):
                errors.append(data[:40])
                continue
        except OSError as exc:
            errors.append(str(exc))
            continue
        latencies.append(time.perf_counter() - start)

async def main():
    latencies, errors = [], []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(client(deadline, latencies, errors) for _ in range(clients)))
    print(json.dumps({"latencies": latencies, "errors": len(errors), "seconds": seconds}))

uvloop.run(main())
"""


def run_load(socket_path: str, profile: str, clients: int, seconds: float, extra_header: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, socket_path, profile, str(clients), str(seconds), extra_header],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    lat = sorted(result["latencies"])
    return {"rps": len(lat) / seconds, "p50": lat[len(lat) // 2] * 1000, "p99": lat[int(len(lat) * 0.99)] * 1000,
            "errors": result["errors"], "n": len(lat)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iapd-load-") as tmp:
        folder = Path(tmp)
        emulator, _, config = start_emulator(folder)
        daemon, env = start_daemon(folder, config)
        bare_path = str(folder / "bare.sock")
        bare = subprocess.Popen([sys.executable, "-c", BARE, bare_path], stdout=subprocess.PIPE, text=True)
        bare.stdout.readline()
        try:
            run_load(env["IAPD_SOCKET"], "demo-sa", 4, 0.5)  # warm: the token is fetched and cached
            results: dict[str, list[dict]] = {"iapd serve": [], "bare aiohttp": [], "iapd, aiohttp path": []}
            for _ in range(args.rounds):  # interleaved, so drift hits all alike
                results["iapd serve"].append(run_load(env["IAPD_SOCKET"], "demo-sa", args.clients, args.seconds))
                results["bare aiohttp"].append(run_load(bare_path, "demo-sa", args.clients, args.seconds))
                # Any request that is not exactly iapctl's (here: an extra header) skips the fast
                # path and goes through aiohttp, middleware and all: what curl gets.
                results["iapd, aiohttp path"].append(run_load(env["IAPD_SOCKET"], "demo-sa", args.clients,
                                                              args.seconds, "Content-Length: 0\r\n"))
            status = json.loads(subprocess.run([sys.executable, "-m", "iapctl", "status", "--json"], env=env,
                                               capture_output=True, text=True).stdout)
        finally:
            stop(bare, daemon, emulator)
    print(f"{args.clients} concurrent clients, a new connection per request, {args.rounds}×{args.seconds:.0f} s each:")
    summary = {}
    for name, runs in results.items():
        rps = sum(r["rps"] for r in runs) / len(runs)
        p50 = sum(r["p50"] for r in runs) / len(runs)
        p99 = max(r["p99"] for r in runs)
        errors = sum(r["errors"] for r in runs)
        summary[name] = rps
        print(f"  {name:20} {rps:8.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   errors {errors}")
    ratio = summary["iapd serve"] / summary["bare aiohttp"]
    slow_ratio = summary["iapd, aiohttp path"] / summary["bare aiohttp"]
    p99 = max(r["p99"] for r in results["iapd serve"])
    sa = next(p for p in status["profiles"] if p["name"] == "demo-sa")
    print(f"iapd / bare = {ratio:.2f}× ({'meets' if ratio >= 0.8 else 'MISSES'} ≥ 0.8); "
          f"iapd p99 {p99:.1f} ms ({'meets' if p99 <= 50 else 'MISSES'} ≤ 50 ms); "
          f"aiohttp path / bare = {slow_ratio:.2f}×; refreshes during the run: {sa['refresh_count']}, requests that waited on the IdP: {sa['waited_requests']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
