"""The OpenID Connect flows against an OpenID Provider someone else wrote: node-oidc-provider
(panva/node-oidc-provider, OpenID Certified), from npm, started here as a real server on
loopback. `make test` installs it (tests/oidc_provider); without node it is skipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import OP_DIR, stop_process
from iapd.jwt import unverified_claims
from test_client import IAPCTL, failed, iapctl
from test_oidc import read_until

PERSON = f"{sys.executable} {OP_DIR / 'person.py'} %s"


@pytest.fixture
def op(independent_op):
    return independent_op


def config_for(emulator, tmp_path, op: str) -> Path:
    path = tmp_path / "op.toml"
    path.write_text(emulator.config_path.read_text() + f'''
[profiles.op.oidc]
issuer = "{op}"
client_id = "public-cli"
scopes = ["openid", "email", "offline_access"]

[profiles.op-bot.oidc]
issuer = "{op}"
client_id = "ci-bot"
client_secret = "ci-bot-secret-for-tests-only"
grant = "client_credentials"
scopes = ["api"]
token = "access_token"
''')
    return path


def test_code_with_pkce_rotation_and_reuse_against_an_independent_provider(op, emulator, daemon_factory, tmp_path):
    daemon = daemon_factory(config=config_for(emulator, tmp_path, op), name="op")
    env = {**daemon.env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0", "XDG_STATE_HOME": str(tmp_path / "cs"),
           "BROWSER": PERSON}
    login = iapctl("login", "op", env=env)
    assert login.returncode == 0 and login.stdout == "Logged in as alice@example.com (profile op).\n", login.stderr
    claims = unverified_claims(iapctl("token", "op", env=env).stdout.strip())
    assert claims["iss"] == op and claims["aud"] == "public-cli" and claims["email"] == "alice@example.com"
    store, key = daemon.state_dir / "credentials.json", f"oidc:{op}:public-cli"
    first = json.loads(store.read_text())["credentials"][key]["refresh_token"]
    daemon.set_clock(3600)
    assert iapctl("token", "op", env=env).returncode == 0
    rotated = json.loads(store.read_text())["credentials"][key]["refresh_token"]
    assert rotated != first  # the provider rotated it; the new one is on disk
    # A copy of the spent one is replayed: the provider revokes the grant...
    replay = requests.post(f"{op}/token", data={"grant_type": "refresh_token", "refresh_token": first,
                                                 "client_id": "public-cli"}, timeout=10)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    # ...and iapd says: log in again — once, not in a loop.
    daemon.set_clock(7200)
    failed(iapctl("token", "op", env=env), 4, "login required for profile op")
    assert daemon.profile_status("op")["state"] == "login_required"


def test_client_credentials_against_an_independent_provider(op, emulator, daemon_factory, tmp_path):
    daemon = daemon_factory(config=config_for(emulator, tmp_path, op), name="opbot")
    env = {**daemon.env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0", "XDG_STATE_HOME": str(tmp_path / "cs")}
    out = iapctl("token", "op-bot", env=env)
    assert out.returncode == 0 and len(out.stdout.strip()) > 20, out.stderr
    status = daemon.profile_status("op-bot")
    assert status["state"] == "ready" and 3500 < status["expires_in"] <= 3600


def test_device_grant_against_an_independent_provider(op, emulator, daemon_factory, tmp_path):
    import re

    daemon = daemon_factory(config=config_for(emulator, tmp_path, op), name="opdev")
    env = {**daemon.env, "IAPD_AUTOSTART": "0", "IAPD_AUTO_LOGIN": "0", "XDG_STATE_HOME": str(tmp_path / "cs")}
    proc = subprocess.Popen([IAPCTL, "login", "op", "--device"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        page = re.search(r"(http://\S+)", read_until(proc.stderr, "enter the code")).group(1)
        # The person opens the page on their phone, confirms the code, signs in, consents.
        subprocess.run([sys.executable, str(OP_DIR / "person.py"), page], check=True, timeout=60)
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0 and out == "Logged in as alice@example.com (profile op).\n", err
    assert unverified_claims(iapctl("token", "op", env=env).stdout.strip())["aud"] == "public-cli"

