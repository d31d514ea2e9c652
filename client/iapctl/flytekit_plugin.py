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


def authenticator(cfg, cfg_store):
    """The factory flytekit calls: (PlatformConfig, ClientConfigStore) -> Authenticator."""
    from flytekit.clients.auth.authenticator import Authenticator
    from flytekit.clients.auth.exceptions import AuthenticationError
    from flytekit.clients.auth.keyring import Credentials

    from iapctl.cli import Failure, _failure_of, call, error_of, valid_profile

    class IapdAuthenticator(Authenticator):
        def __init__(self, endpoint: str, profile: str) -> None:
            super().__init__(endpoint, "authorization")
            self.profile = profile

        def refresh_credentials(self) -> None:
            if not valid_profile(self.profile):  # from a config or $IAPD_FLYTE_PROFILE: it goes into a URL
                raise AuthenticationError(f"iapd: invalid profile name {self.profile!r}")
            try:
                resp = call("GET", f"/v1/token/{self.profile}")
                if resp.status != 200:
                    error = error_of(resp)
                    if error.get("error") == "login_required":
                        from iapctl.autologin import login_when_needed

                        login_when_needed(self.profile, error)
                        resp = call("GET", f"/v1/token/{self.profile}")
                    if resp.status != 200:
                        raise _failure_of(self.profile, error_of(resp))
            except Failure as exc:
                raise AuthenticationError(f"iapd: {exc.message}") from None
            self._set_credentials(Credentials(access_token=resp.body.decode(), for_endpoint=self._endpoint))

    return IapdAuthenticator(cfg.endpoint, profile_of(cfg.command))
