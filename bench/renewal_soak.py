"""Renewal under steady use: short-lived tokens, many clients, minutes of wall time.

Emulator token lifetime 30 s; the daemon with its default renewal policy (what users run);
20 clients poll `demo-sa` and `demo-user` for 5 minutes. Reports, per audience:
  * refreshes at the IdP, against the token lifetimes the run spans (goal ≤ lifetimes + 1 in
    the strict reading; a policy that renews ahead of expiry needs more — see the note printed);
  * no herd: the most refreshes the IdP saw within any one second;
  * the least remaining lifetime of any token served (goal: never inside the mandatory margin);
  * requests that had to wait on the IdP after warm-up (goal 0).

    .venv/bin/python bench/renewal_soak.py [--minutes 5] [--lifetime 30] [--clients 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import start_daemon, start_emulator, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client"))
from iapctl import wire  # noqa: E402


def claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--lifetime", type=int, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between one client's requests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iapd-soak-") as tmp:
        folder = Path(tmp)
        emulator, info, config = start_emulator(folder, "--token-lifetime", str(args.lifetime))
        daemon, env = start_daemon(folder, config)
        socket_path = env["IAPD_SOCKET"]
        try:
            subprocess.run([sys.executable, "-m", "iapctl", "login", "demo-user"], check=True,
                           env={**env, "BROWSER": "curl -sSL -o /dev/null %s"}, capture_output=True)
            for profile in ("demo-user", "demo-sa"):  # warm-up: the first, cold fetch of each
                wire.request(socket_path, "GET", f"/v1/token/{profile}")
            start_status = json.loads(wire.request(socket_path, "GET", "/v1/status").body)
            margin_floor: dict[str, float] = {}
            issued: dict[str, set] = {"demo-user": set(), "demo-sa": set()}
            refresh_seconds: dict[str, Counter] = {"demo-user": Counter(), "demo-sa": Counter()}
            served = Counter()
            lock = threading.Lock()
            deadline = time.monotonic() + args.minutes * 60

            def poll(profile: str) -> None:
                while time.monotonic() < deadline:
                    resp = wire.request(socket_path, "GET", f"/v1/token/{profile}")
                    now = time.time()
                    token = resp.body.decode()
                    c = claims(token)
                    with lock:
                        served[profile] += 1
                        left = c["exp"] - now
                        margin_floor[profile] = min(margin_floor.get(profile, left), left)
                        if token not in issued[profile]:
                            issued[profile].add(token)
                            refresh_seconds[profile][int(c["iat"])] += 1
                    time.sleep(args.interval)

            threads = [threading.Thread(target=poll, args=("demo-user" if i % 2 else "demo-sa",))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            status = json.loads(wire.request(socket_path, "GET", "/v1/status").body)
            with urllib.request.urlopen(info["control_url"], timeout=10) as resp:
                counters = json.load(resp)["counters"]
        finally:
            stop(daemon, emulator)
    seconds = args.minutes * 60
    lifetimes = seconds / args.lifetime
    before = {p["name"]: p for p in start_status["profiles"]}
    print(f"{args.minutes:g} min, token lifetime {args.lifetime} s ({lifetimes:.0f} lifetimes), "
          f"{args.clients} clients every {args.interval} s, default renewal policy")
    audience = "123456789012-iap.apps.googleusercontent.com"
    idp = {"demo-user": counters.get(f"refresh:{audience}", 0), "demo-sa": counters.get(f"sa_id_token:{audience}", 0)}
    for p in status["profiles"]:
        name = p["name"]
        renewals = p["refresh_count"] - before[name]["refresh_count"]
        waited = p["waited_requests"] - before[name]["waited_requests"]
        print(f"  {name:9} served {served[name]:6}  IdP refreshes {idp[name]:3} (during the soak {renewals}; "
              f"lifetimes + 1 = {lifetimes + 1:.0f})  least lifetime left when served {margin_floor[name]:5.1f} s  "
              f"waited on the IdP after warm-up {waited}")
    herd = {name: max(counts.values()) for name, counts in refresh_seconds.items()}
    print(f"  herd check: most new tokens minted for one audience in any one second: {herd} (1 = no herd)")
    window = min(max(300, 0.25 * args.lifetime), args.lifetime / 2)
    margin = min(60, window / 2)
    print(f"note: for a {args.lifetime} s token the default policy renews with {0.8 * window:.1f}–{window:.1f} s left "
          f"and never serves one with less than {margin:.1f} s, so it renews every "
          f"~{args.lifetime - 0.9 * window:.0f} s: about {seconds / (args.lifetime - 0.9 * window):.0f} renewals "
          f"in this run by design (for Google's 1 h tokens: every ~47 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
