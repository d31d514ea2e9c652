"""100 profiles over 24 simulated hours, with the emulator's one-hour tokens.

The daemon's clocks (its test clock) and the emulator's (`clock_offset`) move together a minute
at a time, so a day passes in about a minute of real time; each simulated minute every profile is
asked for its token once. A renewal that is due is given the real time a round trip takes before
the next minute (else compressed minutes outrun it: see bench/signed_jwt.py). Reports, against the
goals of issue 25: calls to the IdP per audience against the day's lifetimes + 1, requests that
had to wait on the IdP after the first fetch (goal 0), and the daemon's RSS after the first
simulated hour and at the end (goal: flat within 2 MiB) — for the default renewal policy and for
a lean one (POLICIES), since the two promises pull apart: see README "Measured".

    .venv/bin/python bench/day_soak.py [--profiles 100] [--hours 24] [--policy default|lean|both]
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


# The default renews with max(300 s, 25 %) of a token's life left (12–15 minutes for Google's
# one-hour tokens): a quarter of an hour of an IdP outage during which the valid token is still
# served and retries run. "Lean" renews two minutes before the end and keeps a 30 s margin: as
# near "one call per lifetime" as a margin allows, riding out only a minute or so of outage.
# (The margin is narrower than the default's 60 s because this bench moves time a minute at a
# step: window − margin must be wider than a step, or a step jumps from "not due" straight to
# "not servable", which real time never does.)
POLICIES = {"default": "", "lean": "renew_before_seconds = 120\nrenew_fraction = 0.01\nmargin_seconds = 30"}


def soak(policy: str, profiles: int, hours: int) -> dict:
    names = [f"p{i:03d}" for i in range(profiles)]
    with tempfile.TemporaryDirectory(prefix="iapd-soak-") as tmp:
        folder = Path(tmp)
        emulator, info, config = start_emulator(folder)
        text = config.read_text()
        for i, name in enumerate(names):  # one key, an audience each: 100 cache entries
            text += (f'\n[profiles.{name}]\naudience = "aud-{i:03d}"\n[profiles.{name}.service_account]\n'
                     f'kind = "key_file"\nkey_file = "{folder / "emulator-sa-key.json"}"\n')
        config.write_text(text)
        daemon, env = start_daemon(folder, config, settings=POLICIES[policy], test_clock=True)
        sock = env["IAPD_SOCKET"]
        try:
            for name in names:  # the first fetch of each: not counted as waiting
                assert wire.request(sock, "GET", f"/v1/token/{name}").status == 200
            first = {p["name"]: p for p in json.loads(wire.request(sock, "GET", "/v1/status").body)["profiles"]}
            rss_hour = None
            started = time.monotonic()
            for minute in range(1, hours * 60 + 1):
                post(info, "settings", {"clock_offset": minute * 60})
                body = json.dumps({"wall_offset": minute * 60, "mono_offset": minute * 60}).encode()
                assert wire.request(sock, "POST", "/v1/test/clock", body).status == 200
                for name in names:
                    assert wire.request(sock, "GET", f"/v1/token/{name}").status == 200, name
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # due renewals land before the next minute
                    status = json.loads(wire.request(sock, "GET", "/v1/status").body)["profiles"]
                    if all(p["next_renewal_in"] != 0 for p in status if p["name"] in first):
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
    return {"elapsed": elapsed, "refreshes": refreshes, "rss_hour": rss_hour, "rss_end": rss_end,
            "waited": sum(status[n]["waited_requests"] - first[n]["waited_requests"] for n in names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=100)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--policy", choices=[*POLICIES, "both"], default="both",
                        help="renewal policy: the default, lean (renew 2 minutes before the end), or both in turn")
    args = parser.parse_args()
    lifetimes = args.hours  # one-hour tokens
    ok = True
    for policy in POLICIES if args.policy == "both" else [args.policy]:
        r = soak(policy, args.profiles, args.hours)
        calls_ok = max(r["refreshes"]) <= lifetimes + 1
        print(f"[{policy} policy{': ' + POLICIES[policy].replace(chr(10), ', ') if POLICIES[policy] else ''}] "
              f"{args.profiles} profiles, {args.hours} simulated hours in {r['elapsed']:.0f} s of real time, "
              f"{args.profiles * args.hours * 60} requests")
        print(f"  calls to the IdP per audience: min {min(r['refreshes'])}, max {max(r['refreshes'])} — "
              f"{'meets' if calls_ok else 'above'} lifetimes + 1 = {lifetimes + 1}"
              + ("" if calls_ok else " (by design: renewing with 12–15 minutes left buys that much outage)"))
        print(f"  requests that waited on the IdP after the first fetch: {r['waited']} (goal 0)")
        print(f"  daemon RSS: {r['rss_hour']:.1f} MiB after the first hour, {r['rss_end']:.1f} MiB at the end "
              f"({r['rss_end'] - r['rss_hour']:+.1f} MiB; goal within 2)")
        ok = ok and r["waited"] == 0 and abs(r["rss_end"] - r["rss_hour"]) <= 2 and (policy == "default" or calls_ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
