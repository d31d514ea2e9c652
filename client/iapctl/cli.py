"""`iapctl`'s entry point, and `iapctl token PROFILE`: the hot path.

flytekit runs `iapctl token` per gRPC client and per HTTP session, with no timeout, and 4× per
call when it fails; flytectl runs it with stdin from /dev/null and hides its stderr. So: standard
library only, imports kept to `_socket` on success, stdout is the token and a newline or nothing
at all, one actionable line on stderr, a bounded run time, and an exit code per cause.

This module is all the launcher imports for `token` (every other command goes on to argparse in
iapctl.commands). Each module on this path costs a measurable fraction of Python's own start-up
(bench/client_latency.py), hence one module rather than a tidier two, and no `__future__`.
"""

import sys

from iapctl import paths, wire

# Exit codes (documented in the README and `iapctl --help`).
OK = 0
ERROR = 1          # anything unexpected
USAGE = 2          # bad command line
UNREACHABLE = 3    # iapd is not running and could not be started
LOGIN_REQUIRED = 4  # run `iapctl login PROFILE`
BAD_PROFILE = 5    # unknown profile, or a config iapd cannot use
UPSTREAM = 6       # Google (or the network to it) failed or refused; the message says which
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

EXIT_CODE_OF_ERROR = {"login_required": LOGIN_REQUIRED, "unknown_profile": BAD_PROFILE, "bad_request": BAD_PROFILE,
                      "bad_config": BAD_PROFILE, "upstream_error": UPSTREAM, "upstream_unavailable": UPSTREAM}

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


class Failure(Exception):
    """One line for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Cancelled(Failure):
    """The person stopped it (Ctrl-C): not a failure to remember — the next try starts afresh."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INTERRUPTED)


def fail(message: str, code: int) -> int:
    from iapctl.shown import shown  # only on failure: not on the token's hot path

    sys.stderr.write(f"iapctl: {shown(message)}\n")
    return code


def valid_profile(name: str) -> bool:
    # Profile names go into a URL path; refusing odd characters here saves importing urllib.
    return bool(name) and len(name) <= 128 and all(c in _SAFE for c in name)


def call(method: str, target: str, body: bytes | None = None, timeout: float | None = None,
         autostart: bool = True) -> wire.Response:
    """A request to the daemon; starts the daemon first if nothing answers (and that is allowed).
    `IAPCTL_TIMEOUT` (seconds) bounds each request; the default suits a refresh that waits on Google."""
    path = paths.socket_path()
    if timeout is None:
        timeout = request_timeout()
    try:
        try:
            return wire.request(path, method, target, body, timeout=timeout)
        except wire.Unreachable as exc:
            if not autostart:
                raise Failure(f"iapd is not running on {path} ({exc}): start it with `iapd serve` "
                              "or `iapctl service install`", UNREACHABLE) from None
            from iapctl.autostart import ensure_daemon

            ensure_daemon(path, str(exc))  # raises Failure when it cannot
            return wire.request(path, method, target, body, timeout=timeout)
    except wire.Untrusted as exc:
        # Never autostart here: our daemon could not bind there either. Say what and where.
        raise Failure(f"{exc}; set IAPD_SOCKET or XDG_RUNTIME_DIR to a directory only you can write",
                      UNREACHABLE) from None


def request_timeout() -> float:
    try:
        return max(float(paths.env("IAPCTL_TIMEOUT") or wire.DEFAULT_TIMEOUT), 0.1)
    except ValueError:
        return wire.DEFAULT_TIMEOUT


def error_of(resp: wire.Response) -> dict:
    try:
        error = resp.json()
    except ValueError:
        error = None
    if not isinstance(error, dict):
        return {"error": "internal", "message": f"unexpected answer from iapd (HTTP {resp.status})"}
    return error


def run(profile: str, adhoc: bytes | None = None, fmt: str = "plain") -> int:
    """Print a token for `profile`; with `adhoc`, the profile's definition (JSON, with its
    `name`), registered with the daemon if it does not know the profile yet; `fmt` other than
    plain: the token with its expiry (see `formatted`)."""
    if not valid_profile(profile):
        return fail(f"invalid profile name {profile!r}", USAGE)
    method, target = "GET", "/v1/token/" + profile + ("" if fmt == "plain" else "?format=json")
    try:
        resp = call(method, target)
        if adhoc is not None and resp.status == 404:
            method, target = "POST", "/v1/adhoc/token"
            resp = call(method, target, adhoc)
        if resp.status != 200:
            error = error_of(resp)
            if error.get("error") == "login_required":
                from iapctl.autologin import login_when_needed

                # Returns only if a login just completed; else raises Failure.
                login_when_needed(error.get("profile") or profile, error)
                resp = call(method, target, adhoc if method == "POST" else None)
                if resp.status != 200:
                    error = error_of(resp)
            if resp.status != 200:
                raise _failure_of(error.get("profile") or profile, error)
    except Failure as exc:
        return fail(exc.message, exc.code)
    except KeyboardInterrupt:
        return fail("interrupted", INTERRUPTED)
    except wire.Unreachable as exc:
        return fail(f"iapd stopped answering: {exc}", UNREACHABLE)
    sys.stdout.write((resp.body.decode() if fmt == "plain" else formatted(resp.json(), fmt)) + "\n")
    return OK


