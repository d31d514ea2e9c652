"""The release artefacts: `python -m build` makes a wheel and an sdist without warnings, and the
wheel installs into a fresh virtual environment (what `pipx install iapd-….whl` does) and runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_built_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    # Not ours: the machine's pip config (index locations) and PYTHONDONTWRITEBYTECODE (byte-compiling).
    theirs = ("Location 'file://", "byte-compiling is disabled")
    noise = [line for line in (built.stdout + built.stderr).splitlines()
             if "warning" in line.lower() and not any(t in line for t in theirs)]
    assert noise == [], noise
    [wheel] = dist.glob("iapd-*.whl")
    [sdist] = dist.glob("iapd-*.tar.gz")
    assert sdist.stat().st_size > 10_000

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-deps: iapctl is standard library only, and `iapd --help` needs nothing either.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    iapctl, iapd = venv / "bin" / "iapctl", venv / "bin" / "iapd"
    assert iapctl.read_text().startswith(f"#!{venv}/bin/python")  # our launcher, with its interpreter
    ours = subprocess.run([str(iapctl), "--version"], capture_output=True, text=True, timeout=30)
    theirs = subprocess.run([str(iapd), "--version"], capture_output=True, text=True, timeout=30)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout.split()[1] == theirs.stdout.split()[1]
    assert "serve" in subprocess.run([str(iapd), "--help"], capture_output=True, text=True, timeout=30).stdout
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "IAPD_SOCKET": str(tmp_path / "none" / "iapd.sock"),
           "IAPD_AUTOSTART": "0"}
    token = subprocess.run([str(iapctl), "token", "x"], capture_output=True, text=True, env=env, timeout=30)
    assert token.returncode == 3 and token.stdout == "" and "iapd is not running" in token.stderr
    units = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.resources as r; print(sorted(p.name for p in r.files('iapctl.units').iterdir()))"],
                           capture_output=True, text=True, timeout=30)
    assert "iapd.socket" in units.stdout and "dev.iapd.agent.plist" in units.stdout, units.stderr
