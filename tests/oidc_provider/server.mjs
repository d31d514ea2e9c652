// An OpenID Provider someone else wrote (node-oidc-provider, certified), configured as a
// Dex/Keycloak would be for a CLI: a public native client (PKCE, loopback redirects on any
// port, refresh-token rotation, the device grant) and a confidential client for CI
// (client credentials). Started by tests/test_independent_op.py on a free loopback port; prints
// one JSON line when ready.
import http from 'node:http';
import Provider from 'oidc-provider';

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'public-cli',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/oauth2/callback'],
    },
    {
      client_id: 'ci-bot',
      client_secret: 'ci-bot-secret-for-tests-only',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      scope: 'api',
    },
  ],
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    revocation: { enabled: true },
  },
  pkce: { required: () => true },
  scopes: ['openid', 'email', 'offline_access', 'api'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, email: `${id}@example.com`, email_verified: true }),
  }),
  issueRefreshToken: async (ctx, client, code) =>
    client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access'),
  rotateRefreshToken: true,
  // Put the scopes' claims (email) in the ID token too, as Dex and Keycloak do; by default this
  // provider keeps them for the userinfo endpoint (iapd then names the account by its `sub`).
  conformIdTokenClaims: false,
  ttl: { AccessToken: 3600, IdToken: 3600, ClientCredentials: 3600, DeviceCode: 600 },
});
provider.proxy = false;

// Test hooks, outside the provider: hold back the answer to the next token request (so a test
// can act while a refresh is at the issuer), and count token requests in flight.
const hooks = { delayNextMs: 0, inFlight: 0, maxInFlight: 0 };
const callback = provider.callback();
server.on('request', (req, res) => {
  if (req.url.startsWith('/_test/')) {
    const url = new URL(req.url, issuer);
    if (url.pathname === '/_test/delay') hooks.delayNextMs = Number(url.searchParams.get('ms') || 0);
    if (url.pathname === '/_test/reset') Object.assign(hooks, { delayNextMs: 0, maxInFlight: 0 });
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(hooks));
    return;
  }
  if (req.method === 'POST' && req.url === '/token') {
    hooks.inFlight += 1;
    hooks.maxInFlight = Math.max(hooks.maxInFlight, hooks.inFlight);
    res.on('close', () => { hooks.inFlight -= 1; });
    const delay = hooks.delayNextMs;
    hooks.delayNextMs = 0;
    if (delay > 0) {
      // The provider does its work (a rotation happens at once); only the answer is held back,
      // as when a network is slow: the client may be gone by the time it is sent.
      const end = res.end.bind(res);
      res.end = (...args) => { setTimeout(() => end(...args), delay); return res; };
    }
  }
  callback(req, res);
});
process.stdout.write(JSON.stringify({ issuer }) + '\n');
