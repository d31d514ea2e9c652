"""A local emulator of the Google endpoints iapd uses, and of IAP itself (think moto for IAP).

`from iapd.emulator.app import Emulator` to run it in-process; `iapd emulator` from a shell.
"""
