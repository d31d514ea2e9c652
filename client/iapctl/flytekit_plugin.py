"""flytekit's authenticator for iapd, in process: `authType: iapd` asks the daemon over its socket
from inside flytekit — no subprocess at all (ExternalCommand forks `iapctl` for every token).

Registered under the `flytekit.auth` entry-point group (flytekit's `get_authenticator` loads
plugins from there). flytekit is not a dependency of ours: it is imported only when flytekit
itself loads this plugin. The profile is the one the config would give ExternalCommand:

    admin:
      endpoint: dns:///flyte.example.com
      authType: iapd
      command: ["iapctl", "token", "flyte"]   # the profile: flyte (else $IAPD_FLYTE_PROFILE, else "flyte")
"""

from __future__ import annotations

import os


def profile_of(command) -> str:
    command = list(command or [])
    if len(command) >= 3 and command[-2] == "token":
        return command[-1]
    return os.environ.get("IAPD_FLYTE_PROFILE") or "flyte"


MIN_FLYTEKIT = (1, 16, 24)  # the first flytekit with the `flytekit.auth` entry-point group


def authenticator(cfg, cfg_store):
    """The factory flytekit calls: (PlatformConfig, ClientConfigStore) -> Authenticator.

    What flytekit's own authenticators do not: the header is the one flyteadmin advertises
    (`authorization_metadata_key`, e.g. `flyte-authorization`, as ExternalCommand honours it);
    a token is there before the first call, and renewed before it expires (iapd says when),
    rather than after a call fails UNAUTHENTICATED."""
    import time

    from flytekit.clients.auth.authenticator import Authenticator
    from flytekit.clients.auth.exceptions import AuthenticationError
    from flytekit.clients.auth.keyring import Credentials

    from iapctl.api import IapdError, token_info

    class IapdAuthenticator(Authenticator):
        def __init__(self, endpoint: str, profile: str, header_key: str | None) -> None:
            super().__init__(endpoint, header_key or "authorization")
            self.profile = profile
            self._renew_at = 0.0

        def refresh_credentials(self) -> None:
            try:
                # (token_info refuses a profile name that is no name: it goes into a URL.)
                got = token_info(self.profile)
            except IapdError as exc:
                raise AuthenticationError(f"iapd: {exc.message}") from None
            # iapd's expiry already has its margin taken off: renew when it is reached.
            self._renew_at = got.expires_at
            self._set_credentials(Credentials(access_token=got.value, for_endpoint=self._endpoint,
                                              expires_in=max(int(got.expires_in), 0)))

        def fetch_grpc_call_auth_metadata(self):
            if self.get_credentials() is None or time.time() >= self._renew_at:
                self.refresh_credentials()
            return super().fetch_grpc_call_auth_metadata()

    header_key = None
    if cfg_store is not None:
        try:
            header_key = cfg_store.get_client_config().header_key
        except Exception:  # noqa: BLE001 - flyteadmin without the metadata service: the default header
            header_key = None
    return IapdAuthenticator(cfg.endpoint, profile_of(cfg.command), header_key)
