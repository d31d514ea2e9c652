"""`make demo`: the whole flow against the emulator, narrated. Needs no Google account.

emulator (Google + IAP) → iapd serve → iapctl login (a "browser" that follows redirects) →
iapctl token → a request through the emulated IAP → iapctl status → iapctl logout.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def run(*args: str, env: dict, prints_token: bool = False) -> subprocess.CompletedProcess:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ {shown}", flush=True)
    out = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=120)
    shown_out = out.stdout
    if prints_token and out.returncode == 0:
        # Even a demo token is not printed whole: its start, its length, and its claims.
        token = out.stdout.strip()
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        picked = {k: claims[k] for k in ("iss", "aud", "azp", "email", "exp") if k in claims}
        shown_out = f"{token[:16]}… ({len(token)} characters)\nclaims: {json.dumps(picked)}"
    for stream in (out.stderr, shown_out):
        if stream.strip():
            print("  " + stream.strip().replace("\n", "\n  "))
    if out.returncode != 0:
        raise SystemExit(f"demo failed: {shown} exited {out.returncode}")
    return out


def timed(cmd: list[str], env: dict, rounds: int = 20) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    return (time.perf_counter() - started) / rounds * 1000


def main() -> int:
    if not shutil.which("curl"):
        raise SystemExit("the demo uses curl as its 'browser': install curl first")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="iapd-demo-") as tmp:
        root = Path(tmp)
        config = root / "config.toml"
        # Everything lives in the temp dir: the demo never touches your own config or logins.
        env = {**os.environ, "IAPD_CONFIG": str(config), "IAPD_SOCKET": str(root / "run" / "iapd.sock"),
               "XDG_STATE_HOME": str(root / "state"), "BROWSER": "curl -sSL -o /dev/null %s",
               "IAPD_AUTOSTART": "0"}
        try:
            step("Start the emulator of Google's endpoints and of IAP (iapd emulator --write-config)")
            emulator = subprocess.Popen([str(BIN / "iapd"), "emulator", "--write-config", str(config)],
                                        stdout=subprocess.PIPE, text=True)
            procs.append(emulator)
            info = json.loads(emulator.stdout.readline())
            for key in ("token_url", "secret_manager_url", "iap_url"):
                print(f"  {key:20} {info[key]}")
            print(f"  config written to {config}:")
            print("    " + "\n    ".join(line for line in config.read_text().splitlines()[3:] if line))

            step("Start the agent (iapd serve) on its unix socket")
            notify = root / "notify"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            listener.bind(str(notify))
            listener.settimeout(30)
            daemon = subprocess.Popen([str(BIN / "iapd"), "serve"], env={**env, "NOTIFY_SOCKET": str(notify)},
                                      stderr=open(root / "iapd.log", "w"))
            procs.append(daemon)
            print("  " + listener.recv(4096).decode().replace("\n", "\n  "))
            listener.close()

            step("Log in once (the 'browser' is curl following redirects; the emulator auto-approves)")
            run(str(BIN / "iapctl"), "login", "demo-user", env=env)

            step("Get a token, as Flyte's proxyCommand would")
            token = run(str(BIN / "iapctl"), "token", "demo-user", env=env, prints_token=True).stdout.strip()
            token_ms = timed([str(BIN / "iapctl"), "token", "demo-user"], env)
            python_ms = timed([sys.executable, "-c", "pass"], env)
            print(f"  20 more calls: {token_ms:.1f} ms each, against {python_ms:.1f} ms for `python -c pass` "
                  "(flyte-iap: ~1070 ms).\n  This checkout's install is editable, which slows every import; "
                  "`make bench` measures a regular install, side by side.")

            step("Send it through the emulated IAP as proxy-authorization")
            request = urllib.request.Request(info["iap_url"] + "/api/v1/projects",
                                             headers={"Proxy-Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=10) as resp:
                echo = json.load(resp)
            print(f"  IAP answered {resp.status}; the app saw user {echo['user']!r}")

            step("A service-account profile (a key file the emulator issued) needs no login")
            run(str(BIN / "iapctl"), "token", "demo-sa", env=env, prints_token=True)

            step("The same key signing its own JWT for the app's URL (jwt_audience): no call to Google at all")
            run(str(BIN / "iapctl"), "token", "demo-jwt", env=env, prints_token=True)

            step("From an app's URL to a working profile: iapctl setup (IAP's redirect names its OAuth client)")
            run(str(BIN / "iapctl"), "setup", info["iap_url"] + "/", "--profile", "app", env=env)
            run(str(BIN / "iapctl"), "doctor", info["iap_url"] + "/", "--profile", "app", env=env)

            step("A local proxy that adds the token, for tools that cannot run a command ([profiles.P.proxy])")
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            with open(config, "a") as fh:
                fh.write(f'\n[profiles.demo-sa.proxy]\nlisten = "127.0.0.1:{port}"\nupstream = "{info["iap_url"]}"\n')
            run(str(BIN / "iapctl"), "reload", env=env)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/projects", timeout=10) as resp:
                echo = json.load(resp)
            print(f"  $ curl http://127.0.0.1:{port}/api/v1/projects\n  IAP answered {resp.status}; the app saw "
                  f"user {echo['user']!r}")

            step("Status: what the agent holds and when it renews (never a token)")
            run(str(BIN / "iapctl"), "status", env=env)

            step("Log out: revoke at Google, wipe the store, drop cached tokens")
            run(str(BIN / "iapctl"), "logout", "--all", env=env)
            print("\nDone. Point IAPD_CONFIG at a config of your own to use real Google (see README).")
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
