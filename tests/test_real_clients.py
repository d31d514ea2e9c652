"""The product through the real clients: flytekit's own proxy authenticator and HTTP session,
and the curl commands the README shows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iapd.jwt import unverified_claims

IAPCTL = shutil.which("iapctl", path=os.path.dirname(sys.executable))
README = Path(__file__).resolve().parent.parent / "README.md"
IAP = "123456789012-iap.apps.googleusercontent.com"


@pytest.fixture
def flyte_env(daemon, monkeypatch, tmp_path):
    """flytekit runs `iapctl` as a subprocess of this process: give it the daemon's environment."""
    for key in ("IAPD_SOCKET", "IAPD_CONFIG"):
        monkeypatch.setenv(key, daemon.env[key])
    monkeypatch.setenv("IAPD_AUTOSTART", "0")
    monkeypatch.setenv("IAPD_AUTO_LOGIN", "0")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "client-state"))
    # flytekit runs the command by name, as a user's proxyCommand does: iapctl must be on PATH.
    monkeypatch.setenv("PATH", f"{os.path.dirname(IAPCTL)}{os.pathsep}{os.environ['PATH']}")
    return daemon


def test_flytekit_http_session_through_iap(flyte_env, emulator):
    from flytekit.clients.auth_helper import get_proxy_authenticator, get_session
    from flytekit.configuration import PlatformConfig

    flyte_env.login()
    cfg = PlatformConfig(endpoint="dns:///flyte.example.com", proxy_command=["iapctl", "token", "demo-user"])
    authenticator = get_proxy_authenticator(cfg)
    authenticator.refresh_credentials()
    key, value = authenticator.fetch_grpc_call_auth_metadata()
    assert key == "proxy-authorization" and value.startswith("Bearer ")
    assert unverified_claims(value.removeprefix("Bearer "))["aud"] == IAP

    session = get_session(cfg)  # flytekit's own requests session, upgraded with the proxy authenticator
    resp = session.get(emulator.url("iap_url") + "/api/v1/projects", headers={"Authorization": "Bearer flyteadmin"},
                       timeout=10)
    assert resp.status_code == 200, resp.text
    echo = resp.json()
    assert echo["user"] == "accounts.google.com:demo@example.com"
    assert echo["headers"]["Authorization"] == "Bearer flyteadmin"  # the app's own auth passes through
    assert "Proxy-Authorization" not in echo["headers"]  # IAP consumed ours


def test_flytekit_config_file_with_proxy_command(flyte_env, emulator, tmp_path):
    from flytekit.clients.auth_helper import get_session
    from flytekit.configuration import PlatformConfig
    from flytekit.configuration.file import ConfigFile

    flyte_env.login()
    config = tmp_path / "config.yaml"
    config.write_text('admin:\n  endpoint: dns:///flyte.example.com\n  authType: Pkce\n'
                      '  proxyCommand: ["iapctl", "token", "demo-user"]\n')
    cfg = PlatformConfig.auto(ConfigFile(str(config)))
    assert cfg.proxy_command == ["iapctl", "token", "demo-user"]
    resp = get_session(cfg).get(emulator.url("iap_url") + "/healthcheck", timeout=10)
    assert resp.status_code == 200 and resp.json()["user"] == "accounts.google.com:demo@example.com"


@pytest.mark.parametrize("state, needle", [("login", "iapctl login demo-user"), ("down", "iapd is not running")])
def test_flytekit_reports_our_one_line(flyte_env, emulator, tmp_path, monkeypatch, state, needle):
    from flytekit.clients.auth.exceptions import AuthenticationError
    from flytekit.clients.auth_helper import get_session
    from flytekit.configuration import PlatformConfig

    if state == "down":
        monkeypatch.setenv("IAPD_SOCKET", str(tmp_path / "nothing.sock"))
    cfg = PlatformConfig(endpoint="dns:///flyte.example.com", proxy_command=["iapctl", "token", "demo-user"])
    with pytest.raises(AuthenticationError) as info:
        get_session(cfg).get(emulator.url("iap_url") + "/", timeout=10)
    message = str(info.value)
    assert needle in message and "Traceback" not in message


def readme_curl_commands() -> list[str]:
    text = README.read_text()
    return [line.split("#")[0].strip() for line in text.splitlines()
            if line.startswith("curl ") and '--unix-socket "$S"' in line]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_examples(daemon_factory, emulator, tmp_path):
    commands = readme_curl_commands()
    assert len(commands) >= 2  # the status and token examples
    # The README's profile is called `flyte`: the emulator's user profile under that name.
    config = tmp_path / "readme.toml"
    config.write_text(emulator.config_path.read_text().replace("[profiles.demo-user", "[profiles.flyte")
                      .replace('via = "demo-user"', 'via = "flyte"').replace("[profiles.demo-flyte", "[profiles.flyte-admin"))
    daemon = daemon_factory(config=config, name="readme")
    daemon.login("flyte")
    env = {**os.environ, "S": daemon.socket}
    for command in commands:
        out = subprocess.run(["sh", "-c", command + " -sS -w '\\n%{http_code}'"], env=env, capture_output=True,
                             text=True, timeout=30)
        body, _, code = out.stdout.rpartition("\n")
        assert out.returncode == 0 and code == "200", (command, out.stdout, out.stderr)
        if "/v1/token/" in command:
            assert unverified_claims(body.strip())["aud"] == IAP
        if "/v1/status" in command:
            assert '"profiles"' in body


def test_readme_profile_name_matches_its_curl_example():
    # The README's token example uses the profile name its config example defines.
    commands = readme_curl_commands()
    names = {m.group(1) for c in commands for m in [re.search(r"/v1/token/([\w.-]+)", c)] if m}
    assert names and all(f"[profiles.{name}]" in README.read_text() for name in names)
