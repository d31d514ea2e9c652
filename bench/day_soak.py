"""100 profiles over 24 simulated hours, with the emulator's one-hour tokens.

The daemon's clocks (its test clock) and the emulator's (`clock_offset`) move together a minute
at a time, so a day passes in about a minute of real time; each simulated minute every profile is
asked for its token once. A renewal that is due is given the real time a round trip takes before
the next minute (else compressed minutes outrun it: see bench/signed_jwt.py). Reports, against the
goals of issue 25: calls to the IdP per audience against the day's lifetimes + 1, requests that
had to wait on the IdP after the first fetch (goal 0), and the daemon's RSS after the first
simulated hour and at the end (goal: flat within 2 MiB).

    .venv/bin/python bench/day_soak.py [--profiles 100] [--hours 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import rss_mib, start_daemon, start_emulator, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client"))
from iapctl import wire  # noqa: E402


def post(info: dict, action: str, body: dict) -> None:
    request = urllib.request.Request(f"{info['control_url']}/{action}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=100)
    parser.add_argument("--hours", type=int, default=24)
    args = parser.parse_args()
    names = [f"p{i:03d}" for i in range(args.profiles)]
    with tempfile.TemporaryDirectory(prefix="iapd-soak-") as tmp:
        folder = Path(tmp)
        emulator, info, config = start_emulator(folder)
        text = config.read_text()
        for i, name in enumerate(names):  # one key, an audience each: 100 cache entries
            text += (f'\n[profiles.{name}]\naudience = "aud-{i:03d}"\n[profiles.{name}.service_account]\n'
                     f'kind = "key_file"\nkey_file = "{folder / "emulator-sa-key.json"}"\n')
        config.write_text(text)
        daemon, env = start_daemon(folder, config, test_clock=True)
        sock = env["IAPD_SOCKET"]
        try:
            for name in names:  # the first fetch of each: not counted as waiting
                assert wire.request(sock, "GET", f"/v1/token/{name}").status == 200
            first = {p["name"]: p for p in json.loads(wire.request(sock, "GET", "/v1/status").body)["profiles"]}
            rss_hour = None
            started = time.monotonic()
            for minute in range(1, args.hours * 60 + 1):
                post(info, "settings", {"clock_offset": minute * 60})
                body = json.dumps({"wall_offset": minute * 60, "mono_offset": minute * 60}).encode()
                assert wire.request(sock, "POST", "/v1/test/clock", body).status == 200
                for name in names:
                    assert wire.request(sock, "GET", f"/v1/token/{name}").status == 200, name
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # due renewals land before the next minute
                    profiles = json.loads(wire.request(sock, "GET", "/v1/status").body)["profiles"]
                    if all(p["next_renewal_in"] != 0 for p in profiles if p["name"] in first):
                        break
                    time.sleep(0.005)
                if minute == 60:
                    rss_hour = rss_mib(daemon.pid)
            elapsed = time.monotonic() - started
            rss_end = rss_mib(daemon.pid)
            status = {p["name"]: p for p in json.loads(wire.request(sock, "GET", "/v1/status").body)["profiles"]}
        finally:
            stop(daemon, emulator)
    refreshes = [status[n]["refresh_count"] for n in names]
    waited = sum(status[n]["waited_requests"] - first[n]["waited_requests"] for n in names)
    lifetimes = args.hours  # one-hour tokens
    print(f"{args.profiles} profiles, {args.hours} simulated hours in {elapsed:.0f} s of real time, "
          f"{args.profiles * args.hours * 60} requests")
    print(f"calls to the IdP per audience: min {min(refreshes)}, max {max(refreshes)} (lifetimes + 1 = {lifetimes + 1}; "
          f"the default policy renews with 25 % of a token's life left: ~{args.hours * 60 / 46.5:.0f} expected)")
    print(f"requests that waited on the IdP after the first fetch: {waited} (goal 0)")
    print(f"daemon RSS: {rss_hour:.1f} MiB after the first hour, {rss_end:.1f} MiB at the end "
          f"({rss_end - rss_hour:+.1f} MiB; goal within 2)")
    return 0 if waited == 0 and abs(rss_end - rss_hour) <= 2 else 1


if __name__ == "__main__":
    sys.exit(main())
