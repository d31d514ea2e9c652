"""`iapd`: the daemon's command line."""

from __future__ import annotations

import argparse
import sys

from iapd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iapd", description="Per-user credential agent for Google Cloud IAP.")
    parser.add_argument("--version", action="version", version=f"iapd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from iapd.emulator import cli as emulator_cli

    emulator = sub.add_parser("emulator", help="run a local emulator of Google OAuth, Secret Manager, metadata, IAM and IAP",
                              description="Run a local emulator of the Google endpoints iapd uses, and of IAP itself. "
                                          "Prints one JSON line with its URLs when ready; stops on SIGINT/SIGTERM.")
    emulator_cli.add_arguments(emulator)
    emulator.set_defaults(func=emulator_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
