"""`authType: iapd` as flytekit users get it: a real flytekit client (gRPC) against a flyteadmin
stand-in that advertises its own header key, as flyteadmin's `authorization_metadata_key` does."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import pytest

from iapd.jwt import unverified_claims

grpc = pytest.importorskip("grpc")
pytest.importorskip("flytekit")

HEADER = "flyte-authorization"


@pytest.fixture
def flyteadmin():
    """AuthMetadataService (what flytekit asks for the header key) and AdminService.ListProjects,
    which answers only a call that carries a bearer token under HEADER — and records it."""
    from flyteidl.admin import project_pb2
    from flyteidl.service import admin_pb2_grpc, auth_pb2, auth_pb2_grpc

    seen: list[dict] = []

    class Auth(auth_pb2_grpc.AuthMetadataServiceServicer):
        def GetPublicClientConfig(self, request, context):  # noqa: N802 - gRPC's naming
            return auth_pb2.PublicClientAuthConfigResponse(client_id="flytectl", authorization_metadata_key=HEADER)

        def GetOAuth2Metadata(self, request, context):  # noqa: N802
            return auth_pb2.OAuth2MetadataResponse(token_endpoint="http://127.0.0.1:1/token")

    class Admin(admin_pb2_grpc.AdminServiceServicer):
        def ListProjects(self, request, context):  # noqa: N802
            metadata = dict(context.invocation_metadata())
            seen.append(metadata)
            if not metadata.get(HEADER, "").startswith("Bearer "):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no bearer token in {HEADER}")
            return project_pb2.Projects(projects=[project_pb2.Project(id="flytesnacks", name="flytesnacks")])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    auth_pb2_grpc.add_AuthMetadataServiceServicer_to_server(Auth(), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Admin(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(0)


def test_authtype_iapd_sends_the_token_under_the_advertised_header_from_the_first_call(daemon, flyteadmin,
                                                                                      monkeypatch):
    from flytekit.clients.raw import RawSynchronousFlyteClient
    from flytekit.configuration import PlatformConfig

    endpoint, seen = flyteadmin
    for key in ("IAPD_SOCKET", "IAPD_CONFIG"):
        monkeypatch.setenv(key, daemon.env[key])
    monkeypatch.setenv("IAPD_AUTOSTART", "0")
    cfg = PlatformConfig(endpoint=endpoint, insecure=True, auth_mode="iapd", command=["iapctl", "token", "demo-sa"])
    projects = RawSynchronousFlyteClient(cfg).list_projects()
    assert [p.id for p in projects.projects] == ["flytesnacks"]
    # The first call already carried it (no UNAUTHENTICATED round first), under flyteadmin's key.
    assert len(seen) == 1 and HEADER in seen[0] and "authorization" not in seen[0], seen
    assert unverified_claims(seen[0][HEADER][7:])["email"] == "demo-ci@iapd-demo.iam.gserviceaccount.com"


def test_a_profile_name_with_a_line_break_is_refused_by_the_plugin(monkeypatch):
    from flytekit.clients.auth.exceptions import AuthenticationError
    from flytekit.clients.auth_helper import get_authenticator
    from flytekit.configuration import PlatformConfig

    monkeypatch.setenv("IAPD_FLYTE_PROFILE", "flyte\r\nPOST /v1/reload")
    auth = get_authenticator(PlatformConfig(endpoint="dns:///x", auth_mode="iapd"), None)
    with pytest.raises(AuthenticationError, match="invalid profile name"):
        auth.refresh_credentials()


def test_the_plugin_needs_nothing_of_the_agents_distribution(daemon, flyteadmin):
    """A project venv has flytekit and the `iapctl` distribution only: the plugin must work with
    the agent's package (and its only dependency flytekit does not bring) not importable."""
    import subprocess
    import sys

    endpoint, seen = flyteadmin
    script = f"""
import sys
for name in ("iapd", "google.cloud.secretmanager"):
    sys.modules[name] = None  # importing any of them now fails
from flytekit.clients.raw import RawSynchronousFlyteClient
from flytekit.configuration import PlatformConfig
cfg = PlatformConfig(endpoint={endpoint!r}, insecure=True, auth_mode="iapd", command=["iapctl", "token", "demo-sa"])
print([p.id for p in RawSynchronousFlyteClient(cfg).list_projects().projects])
"""
    env = {**daemon.env, "IAPD_AUTOSTART": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "['flytesnacks']", out.stderr[-2000:]
    assert seen and HEADER in seen[-1]


def test_doctor_names_a_flytekit_too_old_for_authtype_iapd(tmp_path):
    """flytekit before 1.16.24 has no `flytekit.auth` entry points: `authType: iapd` would fall
    back to a browser login of its own. The version doctor finds is the one on sys.path first."""
    old = tmp_path / "site" / "flytekit-1.10.0.dist-info"
    old.mkdir(parents=True)
    (old / "METADATA").write_text("Metadata-Version: 2.1\nName: flytekit\nVersion: 1.10.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "IAPD_AUTOSTART": "0",
           "IAPD_SOCKET": str(tmp_path / "run" / "iapd.sock"), "IAPD_CONFIG": str(tmp_path / "none.toml"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-m", "iapctl", "doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert "PROBLEM  flytekit: 1.10.0 is older than 1.16.24" in out.stdout, out.stdout
