"""`iapd`: the daemon's command line."""

from __future__ import annotations

import argparse
import sys

from iapd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iapd", description="Per-user credential agent for Google Cloud IAP.")
    parser.add_argument("-V", "--version", action="version", version=f"iapd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from iapd.emulator import cli as emulator_cli  # arguments only; the emulator loads when run

    serve = sub.add_parser("serve", help="run the agent on its unix socket",
                           description="Run the agent: renew ID tokens per profile before they expire and serve "
                                       "them on a unix socket to processes of the same user.")
    serve.add_argument("--config", help="config file (default: $IAPD_CONFIG or $XDG_CONFIG_HOME/iapd/config.toml)")
    serve.add_argument("--socket", help="socket path (default: $IAPD_SOCKET, else the config's [daemon] socket, else "
                                        "$XDG_RUNTIME_DIR/iapd/iapd.sock; without a runtime dir, a private "
                                        "$TMPDIR/iapd-UID/ or $XDG_STATE_HOME/iapd/run-HOST/)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="log verbosity on stderr (default: %(default)s)")
    serve.add_argument("--test-clock", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    emulator = sub.add_parser("emulator", help="run a local emulator of Google OAuth, Secret Manager, metadata, IAM and IAP",
                              description="Run a local emulator of the Google endpoints iapd uses, and of IAP itself. "
                                          "Prints one JSON line with its URLs when ready; stops on SIGINT/SIGTERM.")
    emulator_cli.add_arguments(emulator)
    emulator.set_defaults(func=emulator_cli.run)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import os

    from iapctl.paths import config_path

    # pydantic looks for plugins in every installed distribution's entry points when it builds
    # its first model: 4 % of the config's import here, and a plugin would be code in the daemon
    # that no config asked for. (PYDANTIC_DISABLE_PLUGINS is pydantic's own switch.)
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from iapd.config import ConfigError, load_config

    path = args.config or config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"iapd: {exc}", file=sys.stderr)
        return 2
    # Before aiohttp is imported: it builds its TLS context (and so reads SSL_CERT_FILE) then.
    os.environ.update(config.daemon.environment)
    from iapd.daemon import serve, setup_logging
    from iapd.loop import run_async

    setup_logging(args.log_level)
    return run_async(serve(path, config, args.socket, args.test_clock))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
