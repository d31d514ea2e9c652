"""A signed-JWT profile from a key file over a simulated day: tokens minted, calls to Google.

The daemon's clocks are shifted a minute at a time (its test clock: a day in seconds) while a
client asks for `demo-jwt` every simulated minute, beside `demo-sa` (the same key, Google-issued
ID tokens through the token endpoint) for comparison. Reports per simulated hour: JWTs minted,
and calls the emulated Google saw from each profile (expected for the JWT: zero).

    .venv/bin/python bench/signed_jwt.py [--hours 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import start_daemon, start_emulator, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "client"))
from iapctl import wire  # noqa: E402

GOOGLE = ("token", "iam_credentials", "iam_sign_jwt", "metadata", "metadata_token", "sts", "sa_certs")


def google_calls(info: dict) -> dict:
    import urllib.request

    with urllib.request.urlopen(info["control_url"], timeout=10) as resp:
        counters = json.load(resp)["counters"]
    return {k: counters.get(k, 0) for k in GOOGLE}


def settle(sock: str, profile: str) -> None:
    """A simulated minute passes in a millisecond: a renewal that is due is given the real time a
    round trip takes (as it would have minutes), else the next minute finds it still in flight."""
    def state() -> dict:
        status = json.loads(wire.request(sock, "GET", "/v1/status").body)
        return next(p for p in status["profiles"] if p["name"] == profile)

    first = state()
    deadline = time.monotonic() + 5
    while first["next_renewal_in"] == 0 and time.monotonic() < deadline:
        if state()["refresh_count"] != first["refresh_count"]:
            return
        time.sleep(0.005)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=24.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iapd-jwt-") as tmp:
        folder = Path(tmp)
        emulator, info, config = start_emulator(folder)
        daemon, env = start_daemon(folder, config, test_clock=True)
        sock = env["IAPD_SOCKET"]
        try:
            minted = {}
            minutes = int(args.hours * 60)
            for i, profile in enumerate(("demo-jwt", "demo-sa")):
                before = google_calls(info)
                # Clocks only move forward (a monotonic clock never goes back): the second profile's
                # day follows the first's.
                for minute in range(i * (minutes + 1), (i + 1) * (minutes + 1)):
                    body = json.dumps({"wall_offset": minute * 60, "mono_offset": minute * 60}).encode()
                    assert wire.request(sock, "POST", "/v1/test/clock", body).status == 200
                    assert wire.request(sock, "GET", f"/v1/token/{profile}").status == 200
                    settle(sock, profile)
                status = json.loads(wire.request(sock, "GET", "/v1/status").body)
                count = next(p for p in status["profiles"] if p["name"] == profile)["refresh_count"]
                after = google_calls(info)
                calls = sum(after.values()) - sum(before.values())
                minted[profile] = (count, calls)
        finally:
            stop(daemon, emulator)
    for profile, (count, calls) in minted.items():
        print(f"{profile:9} {args.hours:g} h: {count} tokens minted ({count / args.hours:.2f}/h), "
              f"{calls} calls to Google ({calls / args.hours:.2f}/h)")
    jwt_calls = minted["demo-jwt"][1]
    print("signed JWT from a key file: zero calls to Google" if jwt_calls == 0 else f"FAIL: {jwt_calls} calls")
    return 0 if jwt_calls == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
