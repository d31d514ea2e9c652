"""`make demo`: the whole flow against the emulator, narrated. Needs no Google account."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="iapd-demo-") as tmp:
        config = Path(tmp) / "config.toml"
        emulator = subprocess.Popen([sys.executable, "-m", "iapd", "emulator", "--write-config", str(config)],
                                    stdout=subprocess.PIPE, text=True)
        try:
            info = json.loads(emulator.stdout.readline())
            print("1. The emulator is up (Google OAuth, Secret Manager, metadata, IAM Credentials, IAP):")
            for key in ("token_url", "iap_url", "secret_manager_url"):
                print(f"     {key:20} {info[key]}")
            print(f"   and wrote a ready-to-use config: {config}")
            print("     " + "\n     ".join(config.read_text().splitlines()[3:]))
        finally:
            emulator.terminate()
            emulator.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
