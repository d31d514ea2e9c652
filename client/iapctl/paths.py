"""Where the config, the socket and the state live: one answer for the daemon and the client.

Standard library only (the client imports it on its hot path). Both commands honour
``IAPD_CONFIG`` and ``IAPD_SOCKET`` (and the config's ``[daemon] socket``, with the same
precedence); everything else follows the XDG base directory spec.
"""

# The functions `iapctl token` calls (down to `unsafe_dir`) use `posix` rather than `os`: when
# the launcher starts Python without `site` (bin/iapctl), `os` is not imported yet, and importing
# it (with _collections_abc) would cost a fifth of what the whole token costs. The rest import
# `os` where they need it; the daemon has it anyway.
import posix

APP = "iapd"
_S_IFMT, _S_IFDIR, _S_IFLNK = 0o170000, 0o040000, 0o120000


def env(name: str) -> str:
    """An environment variable ("" when unset), as os.environ would give it — without os."""
    value = posix.environ.get(name.encode())
    return value.decode("utf-8", "surrogateescape") if value else ""


def _join(*parts: str) -> str:
    """os.path.join for absolute first parts and plain names after them."""
    return "/".join([parts[0].rstrip("/") or "", *parts[1:]]) or "/"


def _home() -> str:
    home = env("HOME")
    if home:
        return home
    import pwd  # as os.path.expanduser does without $HOME

    return pwd.getpwuid(posix.getuid()).pw_dir


def _is_dir(path: str) -> bool:
    try:
        return posix.stat(path).st_mode & _S_IFMT == _S_IFDIR
    except (OSError, ValueError):
        return False


def is_file(path: str) -> bool:
    """os.path.isfile, without os."""
    try:
        return posix.stat(path).st_mode & _S_IFMT == 0o100000
    except (OSError, ValueError):
        return False


def absolute(path: str) -> str:
    """os.path.abspath, without os (and so without importing posixpath's normpath for the
    common case of an absolute path with no `.` or `..` in it)."""
    if path.startswith("/") and "/." not in path and "//" not in path:
        return path
    import os

    return os.path.abspath(path)


def _xdg(var: str, fallback: str) -> str:
    value = env(var)
    # The spec says relative paths in XDG variables are invalid and must be ignored.
    return value if value.startswith("/") else _join(_home(), fallback)


def config_path() -> str:
    """``$IAPD_CONFIG``, else ``$XDG_CONFIG_HOME/iapd/config.toml``."""
    return env("IAPD_CONFIG") or _join(_xdg("XDG_CONFIG_HOME", ".config"), APP, "config.toml")


def state_dir() -> str:
    """``$XDG_STATE_HOME/iapd``: the credential store and the autostart lock."""
    return _join(_xdg("XDG_STATE_HOME", ".local/state"), APP)


def socket_path() -> str:
    """Where iapd listens, the same answer for every command: ``$IAPD_SOCKET``, else the config's
    ``[daemon] socket``, else the default (`default_socket_path`). (`iapd serve --socket` comes
    first for the daemon itself.)"""
    return env("IAPD_SOCKET") or configured_socket() or default_socket_path()


def configured_socket() -> str | None:
    """``[daemon] socket`` from the config file. On `iapctl token`'s hot path: the file is only
    parsed when it mentions a socket at all (tomllib costs more than the rest of the call)."""
    try:
        with open(config_path(), "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if b"socket" not in data:
        return None
    import tomllib

    try:
        value = tomllib.loads(data.decode("utf-8")).get("daemon", {}).get("socket")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # a broken config: the daemon says what is wrong with it
    if not isinstance(value, str) or not value:
        return None
    import os

    return os.path.expanduser(value)


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/iapd/iapd.sock``.

    Without a runtime dir (macOS, SSH sessions without pam_systemd, containers, `su`) the socket
    must go somewhere no other local user can claim first: a name in a shared ``/tmp`` can be
    created by anyone, who would then answer our requests (see wire.py) and keep our daemon
    from starting. So: ``$TMPDIR/iapd-UID/`` only when ``$TMPDIR`` is private to us (macOS gives
    every user one), else our state directory, in a folder named after this host (a home
    directory on NFS is shared by machines, and a socket belongs to one kernel).
    """
    runtime = env("XDG_RUNTIME_DIR")
    if runtime.startswith("/") and _is_dir(runtime):
        return _join(runtime, APP, "iapd.sock")
    tmp = env("TMPDIR")
    if tmp.startswith("/") and _is_dir(tmp) and unsafe_dir(tmp) is None:
        return _join(tmp, f"{APP}-{posix.getuid()}", "iapd.sock")
    return _join(state_dir(), f"run-{posix.uname().nodename or 'localhost'}", "iapd.sock")


def unsafe_dir(path: str) -> str | None:
    """Why another local user could control `path` (a directory for a socket or secrets), or
    None if only we can: it must be ours and not writable by group or others. One rule for the
    client (before it talks to a socket) and the daemon (for the directories it uses)."""
    try:
        info = posix.stat(path)
    except FileNotFoundError:
        return None  # nothing there yet: nothing to trust or distrust
    except OSError as exc:
        return f"{path} cannot be inspected ({exc.strerror})"
    if info.st_uid != posix.getuid():
        return f"{path} belongs to uid {info.st_uid}, not to you (uid {posix.getuid()})"
    if info.st_mode & 0o022:
        return f"{path} is writable by other users (mode {info.st_mode & 0o7777:o}): use a private directory"
    return None


def unsafe_file(path: str) -> str | None:
    """Why another local user could change what `path` (a file we take instructions from: the
    config) says, or None. The file must be ours (or root's) and writable by nobody else; so
    must every directory above it, as OpenSSH requires of its own files — except a sticky one
    of root's (/tmp), where others cannot rename or replace what is ours. A symlinked file is
    judged where it points, and the link where it lies."""
    import os
    import stat

    me = os.getuid()
    for target in {os.path.abspath(path), os.path.realpath(path)}:
        current = target
        while True:
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                info = None  # nothing there yet: but whoever controls the directory could put it there
            except OSError as exc:
                return f"{current} cannot be inspected ({exc.strerror})"
            if info is not None and info.st_uid not in (me, 0):
                return f"{current} belongs to uid {info.st_uid}, not to you (uid {me})"
            if info is not None and info.st_mode & 0o022 and not stat.S_ISLNK(info.st_mode) \
                    and not (current != target and info.st_mode & 0o1000 and info.st_uid == 0):
                return f"{current} is writable by other users (mode {info.st_mode & 0o7777:o})"
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return None


class UnsafePath(Exception):
    """A directory we would put secrets or a socket in is not ours alone."""


def ensure_private_dir(path: str, tighten: bool = True) -> None:
    """Create `path` 0700 if missing. Refuse a symlink, a directory of another user, or one
    that other users can write to (they could swap our files). With `tighten` (directories that
    are iapd's own), also remove any read/search access for others."""
    import os

    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if os.path.islink(path):
        raise UnsafePath(f"{path} is a symlink; refusing to keep credentials or a socket behind it")
    if not os.path.isdir(path):
        raise UnsafePath(f"{path} is not a directory")
    reason = unsafe_dir(path)
    if reason is not None:
        raise UnsafePath(reason)
    if tighten and info.st_mode & 0o077:
        os.chmod(path, 0o700)
