"""CRC32C (Castagnoli), which Secret Manager returns beside every payload.

Pure Python on purpose: payloads are a few bytes (a client secret), and this keeps the optional
C extension (google-crc32c) out of the dependency list.
"""

from __future__ import annotations


def _table() -> list[int]:
    poly = 0x82F63B78  # reversed Castagnoli polynomial
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
