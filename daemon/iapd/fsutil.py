"""Writing files that hold secrets: 0600, atomically, durably.

A crash (or `kill -9`) at any instant leaves either the old file or the new one, never a
truncated mix: write a temp file in the same directory, fsync it, rename over the target,
fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnsafePath(Exception):
    """A directory we would put secrets in is a symlink, or owned or writable by someone else."""


def ensure_private_dir(path: Path, tighten: bool = True) -> Path:
    """Create `path` 0700 if missing. Refuse a symlink, a directory of another user, or one
    that other users can write to (they could swap our files). With `tighten` (directories that
    are iapd's own), also remove any read/search access for others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(f"{path} is a symlink; refusing to keep credentials or a socket behind it")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise UnsafePath(f"{path} belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    if info.st_mode & 0o022:
        raise UnsafePath(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
                         f"use a private directory, or `chmod 700 {path}`")
    if tighten and info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed or (if 0) not mattered; be exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
