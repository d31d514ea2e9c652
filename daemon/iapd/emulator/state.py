"""Everything the emulated Google remembers: clients, grants, service accounts, secrets,
and the knobs tests turn (token lifetime, clock offset, injected faults, call counters).

In memory only: a restarted emulator has forgotten every grant, like a Google project that was
deleted and created again. `--write-config` writes the credentials that go with *this* run.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from iapd.emulator.issuer import IssuerState
from iapd.emulator.keys import SigningKey

ISSUER = "https://accounts.google.com"
PROJECT = "iapd-demo"
PROJECT_NUMBER = "123456789012"
DESKTOP_CLIENT_ID = f"{PROJECT_NUMBER}-desktop.apps.googleusercontent.com"
IAP_CLIENT_ID = f"{PROJECT_NUMBER}-iap.apps.googleusercontent.com"
# The client gcloud uses for application-default credentials (an `authorized_user` file).
ADC_CLIENT_ID = f"{PROJECT_NUMBER}-adc.apps.googleusercontent.com"
# An IAP client of another project: Google mints no ID token for it to our desktop client.
OTHER_PROJECT_IAP_CLIENT_ID = "210987654321-iap.apps.googleusercontent.com"
DESKTOP_SECRET_NAME = f"projects/{PROJECT}/secrets/iap-desktop-client-secret/versions/latest"
DEMO_SA_EMAIL = f"demo-ci@{PROJECT}.iam.gserviceaccount.com"
DEPLOYER_SA_EMAIL = f"deployer@{PROJECT}.iam.gserviceaccount.com"
METADATA_SA_EMAIL = f"{PROJECT_NUMBER}-compute@developer.gserviceaccount.com"

# Workload identity federation: a pool whose provider trusts an OIDC issuer (GitHub Actions, say).
WIF_AUDIENCE = f"//iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/ci/providers/github"
WIF_SUBJECT = "repo:example/flyte-workflows:ref:refs/heads/main"
WIF_PRINCIPAL = f"principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/ci/subject/{WIF_SUBJECT}"
WIF_ISSUER = "https://token.actions.githubusercontent.com"

# Service-account roles, as the permissions the emulated IAM Credentials API checks.
ROLES = {
    "serviceAccountTokenCreator": {"getAccessToken", "getOpenIdToken", "implicitDelegation", "signJwt"},
    "serviceAccountOpenIdTokenCreator": {"getOpenIdToken"},
    "workloadIdentityUser": {"getAccessToken", "getOpenIdToken"},
}

METADATA_CACHE_UNTIL_LEFT = 300

FAULT_KINDS = {"500", "503", "429", "invalid_grant", "invalid_rapt", "delay", "drop"}


@dataclass
class OAuthClient:
    client_id: str
    secret: str
    desktop: bool  # desktop ("installed") clients may use loopback redirects
    project: str = PROJECT  # Google mints ID tokens only for an audience of the same project
    redirect_uris: set[str] = field(default_factory=set)  # a web client's registered redirect URIs


@dataclass
class CodeGrant:
    client_id: str
    redirect_uri: str
    challenge: str | None
    method: str
    email: str
    scope: str
    expires: float
    offline: bool = False  # access_type=offline: the code exchange returns a refresh token


@dataclass
class RefreshGrant:
    client_id: str
    email: str
    scope: str


@dataclass
class ServiceAccount:
    email: str
    unique_id: str
    key: SigningKey


@dataclass
class Fault:
    kind: str
    delay: float = 0.0


@dataclass
class EmulatorState:
    user_email: str = "demo@example.com"
    token_lifetime: int = 3600
    clock_offset: float = 0.0
    approve: str = "auto"  # auto | consent | deny
    rotate_refresh_tokens: bool = False
    signing_key: SigningKey = field(default_factory=SigningKey.generate)
    clients: dict[str, OAuthClient] = field(default_factory=dict)
    allowlisted_clients: set[str] = field(default_factory=set)
    codes: dict[str, CodeGrant] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshGrant] = field(default_factory=dict)
    access_tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> (email, exp)
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    # IAM on service accounts: target -> member -> permissions (short names, see ROLES)
    iam: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    # The metadata server caches ID tokens per audience (True: as Google's does)
    metadata_cache: bool = True
    # How close to its end a cached ID token is still handed back: Google's is 5 minutes; a test
    # sets it lower to play an upstream whose cache hands back tokens with seconds left.
    metadata_cache_until_left: float = METADATA_CACHE_UNTIL_LEFT
    metadata_tokens: dict[tuple[str, str], str] = field(default_factory=dict)
    secrets: dict[str, bytes] = field(default_factory=dict)
    # The generic OpenID Connect issuer at /oidc (emulator.issuer)
    issuer: IssuerState = field(default_factory=IssuerState.demo)
    faults: dict[str, deque[Fault]] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    # IAP's browser sign-in: requests sent to sign in (by state), one-time tickets back to the
    # app, and session cookies (emulator.iap).
    iap_pending: dict[str, dict] = field(default_factory=dict)
    iap_tickets: dict[str, dict] = field(default_factory=dict)
    iap_sessions: dict[str, dict] = field(default_factory=dict)
    # An access level (context-aware access) on the apps: a person's token from a command line
    # carries no device, and is refused with a 403.
    iap_access_level: bool = False

    def now(self) -> float:
        """The emulated Google's clock (tests skew it with `clock_offset`)."""
        return time.time() + self.clock_offset

    @classmethod
    def demo(cls, user_email: str = "demo@example.com", token_lifetime: int = 3600) -> "EmulatorState":
        """A project with a desktop client, an IAP client, a secret and service accounts."""
        state = cls(user_email=user_email, token_lifetime=token_lifetime)
        desktop = OAuthClient(DESKTOP_CLIENT_ID, "GOCSPX-" + secrets.token_urlsafe(24), desktop=True)
        adc = OAuthClient(ADC_CLIENT_ID, "d-" + secrets.token_urlsafe(24), desktop=True)
        iap = OAuthClient(IAP_CLIENT_ID, "GOCSPX-" + secrets.token_urlsafe(24), desktop=False)
        other = OAuthClient(OTHER_PROJECT_IAP_CLIENT_ID, "GOCSPX-" + secrets.token_urlsafe(24), desktop=False,
                            project="other-project")
        for client in (desktop, adc, iap, other):
            state.clients[client.client_id] = client
        # IAP's programmatic-access allowlist: tokens whose aud is the desktop client pass too.
        state.allowlisted_clients.add(DESKTOP_CLIENT_ID)
        state.secrets[DESKTOP_SECRET_NAME.rsplit("/versions/", 1)[0]] = desktop.secret.encode()
        for email in (DEMO_SA_EMAIL, DEPLOYER_SA_EMAIL, METADATA_SA_EMAIL):
            state.add_service_account(email)
        for member in (user_email, DEMO_SA_EMAIL, METADATA_SA_EMAIL):
            state.grant(DEPLOYER_SA_EMAIL, member, "serviceAccountTokenCreator")
        # The CI pool may act as demo-ci (workloadIdentityUser); deployer may act as demo-ci too
        # (so a chain user → deployer → demo-ci exists). Nobody holds a role on *itself*: a
        # service account cannot mint its own ID tokens through IAM by default, as at Google.
        state.grant(DEMO_SA_EMAIL, WIF_PRINCIPAL, "workloadIdentityUser")
        state.grant(DEMO_SA_EMAIL, DEPLOYER_SA_EMAIL, "serviceAccountTokenCreator")
        return state

    def grant(self, target: str, member: str, role: str) -> None:
        self.iam.setdefault(target, {}).setdefault(member, set()).update(ROLES[role])

    def may(self, member: str, permission: str, target: str) -> bool:
        return permission in self.iam.get(target, {}).get(member, set())

    def rotate_client_secret(self, client_id: str = DESKTOP_CLIENT_ID) -> None:
        """A new secret for the client, as a new version of its secret in Secret Manager; the
        old secret stops working at once (an admin who rotates it because it leaked)."""
        client = self.clients[client_id]
        client.secret = "GOCSPX-" + secrets.token_urlsafe(24)
        self.secrets[DESKTOP_SECRET_NAME.rsplit("/versions/", 1)[0]] = client.secret.encode()

    def add_iap_clients(self, count: int) -> list[str]:
        """More web clients (audiences), as a project with many IAP-protected apps has."""
        ids = [f"{PROJECT_NUMBER}-iap-{i}.apps.googleusercontent.com" for i in range(count)]
        for client_id in ids:
            self.clients[client_id] = OAuthClient(client_id, "GOCSPX-" + secrets.token_urlsafe(24), desktop=False)
        return ids

    def add_service_account(self, email: str) -> ServiceAccount:
        unique_id = str(100000000000000000000 + len(self.service_accounts) + secrets.randbelow(10**9))
        sa = ServiceAccount(email, unique_id, SigningKey.generate(email))
        self.service_accounts[email] = sa
        return sa

    def issue_refresh_token(self, client_id: str, email: str, scope: str) -> str:
        token = "1//" + secrets.token_urlsafe(40)
        self.refresh_tokens[token] = RefreshGrant(client_id, email, scope)
        return token

    def issue_access_token(self, email: str) -> str:
        token = "ya29." + secrets.token_urlsafe(48)
        self.access_tokens[token] = (email, self.now() + self.token_lifetime)
        return token

    def identity_of_access_token(self, token: str) -> str | None:
        entry = self.access_tokens.get(token)
        if entry is None or entry[1] <= self.now():
            return None
        return entry[0]

    def revoke_user(self, email: str, client_id: str = DESKTOP_CLIENT_ID) -> int:
        """Revoke a user's grants to one client, as the user removing the app's access (or an
        admin's policy) would. The ADC grant (another client) survives, as it does at Google."""
        dead = [t for t, g in self.refresh_tokens.items() if g.email == email and g.client_id == client_id]
        for token in dead:
            del self.refresh_tokens[token]
        return len(dead)

    def id_token(self, *, aud: str, azp: str, email: str | None, sub: str, extra: dict | None = None) -> str:
        now = int(self.now())
        claims = {"iss": ISSUER, "azp": azp, "aud": aud, "sub": sub, "iat": now, "exp": now + self.token_lifetime}
        if email is not None:
            claims["email"] = email
            claims["email_verified"] = True
        claims.update(extra or {})
        return self.signing_key.sign(claims)

    def metadata_id_token(self, sa: ServiceAccount, audience: str, full: bool, extra: dict | None) -> str:
        """The metadata server's ID token: it hands back the one it has for this audience until
        shortly (5 minutes) before it expires, as Google documents for its access tokens."""
        key = (audience, "full" if full else "standard")
        cached = self.metadata_tokens.get(key)
        if self.metadata_cache and cached is not None:
            from google.auth import jwt as google_jwt

            if google_jwt.decode(cached, verify=False)["exp"] - self.now() > self.metadata_cache_until_left:
                return cached
        token = self.sa_id_token(sa, audience, extra=extra)
        self.metadata_tokens[key] = token
        return token

    def user_id_token(self, email: str, client_id: str, audience: str | None) -> str:
        # Google adds `hd` (hosted domain) for accounts of a Workspace organisation, not for gmail.com.
        domain = email.rpartition("@")[2]
        extra = {"hd": domain} if domain not in ("gmail.com", "googlemail.com") else None
        return self.id_token(aud=audience or client_id, azp=client_id, email=email, sub=subject_of(email), extra=extra)

    def sa_id_token(self, sa: ServiceAccount, audience: str, include_email: bool = True, extra: dict | None = None) -> str:
        return self.id_token(aud=audience, azp=sa.unique_id, email=sa.email if include_email else None,
                             sub=sa.unique_id, extra=extra)

    def push_fault(self, endpoint: str, kind: str, count: int = 1, delay: float = 0.0) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        queue = self.faults.setdefault(endpoint, deque())
        queue.extend(Fault(kind, delay) for _ in range(count))

    def pop_fault(self, endpoint: str) -> Fault | None:
        queue = self.faults.get(endpoint)
        return queue.popleft() if queue else None


def subject_of(email: str) -> str:
    """A stable numeric `sub` for a user, like Google's account id."""
    return str(int.from_bytes(email.encode(), "big") % 10**21)
