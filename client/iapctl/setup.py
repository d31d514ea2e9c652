"""`iapctl setup URL --profile NAME`: from an app's URL to a working profile.

The URL is asked without credentials; IAP's redirect to Google's sign-in names IAP's own OAuth
client (the audience), a gateway's names its issuer. The profile is appended to the config (the
user's text and comments are kept as they are), iapd re-reads it, a login runs if one is needed,
and the URL is asked again with the token to prove it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import tomllib

from iapctl import paths, probe
from iapctl.cli import BAD_PROFILE, LOGIN_REQUIRED, OK, UPSTREAM, USAGE, Failure, call, error_of, valid_profile
from iapctl.shown import shown
from iapctl.urls import secure_url

WHERE_ADMINS_FIND_IT = ("the desktop OAuth client an admin created for command-line access (Google Cloud console → "
                        "APIs & Services → Credentials → OAuth 2.0 Client IDs, type Desktop, in the project of the "
                        "app's IAP), and its secret or the Secret Manager secret that holds it")


def _toml(value) -> str:
    """A TOML value: a JSON string is a valid TOML basic string; lists and booleans likewise."""
    return json.dumps(value)


def _config_text(path: str) -> tuple[str, dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return "", {}
    except (OSError, UnicodeDecodeError) as exc:
        raise Failure(f"cannot read the config {path}: {exc}", BAD_PROFILE) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Failure(f"the config {path} is not valid TOML ({exc}); fix it first", BAD_PROFILE) from None


def _google_login(data: dict, args) -> tuple[dict, str]:
    """The [user] table for a Google profile, and where it came from (for the report)."""
    if args.client_id:
        secrets = [s for s in (args.client_secret_name, args.client_secret) if s]
        if len(secrets) != 1:
            raise Failure("with --client-id, give one of --client-secret-name (projects/P/secrets/S/versions/V) "
                          "or --client-secret", USAGE)
        user = {"client_id": args.client_id}
        user["client_secret_name" if args.client_secret_name else "client_secret"] = secrets[0]
        return user, "the desktop client given"
    logins: dict[str, tuple[str, dict]] = {}
    for name, profile in (data.get("profiles") or {}).items():
        user = profile.get("user") if isinstance(profile, dict) else None
        if isinstance(user, dict) and "client_id" in user:
            logins.setdefault(json.dumps(user, sort_keys=True), (name, user))
    if len(logins) == 1:
        name, user = next(iter(logins.values()))
        return dict(user), f"the login of profile {name}, reused (no second browser login)"
    if logins:
        names = ", ".join(sorted(n for n, _ in logins.values()))
        raise Failure(f"the config has {len(logins)} Google logins (profiles {names}): choose one with --client-id "
                      "and --client-secret-name (or --client-secret)", USAGE)
    raise Failure(f"no Google login in the config to reuse: pass --client-id and --client-secret-name (or "
                  f"--client-secret): {WHERE_ADMINS_FIND_IT}", USAGE)


def _block(name: str, guard: probe.Guard, data: dict, args) -> tuple[str, str]:
    """The TOML to append, and a line saying where each value came from."""
    if guard.kind == "google_iap":
        user, origin = _google_login(data, args)
        lines = [f"[profiles.{name}]", f"audience = {_toml(guard.client_id)}", f"[profiles.{name}.user]",
                 *(f"{k} = {_toml(v)}" for k, v in user.items())]
        return "\n".join(lines) + "\n", f"audience {guard.client_id} (IAP's OAuth client, from its sign-in redirect); {origin}"
    if guard.kind == "oidc":
        if not guard.issuer:
            raise Failure(f"{guard.seen}; write an [oidc] profile by hand with its issuer (see the README)", BAD_PROFILE)
        client_id = args.client_id or guard.client_id
        lines = [f"[profiles.{name}.oidc]", f"issuer = {_toml(guard.issuer)}", f"client_id = {_toml(client_id)}"]
        if args.client_secret:
            lines.append(f"client_secret = {_toml(args.client_secret)}")
        origin = f"issuer {guard.issuer} and client {client_id}" + (
            "" if args.client_id else " (the gateway's own: if it is a confidential client, ask for a public CLI client "
                                      "and pass --client-id)")
        return "\n".join(lines) + "\n", origin
    raise Failure(f"{guard.seen}; configure the profile by hand (see the README's Configuration)", BAD_PROFILE)


_HEADER = re.compile(r'^\s*\[\s*profiles\s*\.\s*(?:"([^"]+)"|([A-Za-z0-9_-]+))\s*[.\]]')
_ANY_HEADER = re.compile(r"^\s*\[")


def without_profile(text: str, name: str) -> str:
    """The config text without the tables of profile `name` (`[profiles.NAME]` and its sub-tables),
    everything else kept byte for byte."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if _ANY_HEADER.match(line):
            match = _HEADER.match(line)
            skipping = bool(match) and (match.group(1) or match.group(2)) == name
        if not skipping:
            out.append(line)
    return "".join(out)


