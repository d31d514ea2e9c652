"""Every `iapctl` command but the `token` fast path: argparse, status, login, logout, service,
and flyte-iap's own subcommands and flags as a drop-in."""

from __future__ import annotations

import argparse
import json
import os
import sys

from iapctl import __version__, paths
from iapctl.cli import (
    BAD_PROFILE, ERROR, EXIT_CODE_OF_ERROR, INTERRUPTED, LOGIN_REQUIRED, OK, UNREACHABLE, UPSTREAM, USAGE, Failure, call,
    error_of,
    FORMATS, fail, reader_gone, run, valid_profile,
)
from iapctl.shown import shown


def say(text: str) -> None:
    """A line for a person that quotes what the daemon, an issuer or a config said."""
    print(shown(text))


EXIT_CODES = f"""exit codes:
  {OK}  success
  {ERROR}  unexpected error
  {USAGE}  usage error
  {UNREACHABLE}  iapd is not running and could not be started
  {LOGIN_REQUIRED}  login required: run `iapctl login PROFILE`
  {BAD_PROFILE}  unknown profile, or a profile that cannot work as configured
  {UPSTREAM}  Google (or the network to it) failed (try again later) or refused (the message says why)
  {INTERRUPTED}  interrupted (Ctrl-C); a login it had started is cancelled, and the next one starts afresh

environment:
  IAPD_SOCKET      socket path (default: $XDG_RUNTIME_DIR/iapd/iapd.sock)
  IAPD_CONFIG      config file (default: $XDG_CONFIG_HOME/iapd/config.toml)
  IAPD_AUTOSTART   0 = never start iapd in the background
  IAPD_AUTO_LOGIN  0 = `iapctl token` never starts a browser login
  IAPCTL_TIMEOUT   seconds a request to iapd may take in all (default 30)
  BROWSER          how to open the login page (e.g. 'firefox %s'); else the system's browser
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and the usage exit code, like every other failure
        self.exit(USAGE, f"iapctl: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iapctl", description="Client of the iapd agent: Google Cloud IAP ID tokens in milliseconds.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-V", "--version", action="version", version=f"iapctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("token", help="print an ID token for PROFILE (for Flyte's proxyCommand)",
                       description="Print an ID token for PROFILE and a newline on stdout; nothing else. On failure, "
                                   "one line on stderr and a non-zero exit code (see `iapctl --help`).")
    p.add_argument("profile")
    p.add_argument("--format", choices=FORMATS, default="plain",
                   help="plain (the default, the fast path): the token; header: `Bearer TOKEN`; json: token and "
                        "expiry; exec-credential: a client.authentication.k8s.io/v1 ExecCredential for kubectl")
    p.set_defaults(func=lambda a: run(a.profile, fmt=a.format))

    p = sub.add_parser("login", help="log in to PROFILE in a browser",
                       description="Log in with your Google account for PROFILE. Opens a browser (honours $BROWSER); "
                                   "with --no-browser, prints the URL and asks for the address the browser ends on.")
    p.add_argument("profile")
    p.add_argument("--no-browser", action="store_true",
                   help="print the URL instead of opening a browser (SSH, headless machines)")
    p.add_argument("--device", action="store_true",
                   help="an OpenID Connect profile's device grant: a code to enter at the issuer's page, on any device")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", help="revoke and forget a login (or all of them)",
                       description="Revoke the login at Google (best effort), wipe it from the store and drop cached tokens.")
    p.add_argument("profile", nargs="?")
    p.add_argument("--all", action="store_true", help="every profile and every stored login")
    p.set_defaults(func=cmd_logout)

    p = sub.add_parser("status", help="show the daemon and every profile")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reload", help="make iapd re-read its config now",
                       description="Re-read the config file. iapd also notices changes by itself (on its next "
                                   "tick, or at once when asked for a profile it does not know). Profiles that did "
                                   "not change keep their tokens and logins; a broken config is refused and the old "
                                   "one keeps serving.")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("stop", help="stop iapd",
                       description="Stop the daemon: through systemd or launchd when they run it (a socket-activated "
                                   "iapd starts again on the next request), else by asking it over its socket.")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("restart", help="restart iapd (logins are kept: they are on disk)",
                       description="Stop the daemon and start it again (through systemd or launchd when they run it).")
    p.set_defaults(func=cmd_restart)

    p = sub.add_parser("doctor", help="check config, socket, daemon, service, clock and profiles (or one app's URL)",
                       description="Check everything iapctl depends on, one line each, with a fix for what is wrong: "
                                   "the config, the socket path and its permissions, the daemon, the login service, "
                                   "the clock against the token endpoint's, and each profile. Given an app's URL, say "
                                   "instead whether IAP there lets the profile's token in, and if not why: a wrong "
                                   "audience, a desktop client not in IAP's allowlist, no email claim, an access level, "
                                   "a signed JWT whose aud does not cover the URL. Exit 0 if all is well.")
    p.add_argument("url", nargs="?", help="an app behind IAP: check this profile's token against it")
    p.add_argument("--profile", help="the profile to check against URL (default: the one whose audience IAP names)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("setup", help="write a profile for an app from its URL, log in, and prove it works",
                       description="Ask URL without credentials: IAP's redirect to Google's sign-in names its OAuth "
                                   "client (the profile's audience); a gateway's names its OpenID Connect issuer. "
                                   "Append the profile to the config (nothing else in the file changes), log in if "
                                   "needed (the Google login the config already has is reused when there is exactly "
                                   "one), then ask URL again with the token and say what IAP answered.")
    p.add_argument("url", help="the app's URL, e.g. https://flyte.example.com/")
    p.add_argument("--profile", required=True, help="name of the profile to write")
    p.add_argument("--client-id", help="the desktop OAuth client (Google), or the issuer's client (OpenID Connect)")
    p.add_argument("--client-secret-name", metavar="projects/P/secrets/S/versions/V",
                   help="the Secret Manager secret that holds the desktop client's secret")
    p.add_argument("--client-secret", help="the client's secret itself (stored in the config: prefer the secret name)")
    p.add_argument("--force", action="store_true", help="replace the profile if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the profile's TOML and change nothing")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("service", help="install the login service (systemd user units or a launchd agent)",
                       description="Install, remove or inspect the service that starts iapd at login.")
    p.add_argument("action", choices=["install", "uninstall", "status"])
    p.add_argument("--dry-run", action="store_true", help="print the files and commands instead of running them")
    p.set_defaults(func=cmd_service)

    p = sub.add_parser("completion", help="print a shell completion script: bash, zsh or fish",
                       description="Print a script that completes iapctl's commands, flags and profile names (read "
                                   "from the config; no daemon needed). bash: `source <(iapctl completion bash)` in "
                                   "~/.bashrc; zsh: `source <(iapctl completion zsh)` in ~/.zshrc; fish: `iapctl "
                                   "completion fish > ~/.config/fish/completions/iapctl.fish`.")
    p.add_argument("shell", nargs="?", choices=["bash", "zsh", "fish"], help="default: the one in $SHELL")
    p.add_argument("--profiles", action="store_true", help=argparse.SUPPRESS)  # what the scripts call

    def completion(args: argparse.Namespace) -> int:
        from iapctl.completion import main

        return main(args.shell, args.profiles, parser)

    p.set_defaults(func=completion)

    # flyte-iap's subcommands, flags and output, so `proxyCommand` changes by one word.
    p = sub.add_parser("generate-user-id-token", help="flyte-iap drop-in: a user ID token",
                       description="flyte-iap compatible: print a user ID token for the IAP web app client.")
    p.add_argument("--desktop_client_id", required=True, help="desktop type OAuth 2.0 client ID")
    p.add_argument("--desktop_client_secret_gcp_secret_name", required=True,
                   help="Secret Manager secret holding the desktop client secret")
    p.add_argument("--webapp_client_id", required=True, help="web app OAuth 2.0 client ID used by IAP (the audience)")
    p.add_argument("--project", required=True, help="GCP project ID in which the secret is saved")
    p.set_defaults(func=cmd_flyte_user)

    p = sub.add_parser("generate-service-account-id-token", help="flyte-iap drop-in: a service-account ID token",
                       description="flyte-iap compatible: print a service-account ID token for the IAP web app client, "
                                   "from a key file ($GOOGLE_APPLICATION_CREDENTIALS) or the metadata server.")
    p.add_argument("--webapp_client_id", help="web app OAuth 2.0 client ID used by IAP (the audience)")
    p.add_argument("--jwt_audience", metavar="URL",
                   help="instead of --webapp_client_id: a JWT the service account signs itself for the app's URL "
                        "(https://app.example.com/* or an exact URL); from a key file, no call to Google at all")
    p.add_argument("--service_account_key", help="path to a service account key file")
    p.set_defaults(func=cmd_flyte_service_account)
    return parser


def dispatch(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return USAGE
    try:
        return args.func(args)
    except Failure as exc:
        return fail(exc.message, exc.code)
    except KeyboardInterrupt:
        return fail("interrupted", INTERRUPTED)
    except BrokenPipeError:
        reader_gone()
        return OK


def _checked(resp) -> dict:
    if resp.status != 200:
        error = error_of(resp)
        # The token path's mapping, except that a request these commands build from their
        # arguments and the daemon refuses (bad_request) is a usage error here.
        codes = {**EXIT_CODE_OF_ERROR, "bad_request": USAGE}
        raise Failure(error.get("message", "failed"),
                      codes.get(error.get("error"), UPSTREAM if resp.status >= 500 else ERROR))
    return resp.json()


def _profile(name: str) -> str:
    if not valid_profile(name):
        raise Failure(f"invalid profile name {name!r}", USAGE)
    return name


# -- login / logout -----------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    from iapctl.autologin import Console, can_open_browser, login, not_completed

    profile = _profile(args.profile)
    ui = Console()
    # No display and no $BROWSER (SSH, a container): the URL is printed to open elsewhere.
    browser = not args.no_browser and can_open_browser()
    outcome = login(profile, ui, browser, device=args.device)
    if outcome.get("state") != "done":
        raise not_completed(profile, outcome)
    say(f"Logged in as {outcome.get('email')} (profile {profile}).")
    return OK


def cmd_logout(args: argparse.Namespace) -> int:
    if bool(args.profile) == bool(args.all):
        raise Failure("give a PROFILE or --all", USAGE)
    target = "/v1/logout" if args.all else f"/v1/logout/{_profile(args.profile)}"
    results = _checked(call("POST", target))["results"]
    if not results:
        print("Nothing to log out.")
    for r in results:
        who = r.get("email") or "no stored login"
        profiles = ", ".join(r.get("profiles") or []) or "(no profile)"
        if r.get("revoked"):
            revoked = "revoked at the issuer" if str(r.get("credential", "")).startswith("oidc:") else "revoked at Google"
        elif r.get("revoke_error"):
            revoked = f"not revoked ({r['revoke_error']})"
        else:
            revoked = "nothing to revoke"
        wiped = "wiped from the store" if r.get("wiped") else "nothing stored"
        say(f"{profiles}: {who}: {revoked}; {wiped}; cached tokens dropped.")
    return OK


# -- status -------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    path = paths.socket_path()
    try:
        status = _checked(call("GET", "/v1/status", autostart=False))
    except Failure as exc:
        if exc.code != UNREACHABLE:
            raise
        if args.json:
            print(json.dumps({"running": False, "socket": path}))
            return UNREACHABLE
        from iapctl.autostart import when_not_running

        fix = when_not_running()
        print(f"iapd is not running (socket {path}): {fix}." if fix else
              f"iapd is not running (socket {path}); it starts by itself on the first `iapctl token`.")
        return UNREACHABLE
    if args.json:
        print(json.dumps({"running": True, "socket": status["daemon"]["socket"], **status}, indent=2))
        return OK
    from iapctl.status_text import render

    sys.stdout.write(render(status))
    return OK


# -- reload / stop / restart --------------------------------------------------------------------

def cmd_reload(args: argparse.Namespace) -> int:
    result = _checked(call("POST", "/v1/reload", autostart=False))
    if not result.get("reloaded"):
        raise Failure(f"{result.get('error')} (the previous config keeps serving)", BAD_PROFILE)
    print(f"Reloaded the config: {len(result['profiles'])} profile(s).")
    return OK


def _running() -> dict | None:
    try:
        return _checked(call("GET", "/v1/status", autostart=False, timeout=5))["daemon"]
    except Failure as exc:
        if exc.code == UNREACHABLE:
            return None
        raise


def _service_command(service: str, action: str) -> list[str]:
    if service == "systemd":
        return ["systemctl", "--user", action, "iapd.service"]
    label = f"gui/{os.getuid()}/dev.iapd.agent"
    return ["launchctl", "kickstart", "-k", label] if action == "restart" else ["launchctl", "kill", "SIGTERM", label]


def _stop(daemon: dict) -> None:
    """Stop the daemon described by `daemon` (from status) and wait until it is gone."""
    import subprocess
    import time

    if daemon.get("service"):
        command = _service_command(daemon["service"], "stop")
        if subprocess.run(command).returncode != 0:
            raise Failure(f"`{' '.join(command)}` failed", ERROR)
    else:
        _checked(call("POST", "/v1/stop", autostart=False, timeout=5))
    deadline = time.monotonic() + 15
    while _running() is not None:
        if time.monotonic() > deadline:
            raise Failure(f"iapd (pid {daemon['pid']}) did not stop within 15s", ERROR)
        time.sleep(0.05)


def cmd_stop(args: argparse.Namespace) -> int:
    daemon = _running()
    if daemon is None:
        print(f"iapd is not running (socket {paths.socket_path()}).")
        return OK
    _stop(daemon)
    again = " (its socket unit starts it again on the next request)" if daemon.get("service") == "systemd" else ""
    print(f"Stopped iapd (pid {daemon['pid']}){again}.")
    return OK


def cmd_restart(args: argparse.Namespace) -> int:
    import subprocess

    daemon = _running()
    if daemon is not None and daemon.get("service"):
        command = _service_command(daemon["service"], "restart")
        if subprocess.run(command).returncode != 0:
            raise Failure(f"`{' '.join(command)}` failed", ERROR)
    else:
        if daemon is not None:
            _stop(daemon)
        from iapctl.autostart import ensure_daemon

        ensure_daemon(paths.socket_path(), "restarting")
    now = _running()
    if now is None:
        raise Failure("iapd did not come back", UNREACHABLE)
    print(f"Restarted iapd (pid {now['pid']}).")
    return OK


# -- doctor -------------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from iapctl.doctor import run_doctor, run_doctor_url

    if args.url:
        return run_doctor_url(args.url, args.profile and _profile(args.profile))
    if args.profile:
        raise Failure("--profile goes with a URL: `iapctl doctor URL --profile NAME`", USAGE)
    return run_doctor()


def cmd_setup(args: argparse.Namespace) -> int:
    from iapctl.setup import run_setup

    return run_setup(args)


# -- service ------------------------------------------------------------------------------------

def cmd_service(args: argparse.Namespace) -> int:
    from iapctl.service import run_service

    return run_service(args.action, args.dry_run)


# -- flyte-iap drop-in --------------------------------------------------------------------------

def _adhoc(definition: dict) -> int:
    """The slow path of the drop-ins (values that need JSON escaping, odd flag spellings): the
    same ad-hoc profile, named the way the fast path names it (iapctl.cli.drop_in)."""
    from iapctl.cli import adhoc_name

    body = json.dumps(definition, separators=(",", ":"))[1:-1]
    name = adhoc_name(body)
    return run(name, adhoc=json.dumps({"name": name, **definition}).encode())


def cmd_flyte_user(args: argparse.Namespace) -> int:
    secret = args.desktop_client_secret_gcp_secret_name
    name = secret if secret.startswith("projects/") else f"projects/{args.project}/secrets/{secret}/versions/latest"
    return _adhoc({"audience": args.webapp_client_id,
                   "user": {"client_id": args.desktop_client_id, "client_secret_name": name}})


def cmd_flyte_service_account(args: argparse.Namespace) -> int:
    if (args.webapp_client_id is None) == (args.jwt_audience is None):
        raise Failure("give one of --webapp_client_id or --jwt_audience", USAGE)
    # flyte-iap's order: --service_account_key, else $GOOGLE_APPLICATION_CREDENTIALS (which may
    # also be a workload identity federation file), else the metadata server.
    key = args.service_account_key or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key and not os.path.isfile(key):
        raise Failure(f"credentials file {key} does not exist", BAD_PROFILE)
    if args.service_account_key:
        source = {"kind": "key_file", "key_file": os.path.abspath(key)}
    elif key:
        source = {"kind": "adc", "credentials_file": os.path.abspath(key)}
    else:
        source = {"kind": "metadata"}
    if args.jwt_audience is not None:
        return _adhoc({"jwt_audience": args.jwt_audience, "service_account": source})
    return _adhoc({"audience": args.webapp_client_id, "service_account": source})
