"""The release artefacts: two distributions, each built with `python -m build` without warnings
and installed into a fresh virtual environment — `iapctl` alone (what a project venv beside
flytekit, or a CI image, gets) and `iapd` with it (what `pipx install --include-deps iapd` makes)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not ours: the machine's pip config (index locations) and PYTHONDONTWRITEBYTECODE (byte-compiling).
THEIRS = ("Location 'file://", "byte-compiling is disabled")


def build(source: Path, dist: Path, name: str) -> tuple[Path, Path]:
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)], capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    noise = [line for line in (built.stdout + built.stderr).splitlines()
             if "warning" in line.lower() and not any(t in line for t in THEIRS)]
    assert noise == [], noise
    [wheel] = dist.glob(f"{name}-*.whl")
    [sdist] = dist.glob(f"{name}-*.tar.gz")
    return wheel, sdist


def fresh_venv(where: Path, *wheels: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    # --no-deps: iapctl has none, and `iapd --help` needs none of its own either.
    subprocess.run([str(where / "bin" / "pip"), "install", "-q", "--no-deps", *map(str, wheels)], check=True,
                   timeout=300)
    return where / "bin"


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    return build(ROOT / "client", dist, "iapctl"), build(ROOT, dist, "iapd")


def test_the_client_wheel_alone_has_no_dependencies_and_works(wheels, tmp_path):
    (wheel, sdist), _ = wheels
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist" not in metadata  # standard library only
    assert any(n.endswith("licenses/LICENSE") for n in names) and not any(n.startswith("iapd/") for n in names)
    bin_ = fresh_venv(tmp_path / "project", wheel)
    assert (bin_ / "iapctl").read_text().startswith("#!/bin/sh\n")  # our launcher (see its comments) …
    assert (bin_ / "iapctl-py").read_text().startswith(f"#!{bin_}/python")  # … and its normal start
    assert run(bin_ / "iapctl", "--version").stdout.startswith("iapctl ")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "IAPD_SOCKET": str(tmp_path / "none" / "iapd.sock"),
           "IAPD_AUTOSTART": "0"}
    token = run(bin_ / "iapctl", "token", "x", env=env)
    assert token.returncode == 3 and token.stdout == "" and "iapd is not running" in token.stderr
    api = run(bin_ / "python", "-c", "import iapctl, importlib.metadata as m; "
              "print(callable(iapctl.token), [e.value for e in m.entry_points(group='flytekit.auth')])")
    assert api.stdout.strip() == "True ['iapctl.flytekit_plugin:authenticator']", api.stderr
    assert not (bin_ / "iapd").exists()


def test_the_agent_wheel_brings_the_client_without_owning_its_files(wheels, tmp_path):
    (client, _), (agent, sdist) = wheels
    assert sdist.stat().st_size > 10_000
    with zipfile.ZipFile(agent) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: iapctl==" in metadata
    assert not any(n.startswith("iapctl/") or n.endswith("/iapctl") for n in names), "a second copy of the client"
    bin_ = fresh_venv(tmp_path / "agent", client, agent)
    ours, theirs = run(bin_ / "iapctl", "--version"), run(bin_ / "iapd", "--version")
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout.split()[1] == theirs.stdout.split()[1]
    assert "serve" in run(bin_ / "iapd", "--help").stdout
    units = run(bin_ / "python", "-c",
                "import importlib.resources as r; print(sorted(p.name for p in r.files('iapctl.units').iterdir()))")
    assert "iapd.socket" in units.stdout and "dev.iapd.agent.plist" in units.stdout, units.stderr


def test_the_launcher_starts_without_site_where_it_can_and_normally_anywhere_else(wheels, tmp_path):
    """In a venv (pip's layout, and pipx's through its symlink) Python runs without `site`: a
    sitecustomize planted in site-packages is not imported. A launcher copied where no venv is
    falls back to iapctl-py, a normal start (sitecustomize runs) — and works the same."""
    (wheel, _), _ = wheels
    bin_ = fresh_venv(tmp_path / "venv", wheel)
    [site_packages] = (tmp_path / "venv" / "lib").glob("python*/site-packages")
    marker = tmp_path / "site-ran"
    (site_packages / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "IAPD_SOCKET": str(tmp_path / "none" / "iapd.sock"),
           "IAPD_AUTOSTART": "0", "PYTHONPATH": "/nonexistent-hijack"}

    def token(launcher) -> subprocess.CompletedProcess:
        out = run(launcher, "token", "x", env=env)
        assert out.returncode == 3 and "iapd is not running" in out.stderr, out.stderr  # the client ran
        return out

    token(bin_ / "iapctl")
    assert not marker.exists(), "site ran: the fast start was not taken"
    links = tmp_path / "local-bin"
    links.mkdir()
    (links / "iapctl").symlink_to(bin_ / "iapctl")  # what pipx makes in ~/.local/bin
    token(links / "iapctl")
    assert not marker.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("iapctl", "iapctl-py"):
        (elsewhere / name).write_bytes((bin_ / name).read_bytes())
        (elsewhere / name).chmod(0o755)
    token(elsewhere / "iapctl")
    assert marker.exists(), "outside a venv the launcher starts Python the usual way"