def _failure_of(profile: str, error: dict) -> Failure:
    code = error.get("error")
    message = error.get("message", "")
    if code == "login_required":
        return Failure(f"login required for profile {profile} ({message}): run `iapctl login {profile}`",
                       LOGIN_REQUIRED)
    if code == "upstream_unavailable":
        return Failure(f"Google is not answering for profile {profile} ({message}); try again shortly",
                       UPSTREAM)
    if code == "upstream_error":
        return Failure(f"Google refused profile {profile}: {message} (retrying will not help: check the profile)",
                       UPSTREAM)
    if code == "bad_config":  # a missing key file, say: the profile cannot work as configured
        return Failure(f"profile {profile} cannot work as configured: {message}", BAD_PROFILE)
    return Failure(message or f"iapd answered {code}", EXIT_CODE_OF_ERROR.get(code, ERROR))


# -- flyte-iap's subcommands, on the same fast path ------------------------------------------------

DROP_IN_FLAGS = {
    "generate-user-id-token": ({"desktop_client_id", "desktop_client_secret_gcp_secret_name", "webapp_client_id",
                                "project"}, set()),
    "generate-service-account-id-token": (set(), {"webapp_client_id", "jwt_audience", "service_account_key"}),
}


def _flags(args: list[str], required: set, optional: set) -> dict | None:
    """`--name value` / `--name=value` pairs, or None for anything else (argparse then answers,
    with its usage messages): no argparse and no json on the path flytekit calls."""
    flags: dict = {}
    known = required | optional
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        name = name[2:] if name[:2] == "--" else ""
        if name not in known or name in flags:
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value, i = args[i + 1], i + 1
        if not value or '"' in value or "\\" in value or not value.isprintable():
            return None  # would need JSON escaping: the slow path does that
        flags[name] = value
        i += 1
    return flags if required <= flags.keys() else None


def adhoc_name(definition: str) -> str:
    """The ad-hoc profile's name for a definition: the same flags, the same name, run after run.
    The text as one integer modulo the largest 64-bit prime — one C-level operation, where a
    byte-by-byte hash in Python cost 0.57 M instructions, 1.6 % of the whole call. A collision
    costs nothing silently: the daemon refuses a name already taken by another definition."""
    return "adhoc-" + f"{int.from_bytes(definition.encode(), 'little') % 0xFFFFFFFFFFFFFFC5:016x}"


def drop_in(command: str, args: list[str]) -> int | None:
    """flyte-iap's subcommand as an ad-hoc profile named by its definition: a GET of its token
    (the daemon's fast path once it is cached), registered with a POST only the first time.
    None: not a plain call (argparse takes it)."""
    flags = _flags(args, *DROP_IN_FLAGS[command])
    if flags is None:
        return None
    if command != "generate-user-id-token" and ("webapp_client_id" in flags) == ("jwt_audience" in flags):
        return None  # argparse says which one is wanted
    # A signed JWT (`--jwt_audience URL`, the app's URL or `…/*`) or an ID token for IAP's client.
    audience_key = "jwt_audience" if "jwt_audience" in flags else "audience"
    audience = flags.get("webapp_client_id") or flags["jwt_audience"]
    if command == "generate-user-id-token":
        secret = flags["desktop_client_secret_gcp_secret_name"]
        if not secret.startswith("projects/"):
            secret = f"projects/{flags['project']}/secrets/{secret}/versions/latest"
        source = f'"user":{{"client_id":"{flags["desktop_client_id"]}","client_secret_name":"{secret}"}}'
    else:
        # flyte-iap's order: --service_account_key, else $GOOGLE_APPLICATION_CREDENTIALS (which
        # may also be a workload identity federation file), else the metadata server.
        key = flags.get("service_account_key") or paths.env("GOOGLE_APPLICATION_CREDENTIALS")
        if key and not paths.is_file(key):
            return fail(f"credentials file {key} does not exist", BAD_PROFILE)
        key = paths.absolute(key) if key else None
        if key and ('"' in key or "\\" in key or not key.isprintable()):
            return None
        if flags.get("service_account_key"):
            source = f'"service_account":{{"kind":"key_file","key_file":"{key}"}}'
        elif key:
            source = f'"service_account":{{"kind":"adc","credentials_file":"{key}"}}'
        else:
            source = '"service_account":{"kind":"metadata"}'
    definition = f'"{audience_key}":"{audience}",{source}'
    name = adhoc_name(definition)
    return run(name, adhoc=f'{{"name":"{name}",{definition}}}'.encode())


def status_text() -> int | None:
    """`iapctl status`, rendered by the daemon (iapctl.status_text): no argparse, no json here.
    None when the daemon does not answer: the full command says why and what to do."""
    try:
        resp = call("GET", "/v1/status?format=text", autostart=False)
    except Failure:
        return None
    if resp.status != 200:
        return None
    try:
        sys.stdout.write(resp.body.decode())
        sys.stdout.flush()
    except BrokenPipeError:
        reader_gone()
    return OK


def reader_gone() -> None:
    """`iapctl status | head -1`: the reader is gone, which is its right. No traceback, and none
    at exit either (Python flushes stdout then): point stdout at /dev/null."""
    import os

    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


FORMATS = ("plain", "header", "json", "exec-credential")


def formatted(info: dict, fmt: str) -> str:
    """The token with its expiry (`GET /v1/token/P?format=json`), as a header line, JSON, or the
    `client.authentication.k8s.io/v1` ExecCredential kubectl reads from an exec plugin."""
    import json

    if fmt == "header":
        return f"Bearer {info['token']}"
    if fmt == "json":
        return json.dumps({"profile": info["profile"], "token": info["token"], "expires_at": info["expires_at"]})
    return json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                       "status": {"token": info["token"], "expirationTimestamp": info["expires_at"]}})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "token" and not args[1].startswith("-"):
        return run(args[1])
    if args == ["status"]:
        code = status_text()
        if code is not None:
            return code
    if args and args[0] in DROP_IN_FLAGS:
        code = drop_in(args[0], args[1:])
        if code is not None:
            return code
    from iapctl.commands import dispatch

    return dispatch(args)
