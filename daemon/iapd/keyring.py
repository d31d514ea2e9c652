"""Where a login's secrets go with `[daemon] store = "keyring"`: the OS keyring.

One item per login, holding its secret fields (refresh token, client secret) as one JSON value,
so an item is complete or absent — never half a login. Items are found by attributes
(`application = iapd`, `scope` = the state directory, `key` = the login's key); everything else
about a login (who, when, where it was minted) stays in the state directory's file.

* Linux: the Secret Service (gnome-keyring, KeePassXC…) over D-Bus with `secretstorage`, the
  library python-keyring itself uses there — taken directly, because keyring's API has no
  attributes to search by, and hides a locked collection behind a prompt that, in a daemon, no
  one answers.
* macOS: the login Keychain through `/usr/bin/security`: signed by Apple, so the Keychain asks
  once, not for every Python interpreter (flyte-sdk 1300), and items are updated in place (-U)
  rather than deleted and re-added. Secrets go to it on stdin (`security -i`), never in argv
  where `ps` shows them.

Every call is blocking (D-Bus, a subprocess): the store runs them in a thread. Failures are
`KeyringUnavailable` (an OSError, as a full disk is for the file store), one line with the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

FIX = 'unlock the keyring (log in to the desktop session), then `iapctl reload`; or set [daemon] store = "file"'


class KeyringUnavailable(OSError):
    """The keyring is missing, locked or refused: `str()` is the one line for the user."""


class SecretServiceVault:
    """Linux: the Secret Service's default collection."""

    name = "Secret Service"

    def __init__(self, scope: str) -> None:
        self.scope = scope
        self._collection = None

    def _open(self):
        if self._collection is not None:
            return self._collection
        try:
            import secretstorage
            from jeepney.wrappers import DBusErrorResponse
        except ImportError:
            raise KeyringUnavailable("the keyring store needs the secretstorage package (pip install secretstorage)") \
                from None
        try:
            connection = secretstorage.dbus_init()
            collection = secretstorage.get_default_collection(connection)
            locked = collection.is_locked()
        except secretstorage.exceptions.SecretServiceNotAvailableException as exc:
            raise KeyringUnavailable(f"no Secret Service on this session's D-Bus ({str(exc)[:120]}): start one "
                                     '(gnome-keyring, KeePassXC) or set [daemon] store = "file"') from None
        except (secretstorage.exceptions.SecretStorageException, DBusErrorResponse, OSError) as exc:
            raise KeyringUnavailable(f"the Secret Service refused ({type(exc).__name__}: {str(exc)[:120]}); {FIX}") \
                from None
        if locked:
            raise KeyringUnavailable(f"the keyring (Secret Service collection {collection.get_label()!r}) is locked; {FIX}")
        self._collection = collection
        return collection

    def _attributes(self, key: str | None = None) -> dict[str, str]:
        attributes = {"application": "iapd", "scope": self.scope}
        if key is not None:
            attributes["key"] = key
        return attributes

    def _guarded(self, fn):
        import secretstorage
        from jeepney.wrappers import DBusErrorResponse

        try:
            return fn(self._open())
        except KeyringUnavailable:
            raise
        except (secretstorage.exceptions.SecretStorageException, DBusErrorResponse, OSError) as exc:
            self._collection = None  # ask again next time (it may have been locked meanwhile)
            raise KeyringUnavailable(f"the keyring refused ({type(exc).__name__}: {str(exc)[:120]}); {FIX}") from None

    def items(self, keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Every login item of this scope (`keys`, the ones the state file names, is not needed:
        the Secret Service searches by attribute, and finds items the file lost too)."""
        def read(collection):
            found: dict[str, dict[str, Any]] = {}
            for item in collection.search_items(self._attributes()):
                key = item.get_attributes().get("key")
                try:
                    value = json.loads(item.get_secret())
                except ValueError:
                    continue  # not ours to read: left alone
                if key and isinstance(value, dict):
                    found[key] = value
            return found
        return self._guarded(read)

    def put(self, key: str, secrets: dict[str, Any]) -> None:
        value = json.dumps(secrets, sort_keys=True).encode()
        # replace=True: the item with these attributes is updated in one call — complete or not at all.
        self._guarded(lambda c: c.create_item(f"iapd login {key}", self._attributes(key), value, replace=True))

    def delete(self, key: str) -> None:
        def remove(collection):
            for item in list(collection.search_items(self._attributes(key))):
                item.delete()
        self._guarded(remove)


class KeychainVault:
    """macOS: generic passwords in the login Keychain, service `iapd:SCOPE`, account = the key.
    The Keychain cannot be searched by service alone from `security`: the keys to look for are
    the ones the state file names (`items(keys)`)."""

    name = "login Keychain"

    def __init__(self, scope: str) -> None:
        self.service = f"iapd:{scope}"
        self.command = shutil.which("security", path=os.environ.get("IAPD_SECURITY_PATH") or "/usr/bin") or "security"

    def _run(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run([self.command, *args], input=stdin, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeyringUnavailable(f"cannot run {self.command} ({type(exc).__name__}); "
                                     'set [daemon] store = "file"') from None
        return done

    def _check(self, done: subprocess.CompletedProcess, what: str) -> None:
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise KeyringUnavailable(f"the Keychain refused to {what} ({said[0][:150]}); unlock the login keychain "
                                     '(`security unlock-keychain`), then `iapctl reload`; or set [daemon] store = "file"')

    def items(self, keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for key in keys or []:
            done = self._run(["find-generic-password", "-s", self.service, "-a", key, "-w"])
            if done.returncode == 44:  # errSecItemNotFound
                continue
            self._check(done, "read a login")
            try:
                value = json.loads(done.stdout.strip())
            except ValueError:
                continue
            if isinstance(value, dict):
                found[key] = value
        return found

    def put(self, key: str, secrets: dict[str, Any]) -> None:
        hex_value = json.dumps(secrets, sort_keys=True).encode().hex()
        # -U updates in place; -X takes the value as hex (no quoting trap), on stdin (not argv).
        line = f"add-generic-password -U -s {_quoted(self.service)} -a {_quoted(key)} -l {_quoted('iapd login ' + key)} " \
               f"-X {hex_value}\n"
        self._check(self._run(["-i"], stdin=line), "store a login")

    def delete(self, key: str) -> None:
        done = self._run(["delete-generic-password", "-s", self.service, "-a", key])
        if done.returncode != 44:
            self._check(done, "remove a login")


def _quoted(value: str) -> str:
    """`security -i` splits its lines like a shell: a value in double quotes, its quotes escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def vault_for(scope: str):
    """This platform's keyring. IAPD_KEYRING=keychain selects the macOS one elsewhere (tests
    run it against a stand-in `security`, IAPD_SECURITY_PATH)."""
    if sys.platform == "darwin" or os.environ.get("IAPD_KEYRING") == "keychain":
        return KeychainVault(scope)
    return SecretServiceVault(scope)
