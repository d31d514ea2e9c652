"""A bad config is one line naming the file, the key and what was expected."""

from __future__ import annotations

import pytest

from iapd.config import ConfigError, load_config

GOOD = """
[profiles.work]
audience = "123-iap.apps.googleusercontent.com"
[profiles.work.user]
client_id = "123-desktop.apps.googleusercontent.com"
client_secret_name = "projects/p/secrets/s/versions/latest"

[profiles.ci.service_account]
kind = "metadata"
"""


def load(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path), str(path)


def error_of(tmp_path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"config error: {path}: ")
    return message.split(": ", 2)[2]


def test_good_config(tmp_path):
    config, _ = load(tmp_path, GOOD)
    assert config.profiles["work"].user.client_secret_name.endswith("latest")
    assert config.profiles["ci"].audience is None and config.profiles["ci"].service_account.kind == "metadata"
    assert config.daemon.margin_seconds == 60


def test_missing_file_is_an_empty_config(tmp_path):
    assert load_config(tmp_path / "nope.toml").profiles == {}


@pytest.mark.parametrize("text, expected", [
    ("[profiles.x\n", "not valid TOML"),
    ('[profiles.x]\naudiance = "a"\n[profiles.x.user]\nclient_id="c"\nclient_secret="s"\n', "profiles.x.audiance: unknown key"),
    ("[profiles.x.user]\nclient_secret = 's'\n", "profiles.x.user.client_id: required key is missing"),
    ("[profiles.x.user]\nclient_id='c'\nclient_secret='s'\nclient_secret_name='projects/p/secrets/s/versions/1'\n",
     "profiles.x.user: give exactly one of client_secret or client_secret_name"),
    ("[profiles.x.user]\nclient_id='c'\nclient_secret_name='my-secret'\n",
     "profiles.x.user.client_secret_name: expected projects/PROJECT/secrets/SECRET/versions/VERSION, not 'my-secret'"),
    ("[client]\nautostart = 'no'\n", "client.autostart: expected true or false (unquoted)"),
    ("[profiles.x]\naudience='a'\n[profiles.x.service_account]\nkind='impersonate'\ntarget='deployer'\n",
     "profiles.x.service_account.target: expected a service account's email"),
    ("[profiles.x]\naudience = 'a'\n", "profiles.x: give exactly one of [user], [service_account] or [oidc]"),
    ("[daemon]\nmargin_seconds = 'soon'\n", "daemon.margin_seconds: Input should be a valid number"),
    ("[profiles.x.service_account]\nkind = 'magic'\n", "profiles.x.service_account: Input tag 'magic' found using 'kind' does not match"),
    ("[profiles.x.service_account]\nkind = 'key_file'\n", "profiles.x.service_account.key_file: required key is missing"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)
