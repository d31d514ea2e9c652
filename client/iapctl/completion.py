"""`iapctl completion bash|zsh|fish`: a script that completes commands, flags and profile names.

Commands and flags are read off iapctl's own parser when the script is made, so they cannot
drift from `--help`. Profile names are looked up when completing, with `iapctl completion
--profiles`, which reads the config file (no daemon, no network: a tab press must not start one).
"""

from __future__ import annotations

import argparse
import os

from iapctl import paths

PROFILE_COMMANDS = ("token", "login", "logout")


def profiles() -> list[str]:
    """The config's profile names; nothing for a missing, unsafe or broken config."""
    path = paths.config_path()
    if paths.unsafe_file(path) is not None:
        return []
    try:
        import tomllib

        with open(path, "rb") as fh:
            table = tomllib.load(fh).get("profiles", {})
    except (OSError, ValueError):
        return []
    return sorted(name for name in table if isinstance(name, str) and name.isprintable() and " " not in name) \
        if isinstance(table, dict) else []


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each subcommand and its options (and, for `service`, its actions)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found: dict[str, list[str]] = {}
    for name, command in sub.choices.items():
        words = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
        words += [c for action in command._actions if action.choices and not action.option_strings
                  for c in action.choices]
        found[name] = sorted(set(words) - {"--help"}) + ["--help"]
    return found


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    names = " ".join(commands)
    if shell == "bash":
        cases = "\n".join(f'        {name}) words="{" ".join(opts)}" ;;' for name, opts in commands.items())
        return f'''# iapctl completion for bash: source <(iapctl completion bash)
_iapctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} words
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{names} --help --version" -- "$cur")); return
    fi
    case "${{COMP_WORDS[1]}}" in
{cases}
    esac
    case "${{COMP_WORDS[1]}}" in
        {"|".join(PROFILE_COMMANDS)}) [[ "$cur" != -* ]] && words="$words $(iapctl completion --profiles 2>/dev/null)" ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -F _iapctl iapctl
'''
    if shell == "zsh":
        cases = "\n".join(f"    {name}) compadd -- {' '.join(opts)} ;;" for name, opts in commands.items())
        return f'''#compdef iapctl
# iapctl completion for zsh: source <(iapctl completion zsh)
_iapctl() {{
  if (( CURRENT == 2 )); then
    compadd -- {names} --help --version; return
  fi
  case $words[2] in
    {"|".join(PROFILE_COMMANDS)}) compadd -- ${{(f)"$(iapctl completion --profiles 2>/dev/null)"}} ;;
  esac
  case $words[2] in
{cases}
  esac
}}
compdef _iapctl iapctl
'''
    lines = ["# iapctl completion for fish: iapctl completion fish | source", "complete -c iapctl -f"]
    lines += [f"complete -c iapctl -n __fish_use_subcommand -a {name}" for name in commands]
    for name, opts in commands.items():
        for opt in opts:
            if opt.startswith("--"):
                lines.append(f"complete -c iapctl -n '__fish_seen_subcommand_from {name}' -l {opt[2:]}")
            else:
                lines.append(f"complete -c iapctl -n '__fish_seen_subcommand_from {name}' -a {opt}")
    lines.append(f"complete -c iapctl -n '__fish_seen_subcommand_from {' '.join(PROFILE_COMMANDS)}' "
                 "-a '(iapctl completion --profiles 2>/dev/null)'")
    return "\n".join(lines) + "\n"


def main(shell: str | None, list_profiles: bool, parser: argparse.ArgumentParser) -> int:
    if list_profiles:
        names = profiles()
        if names:
            print("\n".join(names))
        return 0
    print(script(shell or os.path.basename(os.environ.get("SHELL", "bash")), parser), end="")
    return 0
