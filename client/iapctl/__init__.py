"""iapctl: the tiny, standard-library-only client of the iapd credential agent.

The Python API (iapctl.api) is here too: `iapctl.token(profile)`, `iapctl.token_info`,
`iapctl.BearerAuth` (requests, httpx), `iapctl.credentials` (google-auth) and the exceptions.
It is loaded on first use, so that `iapctl token` — which imports this package — pays nothing.
"""

__version__ = "0.1.0"

_API = {"token", "token_info", "Token", "BearerAuth", "credentials", "IapdError", "Unreachable", "LoginRequired",
        "UnknownProfile", "UpstreamError"}
__all__ = sorted(_API | {"__version__"})


def __getattr__(name: str):
    if name in _API:
        from iapctl import api

        return getattr(api, name)
    raise AttributeError(f"module 'iapctl' has no attribute {name!r}")
