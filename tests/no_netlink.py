"""Run a command with socket(AF_NETLINK, …) refused — a seccomp filter, which is what systemd's
RestrictAddressFamilies= installs — so that a test sees iapd where the kernel's sock_diag cannot
be asked. Usage: python no_netlink.py COMMAND [ARG…] (Linux, x86_64 or aarch64)."""

import ctypes
import os
import platform
import struct
import sys

NR_SOCKET = {"x86_64": 41, "aarch64": 198}[platform.machine()]
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}[platform.machine()]
AF_NETLINK, EAFNOSUPPORT = 16, 97
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
ALLOW, ERRNO = 0x7FFF0000, 0x00050000


def op(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


program = b"".join([
    op(LD_ABS, 0, 0, 4), op(JEQ, 1, 0, AUDIT_ARCH), op(RET, 0, 0, ALLOW),  # another ABI: leave it be
    op(LD_ABS, 0, 0, 0), op(JEQ, 0, 3, NR_SOCKET),  # socket(…)?
    op(LD_ABS, 0, 0, 16), op(JEQ, 0, 1, AF_NETLINK),  # …of family AF_NETLINK (args[0], low word)?
    op(RET, 0, 0, ERRNO | EAFNOSUPPORT),
    op(RET, 0, 0, ALLOW),
])


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    sys.exit(f"no_netlink: prctl: {os.strerror(ctypes.get_errno())}")
fprog = SockFprog(len(program) // 8, program)
if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    sys.exit(f"no_netlink: seccomp: {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
