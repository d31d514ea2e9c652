"""`iapctl completion bash|zsh|fish`: scripts that load in the real shells and complete
commands, flags and the config's profile names (no daemon)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

BIN = os.path.dirname(sys.executable)
CONFIG = """
[profiles.alpha]
audience = "a"
[profiles.alpha.service_account]
kind = "metadata"
[profiles.beta-2]
audience = "a"
[profiles.beta-2.service_account]
kind = "metadata"
"""


@pytest.fixture
def env(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    # No daemon anywhere: completing must not need (or start) one.
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "IAPD_CONFIG": str(config),
            "IAPD_SOCKET": str(tmp_path / "none.sock"), "IAPD_AUTOSTART": "0"}


def bash_complete(env: dict, *words: str) -> list[str]:
    line = " ".join(f'"{w}"' for w in words)
    script = (f'source <(iapctl completion bash) || exit 9; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; '
              '_iapctl; printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == "", out
    return out.stdout.split()


def test_bash_completes_commands_flags_and_profiles(env, tmp_path):
    assert bash_complete(env, "iapctl", "lo") == ["login", "logout"]
    assert bash_complete(env, "iapctl", "token", "") == ["--format", "--help", "alpha", "beta-2"]
    assert bash_complete(env, "iapctl", "token", "b") == ["beta-2"]
    assert bash_complete(env, "iapctl", "service", "in") == ["install"]
    assert bash_complete(env, "iapctl", "login", "--n") == ["--no-browser"]
    assert not (tmp_path / "none.sock").exists()


@pytest.mark.parametrize("shell, check", [
    ("zsh", "autoload -U compinit && compinit -u && source <(iapctl completion zsh)"),
    ("fish", "iapctl completion fish | source; and complete -C'iapctl token b'"),
])
def test_zsh_and_fish_load_their_scripts(env, shell, check):
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here (Debian: apt-get install {shell})")
    out = subprocess.run([shell, "-c", check], env={**env, "HOME": env.get("HOME", "/tmp")}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "rror" not in out.stderr, out
    if shell == "fish":
        assert "beta-2" in out.stdout


def test_the_profiles_of_an_unsafe_config_are_not_offered(env, tmp_path):
    os.chmod(env["IAPD_CONFIG"], 0o666)
    out = subprocess.run(["iapctl", "completion", "--profiles"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == ""
