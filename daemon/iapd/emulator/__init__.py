"""A local emulator of the Google endpoints iapd uses, and of IAP itself (think moto for IAP)."""

from iapd.emulator.app import Emulator
from iapd.emulator.state import EmulatorState

__all__ = ["Emulator", "EmulatorState"]
