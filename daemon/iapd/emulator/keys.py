"""RSA keys for the emulator: Google's token signing key, and service-account keys it issues.

Google publishes its ID-token signing keys twice: as a map of key id → X.509 certificate PEM
(`/oauth2/v1/certs`, what google-auth's `verify_token` reads) and as a JWKS (`/oauth2/v3/certs`).
We do the same, so tokens verify with Google's own libraries.
"""

from __future__ import annotations

import base64
import datetime
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt
from google.auth import jwt as google_jwt


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_pem: str
    public_pem: str
    cert_pem: str
    jwk: dict

    @classmethod
    def generate(cls, common_name: str = "iapd-emulator") -> "SigningKey":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        public = key.public_key()
        public_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256())
        )
        kid = secrets.token_hex(20)
        numbers = public.public_numbers()
        jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
               "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
        return cls(kid, private_pem, public_pem, cert.public_bytes(serialization.Encoding.PEM).decode(), jwk)

    def sign(self, claims: dict) -> str:
        signer = crypt.RSASigner.from_string(self.private_pem, key_id=self.kid)
        return google_jwt.encode(signer, claims).decode()
