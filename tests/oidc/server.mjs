// A real OpenID Connect authorization server for tests/oidc.rs:
// node's `oidc-provider` (pinned in package-lock.json) with one
// confidential client, PKCE required, its built-in development login and
// consent pages, and the RFC 9207 `iss` authorization response parameter.
//
// Usage (every option may also come from the environment variable named):
//   node tests/oidc/server.mjs --client-id ID --client-secret SECRET \
//     --redirect-uri URI [--port 0] [--access-token-ttl 300] [--require-par]
//   OIDC_PORT, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET, OIDC_REDIRECT_URI,
//   OIDC_ACCESS_TOKEN_TTL
//
// It listens on 127.0.0.1 only (port 0: one the kernel picks) and prints
// `listening http://127.0.0.1:PORT` on stdout once it answers; the issuer
// is that URL. Every successful token request prints `token GRANT_TYPE`, so
// a test can wait for a refresh instead of sleeping. It exits when its
// stdin closes (the test that started it ended, however it ended).

import { randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

import { jwtResource } from './common.mjs';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'redirect-uri': { type: 'string' },
    'access-token-ttl': { type: 'string' },
    // The client must use pushed authorization requests (RFC 9126): an
    // authorize request with its parameters in the query is refused.
    'require-par': { type: 'boolean' },
  },
});

function setting(flag, env, fallback) {
  const value = args[flag] ?? process.env[env] ?? fallback;
  if (value === undefined || value === '') {
    console.error(`server.mjs: --${flag} (or ${env}) is required`);
    process.exit(2);
  }
  return value;
}

const port = Number(setting('port', 'OIDC_PORT', '0'));
const clientId = setting('client-id', 'OIDC_CLIENT_ID');
const clientSecret = setting('client-secret', 'OIDC_CLIENT_SECRET');
const redirectUri = setting('redirect-uri', 'OIDC_REDIRECT_URI');
const accessTokenTtl = Number(setting('access-token-ttl', 'OIDC_ACCESS_TOKEN_TTL', '300'));

function configuration() {
  return {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      response_types: ['code'],
      grant_types: ['authorization_code', 'refresh_token'],
      token_endpoint_auth_method: 'client_secret_basic',
      require_pushed_authorization_requests: args['require-par'] === true,
    }],
    // Any login is accepted; the account id is what was typed.
    async findAccount(_ctx, id) {
      return { accountId: id, async claims() { return { sub: id }; } };
    },
    // S256 only, required for every client (oidc-provider's default
    // requires it of public clients only).
    pkce: { methods: ['S256'], required: () => true },
    // A refresh token comes with `offline_access`, which oidc-provider
    // grants only with `prompt=consent` (OpenID Connect Core 11): the
    // default `issueRefreshToken`, exercised as a real client meets it.
    scopes: ['openid', 'offline_access'],
    features: {
      devInteractions: { enabled: true },
      // RFC 9126 at /request (on by default; explicit here).
      pushedAuthorizationRequests: { enabled: true },
      resourceIndicators: jwtResource('', accessTokenTtl),
    },
    // Every lifetime set (oidc-provider notices each default it uses).
    ttl: {
      AccessToken: accessTokenTtl,
      IdToken: 3600,
      Interaction: 600,
      Session: 3600,
      Grant: 86400,
      RefreshToken: 86400,
    },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
  };
}

const server = createServer();
server.listen(port, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration());
  provider.on('grant.success', (ctx) => {
    console.log(`token ${ctx.oidc.params.grant_type}`);
  });
  provider.on('grant.error', (ctx, err) => {
    console.log(`token error ${ctx.oidc?.params?.grant_type} ${err.error}: ${err.error_description}`);
  });
  provider.on('authorization.error', (_ctx, err) => {
    console.log(`authorization error ${err.error}: ${err.error_description}`);
  });
  provider.on('server_error', (_ctx, err) => {
    console.error('server_error', err);
  });
  server.on('request', provider.callback());
  console.log(`listening ${issuer}`);
});

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
