"""How much does `iapctl token PROFILE` cost, compared with starting Python at all?

Runs the emulator and a warm daemon, then times, interleaved (A B C A B C …, so drift and noise
hit every variant alike):
  A  `python -c pass` with the same interpreter (the floor: starting Python);
  B  the installed `iapctl token demo-user` (a cache hit on a warm daemon);
  C  the same call through pip's generic console-script wrapper (what we would ship without
     our own launcher), to show what the launcher saves;
  D  flyte-iap's drop-in `iapctl generate-user-id-token --desktop_client_id … (4 flags)`;
  E  flyte-iap's drop-in `iapctl generate-service-account-id-token --webapp_client_id … --service_account_key …`;
  F  `iapctl token demo-user` through a symlink to the launcher, as pipx puts it on PATH;
and the same for `iapctl status`. Prints medians and ratios to A. Then, where valgrind is
installed, the instructions each run executes (callgrind, children included: the launcher's sh
and the Python it execs) — a figure the machine's load cannot move. Goals (issue 25): B, D, E
≤ 1.0 × A in wall time and ≤ 0.95 × A in instructions.

    .venv/bin/python bench/client_latency.py [--pairs 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import start_daemon, start_emulator, stop  # noqa: E402

GOAL = 1.0
DROP_IN_GOAL = 1.0
INSTRUCTIONS_GOAL = 0.95
WRAPPER = ("import re, sys\nfrom iapctl.cli import main\n"
           "sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\nsys.exit(main())")


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed: {done.stderr.decode()}")
    return elapsed


def start_stack(tmp: Path) -> tuple[list[subprocess.Popen], dict, Path]:
    emulator, _, config = start_emulator(tmp)
    daemon, env = start_daemon(tmp, config)
    login_env = {**env, "BROWSER": "curl -sSL -o /dev/null %s"}
    subprocess.run([sys.executable, "-m", "iapctl", "login", "demo-user"], env=login_env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [daemon, emulator], env, Path(config).parent


def drop_ins(iapctl: str, folder: Path) -> dict[str, list[str]]:
    """flyte-iap's own command lines, as a proxyCommand would hold them (the emulator's ids)."""
    iap, desktop = "123456789012-iap.apps.googleusercontent.com", "123456789012-desktop.apps.googleusercontent.com"
    return {
        "D  iapctl generate-user-id-token (drop-in)": [
            iapctl, "generate-user-id-token", "--desktop_client_id", desktop, "--desktop_client_secret_gcp_secret_name",
            "iap-desktop-client-secret", "--webapp_client_id", iap, "--project", "iapd-demo"],
        "E  iapctl generate-service-account-id-token": [
            iapctl, "generate-service-account-id-token", "--webapp_client_id", iap,
            "--service_account_key", str(folder / "emulator-sa-key.json")],
    }


def installed_venv(root: Path) -> Path:
    """A regular (not editable) install of this checkout, as pip or pipx would make it for a user.
    The client needs no dependencies, so `--no-deps` keeps this quick; rebuilt on every run."""
    venv = root / "build" / "bench-venv"
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # Byte-compiled, as pip installs for users: with PYTHONDONTWRITEBYTECODE set (as on our CI
    # machines) pip skips it, and every run would compile iapctl's sources anew.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", str(root / "client"), str(root)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(venv / "lib")], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    return venv / "bin"


def instructions(cmd: list[str], env: dict, scratch: Path) -> int | None:
    """Instructions executed by `cmd` and every process it starts (callgrind), or None without valgrind."""
    if shutil.which("valgrind") is None:
        return None
    for old in scratch.glob("cg.*"):
        old.unlink()
    subprocess.run(["valgrind", "--tool=callgrind", "--trace-children=yes", f"--callgrind-out-file={scratch}/cg.%p",
                    *cmd], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    total = 0
    for out in scratch.glob("cg.*"):
        for line in out.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total += int(line.split()[1])
                break
    return total


def report(name: str, samples: dict[str, list[float]], floor: str) -> dict[str, float]:
    base = statistics.median(samples[floor])
    print(f"\n{name}")
    ratios = {}
    for label, values in samples.items():
        med = statistics.median(values)
        ratios[label] = med / base
        print(f"  {label:44} median {med * 1000:7.2f} ms   p90 {sorted(values)[int(len(values) * 0.9)] * 1000:7.2f} ms"
              f"   ×{med / base:.3f}")
    return ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50, help="rounds of interleaved runs (default: %(default)s, min 30)")
    args = parser.parse_args()
    pairs = max(args.pairs, 30)
    bin_dir = installed_venv(Path(__file__).resolve().parent.parent)
    python, iapctl = str(bin_dir / "python"), str(bin_dir / "iapctl")
    with tempfile.TemporaryDirectory(prefix="iapd-bench-") as tmp:
        procs, env, folder = start_stack(Path(tmp))
        try:
            link = Path(tmp) / "local-bin" / "iapctl"  # pipx's ~/.local/bin/iapctl
            link.parent.mkdir()
            link.symlink_to(iapctl)
            variants = {
                "A  python -c pass": [python, "-c", "pass"],
                "B  iapctl token demo-user": [iapctl, "token", "demo-user"],
                "C  iapctl token via generic console wrapper": [python, "-c", WRAPPER, "token", "demo-user"],
                **drop_ins(iapctl, folder),
                "F  iapctl token via pipx's symlink": [str(link), "token", "demo-user"],
            }
            status = {"A  python -c pass": variants["A  python -c pass"],
                      "B  iapctl status": [iapctl, "status"]}
            for cmd in [*variants.values(), *status.values()]:  # warm the page cache and .pyc files
                timed(cmd, env)
            token_samples = {k: [] for k in variants}
            status_samples = {k: [] for k in status}
            for _ in range(pairs):
                for label, cmd in variants.items():
                    token_samples[label].append(timed(cmd, env))
                for label, cmd in status.items():
                    status_samples[label].append(timed(cmd, env))
            counted = {label: instructions(cmd, env, Path(tmp)) for label, cmd in
                       {**variants, "G  iapctl status": status["B  iapctl status"]}.items()}
        finally:
            stop(*procs)
    print(f"{pairs} interleaved rounds on {os.cpu_count()} cores; iapctl installed (not editable) in {bin_dir}, "
          f"Python {sys.version.split()[0]}")
    token = report("iapctl token (warm daemon, cache hit)", token_samples, "A  python -c pass")
    report("iapctl status", status_samples, "A  python -c pass")
    ratio = token["B  iapctl token demo-user"]
    verdict = "meets" if ratio <= GOAL else "MISSES"
    print(f"\niapctl token / python -c pass = {ratio:.3f} ({verdict} the goal of ≤ {GOAL}); "
          f"flyte-iap measured ~1070 ms per call for comparison")
    for label in [k for k in token if k[0] in "DE"]:
        verdict = "meets" if token[label] <= DROP_IN_GOAL else "MISSES"
        print(f"{label[3:]} / python -c pass = {token[label]:.3f} ({verdict} the goal of ≤ {DROP_IN_GOAL})")
    floor = counted["A  python -c pass"]
    if floor is None:
        print("\ninstructions: skipped (valgrind is not installed: apt-get install valgrind)")
        return 0
    print("\ninstructions (callgrind, children included; the same total run after run)")
    for label, count in counted.items():
        goal = "" if label[0] not in "BDE" else \
            f"   ({'meets' if count / floor <= INSTRUCTIONS_GOAL else 'MISSES'} ≤ {INSTRUCTIONS_GOAL})"
        print(f"  {label:44} {count / 1e6:7.1f} M   ×{count / floor:.3f}{goal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
