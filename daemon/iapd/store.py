"""The credential store: refresh tokens and cached client secrets, per credential key.

One JSON file, `$XDG_STATE_HOME/iapd/credentials.json`, 0600 in a 0700 directory, rewritten
atomically (see fsutil). Reads and writes run in a worker thread — the event loop never waits
on the disk — and writes are serialised, so the file always holds the latest complete state.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from iapd.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger("iapd.store")
VERSION = 1


class CredentialStore:
    def __init__(self, path: Path, records: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self._records = records
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, state_dir: Path) -> "CredentialStore":
        await asyncio.to_thread(ensure_private_dir, state_dir)
        path = state_dir / "credentials.json"
        return cls(path, await asyncio.to_thread(cls._read, path))

    @staticmethod
    def _remove_leftovers(path: Path) -> None:
        """Temp files of a writer killed before its rename: never the real state, safe to drop."""
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)

    @classmethod
    def _read(cls, path: Path) -> dict[str, dict[str, Any]]:
        cls._remove_leftovers(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            records = data["credentials"]
            if data.get("version") != VERSION or not isinstance(records, dict):
                raise ValueError("unknown layout")
            return records
        except (ValueError, KeyError, TypeError) as exc:
            # Atomic writes make this unlikely (a disk error, a hand edit). Keep the file for a
            # person to look at rather than overwrite it, and start empty: a login fixes it.
            aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
            path.rename(aside)
            log.error("credential store %s is unreadable (%s); moved it to %s, a new login is needed",
                      path, type(exc).__name__, aside)
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        record = self._records.get(key)
        return dict(record) if record is not None else None

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

    async def _write(self, change) -> None:
        async with self._lock:
            records = copy.deepcopy(self._records)
            change(records)
            data = json.dumps({"version": VERSION, "credentials": records}, indent=1, sort_keys=True).encode()
            await asyncio.to_thread(atomic_write, self.path, data)
            # Only now is the change real: a failed write leaves memory and disk in agreement.
            self._records = records
