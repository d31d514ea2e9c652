"""A service-account key file, and the JWTs it signs (RS256, `kid` = the key's id).

Both uses of a key — the JWT-bearer assertion for Google's token endpoint and IAP's signed JWT —
need the same two things: the private key and a JWT signed with it. cryptography does the
RSA; the JWT is three base64url segments, as google-auth's `jwt.encode` makes it. Loading only
the RSA and serialization parts of cryptography (not google.auth.crypt, which brings X.509,
ECDSA and their modules along) keeps 1.6 MiB out of a CI daemon (bench/daemon_resources.py).
Everything here is synchronous and CPU-bound: callers run it off the event loop.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from iapd.errors import ConfigProblem
from iapd.google_creds import read_credentials_file


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


@dataclass(frozen=True)
class ServiceAccountKey:
    email: str
    key_id: str | None
    token_uri: str | None
    private_key: Any  # cryptography's RSAPrivateKey

    @classmethod
    def load(cls, path: str) -> "ServiceAccountKey":
        """The key file at `path`, or ConfigProblem saying what is wrong with it (never its text)."""
        # cryptography costs ~50 ms and several MiB: loaded only by key-file users.
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        info = read_credentials_file(path)
        try:
            if info.get("type") != "service_account":
                raise ValueError(f"type is {info.get('type')!r}, expected 'service_account'")
            email, pem = info["client_email"], info["private_key"]
            if not isinstance(email, str) or not isinstance(pem, str):
                raise ValueError("client_email and private_key must be strings")
            private_key = load_pem_private_key(pem.encode(), password=None)
            if not isinstance(private_key, rsa.RSAPrivateKey):
                raise ValueError("private_key is not an RSA key")
        except (ValueError, KeyError, TypeError) as exc:
            # cryptography's messages name the problem, not the key material.
            raise ConfigProblem(f"service account key file {path} is not a valid key: {str(exc)[:120]}") from None
        key_id = info.get("private_key_id")
        token_uri = info.get("token_uri")
        return cls(email, key_id if isinstance(key_id, str) else None,
                   token_uri if isinstance(token_uri, str) else None, private_key)

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        """An RS256 JWT of `claims`; `kid` is the file's private_key_id, which Google (and IAP) look
        the public key up by. ~1 ms of CPU."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header: dict[str, str] = {"typ": "JWT", "alg": "RS256"}
        if self.key_id:
            header["kid"] = self.key_id
        signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(claims).encode())
        signature = self.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return (signing_input + b"." + _b64(signature)).decode()
