"""Where credentials may go: one rule for the client (a token sent by `setup` and `doctor URL`)
and the daemon (issuers' endpoints, a proxy's upstream, a signed JWT's audience)."""

from urllib.parse import urlsplit

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def secure_url(url: str) -> bool:
    """https, or http to this machine (a local issuer or IAP, the emulator)."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS)
