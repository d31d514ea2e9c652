"""The credential store: refresh tokens and cached client secrets, per credential key.

One JSON file, `$XDG_STATE_HOME/iapd/credentials.json`, 0600 in a 0700 directory, rewritten
atomically (see fsutil). Reads and writes run in a worker thread — the event loop never waits
on the disk — and writes are serialised, so the file always holds the latest complete state.

With `store = "keyring"` the secret fields of each record (SECRET_FIELDS) live in the OS keyring
instead (iapd.keyring), one item per login, written only when they change; the file keeps the
rest. The keyring is written first, then the file: a kill between the two leaves the new secret
in the keyring, which wins when the two are merged at the next start.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from iapctl.paths import ensure_private_dir
from iapd.fsutil import atomic_write
from iapd.keyring import KeyringUnavailable, vault_for

log = logging.getLogger("iapd.store")
VERSION = 1
SECRET_FIELDS = ("refresh_token", "client_secret")


def _secrets_of(record: dict[str, Any] | None) -> dict[str, Any]:
    return {k: record[k] for k in SECRET_FIELDS if record and record.get(k) is not None}


def _without_secrets(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {key: {k: v for k, v in r.items() if k not in SECRET_FIELDS} for key, r in records.items()}


class CredentialStore:
    def __init__(self, path: Path, records: dict[str, dict[str, Any]], kind: str = "file") -> None:
        self.path = path
        self._records = records
        self.kind = kind  # where the secrets are: "file" or "keyring"
        self.vault = None  # the keyring, when kind is "keyring"
        # Whether the secrets are in the keyring now (kind says where they are *to* be: a switch
        # to a locked keyring leaves them in the file, and a switch back then has nothing to move).
        self._in_keyring = kind == "keyring"
        # Why the keyring cannot be used (missing, locked, refused): in status; writes fail with it.
        self.error: str | None = None
        self._lock = asyncio.Lock()
        # Stores moved aside as unreadable (this start or an earlier one): their refresh tokens
        # may still work, so status names them and logout --all revokes and removes them.
        self.unreadable: list[Path] = []
        self._lock_fd: int | None = None  # held (flock) while this daemon owns the store

    @classmethod
    async def open(cls, state_dir: Path, owner: str | None = None, kind: str = "file") -> "CredentialStore":
        """The store in `state_dir`. With `owner` (a daemon: its pid and socket), also take the
        store's lock for this process's life: two daemons on one store would each refresh the
        same refresh token, and an issuer that rotates them revokes the grant. `kind`: where the
        secrets are to be (logins found in the other place are moved, see `use`)."""
        await asyncio.to_thread(ensure_private_dir, state_dir)
        path = state_dir / "credentials.json"
        lock_fd = await asyncio.to_thread(_take_lock, state_dir / "iapd.lock", owner) if owner else None
        records, was = await asyncio.to_thread(cls._read, path)
        store = cls(path, records, was)
        store._lock_fd = lock_fd
        store.unreadable = await asyncio.to_thread(lambda: sorted(path.parent.glob(f"{path.name}.unreadable-*")))
        await store.use(kind)
        return store

    async def use(self, kind: str) -> None:
        """Keep the secrets in `kind` from now on, moving what the other place holds: file →
        keyring puts each login's secrets in the keyring and then rewrites the file without them;
        keyring → file writes them into the file and then removes the keyring's items. Nothing is
        left behind, and nothing is lost if the keyring cannot be reached (then `error` says why,
        and the file is not touched)."""
        async with self._lock:
            if kind == "keyring":
                await self._to_keyring()
            elif self.kind == "keyring":
                await self._to_file()
            else:
                self.error = None

    async def _to_keyring(self) -> None:
        vault = self.vault or vault_for(str(self.path.parent))
        try:
            held = await asyncio.to_thread(vault.items, list(self._records))
            records = self._with_secrets(held)
            for key, record in records.items():  # secrets the file still holds (a switch from "file")
                if _secrets_of(record) and _secrets_of(record) != held.get(key):
                    await asyncio.to_thread(vault.put, key, _secrets_of(record))
            self.vault, self.kind = vault, "keyring"
            await self._persist(records)
            self._in_keyring = True
        except KeyringUnavailable as exc:
            self.vault, self.kind, self.error = vault, "keyring", str(exc)
            log.error("credential store: %s", exc)
            return
        if self.error:
            log.info("credential store: the keyring is usable again")
        self.error = None

    async def _to_file(self) -> None:
        if not self._in_keyring:  # a switch to the keyring never happened: the file has them all
            self.kind, self.vault, self.error = "file", None, None
            return
        vault = self.vault or vault_for(str(self.path.parent))
        try:
            held = await asyncio.to_thread(vault.items, list(self._records))
        except KeyringUnavailable as exc:
            self.error = f"the logins are in the keyring, which cannot be read to move them to the file: {exc}"
            log.error("credential store: %s", self.error)
            return
        records = self._with_secrets(held)
        self.kind, self.vault = "file", None
        await self._persist(records)  # the file has them: only now do they leave the keyring
        self._in_keyring = False
        for key in held:
            try:
                await asyncio.to_thread(vault.delete, key)
            except KeyringUnavailable as exc:
                log.error("credential store: moved the logins to the file, but could not remove %s from the "
                          "keyring: %s", key, exc)
        self.error = None

    def _with_secrets(self, held: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The records with the secrets the keyring holds merged in (the keyring's win)."""
        records = copy.deepcopy(self._records)
        for key, secrets in held.items():
            records.setdefault(key, {}).update(secrets)
        return records

    @staticmethod
    def _remove_leftovers(path: Path) -> None:
        """Temp files of a writer killed before its rename: never the real state, safe to drop."""
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)

    @classmethod
    def _read(cls, path: Path) -> tuple[dict[str, dict[str, Any]], str]:
        cls._remove_leftovers(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}, "file"
        try:
            data = json.loads(raw)
            records = data["credentials"]
            if data.get("version") != VERSION or not isinstance(records, dict) \
                    or data.get("store", "file") not in ("file", "keyring"):
                raise ValueError("unknown layout")
            for record in records.values():
                _check_record(record)
            return records, data.get("store", "file")
        except (ValueError, KeyError, TypeError) as exc:
            # Atomic writes make this unlikely (a disk error, a hand edit). Keep the file for a
            # person to look at rather than overwrite it, and start empty: a login fixes it.
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.rename(aside)
            log.error("credential store %s is unreadable (%s); moved it to %s, a new login is needed",
                      path, type(exc).__name__, aside)
            return {}, "file"

    @staticmethod
    def refresh_tokens_in(path: Path) -> list[tuple[str, str, str | None]]:
        """Every refresh token a moved-aside store still holds, as far as it can be read: (its
        record's key, the token, the revocation endpoint recorded with it or None). Read as text:
        a store is moved aside because it does not parse, and its flat records usually still do."""
        text = path.read_text(encoding="utf-8", errors="replace")
        found: list[tuple[str, str, str | None]] = []
        for record in re.finditer(r'"([^"\\]+)"\s*:\s*\{([^{}]*)(?:\}|$)', text):
            key, body = record.group(1), record.group(2)
            token = re.search(r'"refresh_token"\s*:\s*"([^"\\]+)"', body)
            if token is None:
                continue
            url = re.search(r'"revocation_endpoint"\s*:\s*"([^"\\]+)"', body)
            found.append((key, token.group(1), url.group(1) if url else None))
        return found

    def get(self, key: str) -> dict[str, Any] | None:
        record = self._records.get(key)
        if record is None:
            return None
        if self.error and not record.get("refresh_token"):
            return {**record, "login_reason": self.error}  # the keyring's state is the reason
        return dict(record)

    def keys(self) -> list[str]:
        return list(self._records)

    async def put(self, key: str, record: dict[str, Any]) -> None:
        await self._write(lambda records: records.__setitem__(key, {**record, "updated": int(time.time())}))

    async def update(self, key: str, **fields: Any) -> None:
        await self._write(lambda records: records.setdefault(key, {}).update(fields, updated=int(time.time())))

    async def delete(self, key: str) -> bool:
        if key not in self._records:
            return False
        await self._write(lambda records: records.pop(key, None))
        return True

    async def swap(self, key: str, expected: str | None, **fields: Any) -> bool:
        """Compare-and-swap: update `key` only if it still holds the refresh token `expected`
        (a rotation must not overwrite a login that landed while it talked to the issuer)."""
        async with self._lock:
            if (self._records.get(key) or {}).get("refresh_token") != expected:
                return False
            await self._write_locked(lambda records: records.setdefault(key, {}).update(fields, updated=int(time.time())))
            return True

    async def _write(self, change) -> None:
        async with self._lock:
            await self._write_locked(change)

    async def _write_locked(self, change) -> None:
        records = copy.deepcopy(self._records)
        change(records)
        if self.kind == "keyring":
            if self.error:
                raise KeyringUnavailable(self.error)
            # Only what changed goes to the keyring: a refresh that rotates nothing writes nothing.
            for key in set(records) | set(self._records):
                before, after = _secrets_of(self._records.get(key)), _secrets_of(records.get(key))
                if before == after:
                    continue
                await asyncio.to_thread(self.vault.put, key, after) if after else \
                    await asyncio.to_thread(self.vault.delete, key)
        await self._persist(records)

    async def _persist(self, records: dict[str, dict[str, Any]]) -> None:
        """The file: every field, or with the keyring every field but the secrets."""
        kept = _without_secrets(records) if self.kind == "keyring" else records
        data = json.dumps({"version": VERSION, "store": self.kind, "credentials": kept}, indent=1,
                          sort_keys=True).encode()
        await asyncio.to_thread(atomic_write, self.path, data)
        # Only now is the change real: a failed write leaves memory and disk in agreement.
        self._records = records


class StoreInUse(Exception):
    """Another daemon owns this store (its lock is held)."""


def _take_lock(path: Path, owner: str) -> int:
    """flock the store's lock file (released by the kernel when we exit, kill -9 included) and
    say in it who holds it; if another process holds it, say who that is."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(f"another iapd ({holder}) uses the store in {path.parent}: one store, one daemon — "
                         "stop that one (`iapctl stop`), or give this config a [daemon] state_dir of its own") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    return fd


# What a record may hold, and of what type: a hand edit or a bug that wrote another shape must
# read as an unreadable store (moved aside, a new login needed), not crash the daemon later.
RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "refresh_token": (str, type(None)), "email": (str, type(None)), "client_id": (str,),
    "client_secret": (str,), "client_secret_name": (str,), "login_reason": (str, type(None)), "updated": (int,),
    # Where the login was minted, and so the only places its refresh token is ever sent.
    "token_endpoint": (str,), "revocation_endpoint": (str,),
}


def _check_record(record: Any) -> None:
    if not isinstance(record, dict):
        raise TypeError("a record is not an object")
    for name, value in record.items():
        if not isinstance(value, RECORD_FIELDS.get(name, (object,))):
            raise TypeError(f"field {name} has the wrong type")
