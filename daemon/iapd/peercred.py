"""Who is on the other end of a unix socket: the kernel says, not the file modes.

Linux: SO_PEERCRED (pid, uid, gid). macOS/BSD: LOCAL_PEERCRED (struct xucred), which is what
getpeereid(3) reads. Either way, a connection from another uid is refused even if the socket's
mode was loosened by mistake (or by an attacker who can write the directory).
"""

from __future__ import annotations

import socket
import struct
import sys

SOL_LOCAL = 0
LOCAL_PEERCRED = 0x001


def peer_uid(sock: socket.socket) -> int | None:
    """The peer's uid, or None when the platform cannot say (then the caller refuses)."""
    try:
        if hasattr(socket, "SO_PEERCRED"):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            return uid
        if sys.platform == "darwin" or "bsd" in sys.platform:
            # struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
            raw = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, struct.calcsize("IIh16I"))
            _version, uid = struct.unpack_from("II", raw)
            return uid
    except OSError:
        return None
    return None