def _write(path: str, text: str) -> None:
    """Atomically, 0600 (the file may hold a client secret), in a directory only we can write."""
    folder = os.path.dirname(path) or "."
    try:
        paths.ensure_private_dir(folder, tighten=False)
    except (paths.UnsafePath, OSError) as exc:
        raise Failure(f"cannot write the config in {folder}: {exc}", BAD_PROFILE) from None
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".config.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _validate(text: str, path: str) -> None:
    """With the daemon's own rules when it is installed here (else iapd's reload judges)."""
    try:
        from iapd.config import ConfigError, parse_config
    except ImportError:
        return
    try:
        parse_config(text, path)
    except ConfigError as exc:
        raise Failure(f"the profile would not be valid, nothing was written: {exc}", BAD_PROFILE) from None


def _token(name: str) -> tuple[str | None, dict]:
    """The profile's token (logging in first when needed), or None and the daemon's error."""
    resp = call("GET", f"/v1/token/{name}?format=json")
    if resp.status != 200 and error_of(resp).get("error") == "login_required":
        from iapctl.autologin import Console, can_open_browser, login

        outcome = login(name, Console(), can_open_browser())
        if outcome.get("state") != "done":
            return None, {"error": "login_required", "message": outcome.get("error") or "the login did not complete"}
        resp = call("GET", f"/v1/token/{name}?format=json")
    if resp.status != 200:
        return None, error_of(resp)
    return resp.json()["token"], {}


def run_setup(args) -> int:
    url, name = args.url, args.profile
    if not valid_profile(name):
        raise Failure(f"invalid profile name {name!r} (letters, digits, . _ - @)", USAGE)
    if not url.startswith(("https://", "http://")) or not url.isprintable() or " " in url:
        raise Failure(f"expected the app's URL (https://…), not {url!r}", USAGE)  # (it goes into a comment, too)
    if not secure_url(url):
        raise Failure(f"{url} is plain http to another machine: a token would travel in the clear; use https", USAGE)
    path = paths.config_path()
    text, data = _config_text(path)
    exists = name in (data.get("profiles") or {})
    if exists and not args.force:
        raise Failure(f"profile {name} already exists in {path}: choose another name, or --force to replace it", USAGE)

    try:
        guard = probe.who_guards(url, probe.sign_in_url(data))
    except (OSError, ValueError) as exc:
        raise Failure(str(exc), UPSTREAM) from None
    block, origin = _block(name, guard, data, args)
    if args.dry_run:
        # The TOML as it would be written — but a client secret is not printed (terminals scroll
        # into logs and screen shares): it is in the file only.
        sys.stdout.write(re.sub(r'^(client_secret = ).*$', r'\1"…"  # (as given: not shown)', block, flags=re.M))
        return OK

    status = call("GET", "/v1/status")
    reads = (status.json().get("daemon") or {}).get("config") if status.status == 200 else None
    if reads and os.path.realpath(reads) != os.path.realpath(path):  # (as `iapctl doctor` compares them)
        raise Failure(f"iapd reads {reads}, not {path}: run setup with IAPD_CONFIG={reads}", BAD_PROFILE)
    kept = without_profile(text, name) if exists else text
    if exists and name in (tomllib.loads(kept).get("profiles") or {}):
        raise Failure(f"profile {name} is not written as [profiles.{name}] tables in {path}: replace it by hand", USAGE)
    stamp = time.strftime("%Y-%m-%d")
    new_text = kept + ("\n" if kept and not kept.endswith("\n") else "") + ("\n" if kept else "") + \
        f"# Added by `iapctl setup {url}` on {stamp}.\n" + block
    _validate(new_text, path)
    _write(path, new_text)
    print(shown(f"Wrote profile {name} to {path}: {origin}."))

    reloaded = call("POST", "/v1/reload")
    answer = reloaded.json() if reloaded.status == 200 else error_of(reloaded)
    if not answer.get("reloaded"):
        _write(path, text)  # iapd refused it: the config is as it was, and iapd reads it again
        call("POST", "/v1/reload")
        raise Failure(f"iapd refused the new config ({answer.get('error') or answer.get('message')}); "
                      f"{path} is as it was", BAD_PROFILE)

    token, error = _token(name)
    if token is None:
        code = LOGIN_REQUIRED if error.get("error") == "login_required" else UPSTREAM
        raise Failure(f"profile {name} is written, but no token yet: {error.get('message')}", code)
    try:
        answer = probe.fetch(url, token)
    except (OSError, ValueError) as exc:
        raise Failure(f"profile {name} is written and has a token, but {exc}", UPSTREAM) from None
    profile = {"name": name, "mode": "audience" if guard.kind == "google_iap" else "oidc"}
    finding = probe.verdict(answer, probe.claims_of(token), guard, profile)
    if finding.ok:
        print(shown(f"{url}: {finding.what}."))
        return OK
    print(shown(f"{url}: {finding.what} → {finding.fix}"))
    return UPSTREAM
