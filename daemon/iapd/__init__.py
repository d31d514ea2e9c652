"""iapd: a per-user credential agent for Google Cloud Identity-Aware Proxy."""

__version__ = "0.1.0"
