"""Two clocks, because either alone lies.

The wall clock jumps (NTP, a user, a VM restore) and is what a token's `exp` is written in; the
monotonic clock never jumps but, on Linux, CLOCK_MONOTONIC stops while the laptop sleeps. We
measure a token's life on receipt and track its end on both: the wall clock and CLOCK_BOOTTIME
(monotonic *including* suspend) where the OS has it. Whatever is left is the smaller of the two.
"""

from __future__ import annotations

import time

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


class Clock:
    def __init__(self) -> None:
        # Tests of suspend/resume and clock jumps shift the wall clock of a running daemon.
        self.wall_offset = 0.0
        self.mono_offset = 0.0

    def wall(self) -> float:
        return time.time() + self.wall_offset

    def mono(self) -> float:
        if _BOOTTIME is not None:
            return time.clock_gettime(_BOOTTIME) + self.mono_offset
        return time.monotonic() + self.mono_offset
