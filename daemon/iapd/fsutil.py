"""Writing files that hold secrets: 0600, atomically, durably.

A crash (or `kill -9`) at any instant leaves either the old file or the new one, never a
truncated mix: write a temp file in the same directory, fsync it, rename over the target,
fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
from pathlib import Path



def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one. A failure (a
    full disk, say) raises, and leaves neither a half-written file nor the temp file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed or (if 0) not mattered; be exact
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
