"""sd_notify without libsystemd: one datagram to `$NOTIFY_SOCKET`.

systemd (Type=notify) waits for READY=1 before it calls the unit started; STATUS= shows in
`systemctl --user status iapd`; STOPPING=1 says a shutdown is under way. Tests use the same
channel to learn, without polling, that a daemon they started is ready.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True
