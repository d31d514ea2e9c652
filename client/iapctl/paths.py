"""Where the config, the socket and the state live: one answer for the daemon and the client.

Standard library only (the client imports it on its hot path). Both commands honour
``IAPD_CONFIG`` and ``IAPD_SOCKET``; everything else follows the XDG base directory spec.
"""

import os

APP = "iapd"


def _xdg(var: str, fallback: str) -> str:
    value = os.environ.get(var, "")
    # The spec says relative paths in XDG variables are invalid and must be ignored.
    return value if os.path.isabs(value) else os.path.join(os.path.expanduser("~"), fallback)


def config_path() -> str:
    """``$IAPD_CONFIG``, else ``$XDG_CONFIG_HOME/iapd/config.toml``."""
    return os.environ.get("IAPD_CONFIG") or os.path.join(_xdg("XDG_CONFIG_HOME", ".config"), APP, "config.toml")


def state_dir() -> str:
    """``$XDG_STATE_HOME/iapd``: the credential store and the autostart lock."""
    return os.path.join(_xdg("XDG_STATE_HOME", os.path.join(".local", "state")), APP)


def socket_path() -> str:
    """``$IAPD_SOCKET``, else ``$XDG_RUNTIME_DIR/iapd/iapd.sock``.

    Without a runtime dir (macOS, SSH sessions without pam_systemd, containers) the socket goes
    to a per-user directory under ``$TMPDIR`` (per-user and 0700 on macOS already) or ``/tmp``;
    the daemon creates that directory 0700 and refuses one owned by someone else. The home
    directory is avoided on purpose: it may be on NFS, where unix sockets do not work, and its
    path may be longer than the ~104 bytes a socket path may have on macOS.
    """
    explicit = os.environ.get("IAPD_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, APP, "iapd.sock")
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"{APP}-{os.getuid()}", "iapd.sock")
