"""`iapd emulator`: run the emulator until SIGINT/SIGTERM; one JSON line on stdout when ready."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port of the Google endpoints (default: any free port)")
    parser.add_argument("--iap-port", type=int, default=0, help="port of the emulated IAP proxy (default: any free port)")
    parser.add_argument("--backend", metavar="URL", help="app to put behind the emulated IAP (default: a built-in echo app)")
    parser.add_argument("--user-email", default="demo@example.com", help="who logs in (default: %(default)s)")
    parser.add_argument("--token-lifetime", type=int, default=3600, metavar="SECONDS",
                        help="lifetime of every token issued (default: %(default)s, as Google)")
    parser.add_argument("--consent", action="store_true",
                        help="show a consent page instead of approving logins automatically")
    parser.add_argument("--extra-iap-clients", type=int, default=0, metavar="N",
                        help="register N more IAP (web) clients, 123456789012-iap-0 … -N-1, as audiences for tests")
    parser.add_argument("--write-config", metavar="PATH",
                        help="write a ready-to-use iapd config (profiles demo-user and demo-sa) to PATH")


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise SystemExit(f"iapd emulator: --host must be a loopback address, not {host!r}: it hands out credentials")


async def _run(args: argparse.Namespace) -> None:
    # Imported here: `iapd serve` builds this parser too, and must not pay for the emulator.
    from iapd.emulator.app import Emulator
    from iapd.emulator.state import EmulatorState

    state = EmulatorState.demo(user_email=args.user_email, token_lifetime=args.token_lifetime)
    if args.consent:
        state.approve = "consent"
    state.add_iap_clients(args.extra_iap_clients)
    emulator = await Emulator(state, host=args.host, port=args.port, iap_port=args.iap_port,
                              backend_url=args.backend).start()
    config = str(emulator.write_config(args.write_config)) if args.write_config else None
    print(emulator.ready_line(config), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await emulator.stop()


def run(args: argparse.Namespace) -> int:
    _check_loopback(args.host)
    from iapd.loop import run_async

    try:
        run_async(_run(args))
    except OSError as exc:
        print(f"iapd emulator: {exc}", file=sys.stderr)
        return 1
    return 0
