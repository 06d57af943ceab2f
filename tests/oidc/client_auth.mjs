// A real authorization server for tests/client_auth.rs and, with
// `--dpop`, tests/dpop_server.rs and the proxy's DPoP tests: node's
// `oidc-provider` (pinned in package-lock.json) whose clients are the
// ones the test passes in, each with the token endpoint authentication
// method under test (`private_key_jwt` with the public JWKS of the test's
// key, `client_secret_jwt`, ...). Separate from server.mjs (the connect
// flow's launcher) so that each test file owns its server's settings.
//
// Usage:
//   node tests/oidc/client_auth.mjs --clients FILE [--port 0] [--access-token-ttl 300] [--dpop]
// FILE is a JSON array of oidc-provider client metadata, used as given
// (client_id, token_endpoint_auth_method, token_endpoint_auth_signing_alg,
// jwks, client_secret, grant_types, redirect_uris, response_types).
//
// Enabled: the client_credentials grant, RFC 7009 revocation, and JWT
// access tokens for the resource `urn:flinks-proxy:test-api` (the default
// resource, so a client_credentials token is a JWT the test's resource
// server verifies against /jwks). It listens on 127.0.0.1 only and prints
// `listening http://127.0.0.1:PORT` once it answers (the issuer). Every
// token request prints `token GRANT_TYPE CLIENT_ID` or `token error
// GRANT_TYPE ERROR: DESCRIPTION` (the success line ends with
// ` assertion=JWT`, the client assertion received, so the test can search
// the proxy's outputs for it); a failed revocation `revocation error ...`;
// every revocation `revoked`; each client assertion that reached the
// replay check `assertion JTI fresh|replayed`. It exits when its stdin
// closes.
//
// `--dpop` adds RFC 9449 (oidc-provider's `features.dPoP`): every DPoP
// proof must carry a server nonce (the first proof of a client gets
// `400 use_dpop_nonce` and a `DPoP-Nonce` header), clients with
// `dpop_bound_access_tokens: true` in FILE must send a proof, access
// tokens are bound to the proof's key (`cnf.jkt` in the JWT, `token_type`
// `DPoP`), and refresh tokens rotate on every use. Its lines: the success
// line becomes `token GRANT_TYPE CLIENT_ID token_type=DPoP|Bearer
// assertion=JWT`; each request with a `DPoP` header prints, once answered,
// `dpop METHOD PATH jti=JTI nonce=NONCE|- STATUS ok|ERROR` (so a test
// counts nonce retries); the replay check of a proof's jti prints `dpop
// jti JTI fresh|replayed` (instead of an `assertion` line).

import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

import { jwtResource } from './common.mjs';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    clients: { type: 'string' },
    'access-token-ttl': { type: 'string', default: '300' },
    dpop: { type: 'boolean', default: false },
  },
});
if (!args.clients) {
  console.error('client_auth.mjs: --clients FILE is required');
  process.exit(2);
}
const clients = JSON.parse(readFileSync(args.clients, 'utf8'));
const accessTokenTtl = Number(args['access-token-ttl']);

// The claims of a compact JWS, unverified (only to log them); `{}` when it
// is not one.
function unverifiedClaims(jws) {
  try {
    return JSON.parse(Buffer.from(jws.split('.')[1], 'base64url').toString('utf8')) ?? {};
  } catch {
    return {};
  }
}

// The jtis of DPoP proofs received, so that the replay check's line says
// which kind of JWT it saw.
const dpopJtis = new Set();

function configuration() {
  return {
    clients,
    ...(args.dpop ? { rotateRefreshToken: true } : {}),
    async findAccount(_ctx, id) {
      return { accountId: id, async claims() { return { sub: id }; } };
    },
    pkce: { methods: ['S256'], required: () => true },
    scopes: ['openid', 'offline_access', 'api:read'],
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: jwtResource('api:read', accessTokenTtl),
      ...(args.dpop ? {
        dPoP: {
          enabled: true,
          nonceSecret: randomBytes(32),
          requireNonce: () => true,
        },
      } : {}),
    },
    ttl: {
      AccessToken: accessTokenTtl,
      ClientCredentials: accessTokenTtl,
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
server.listen(Number(args.port), '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration());
  provider.on('grant.success', (ctx) => {
    const tokenType = args.dpop ? ` token_type=${ctx.body?.token_type}` : '';
    console.log(`token ${ctx.oidc.params.grant_type} ${ctx.oidc.client?.clientId}${tokenType} assertion=${ctx.oidc.params.client_assertion ?? '-'}`);
  });
  if (args.dpop) {
    provider.use(async (ctx, next) => {
      const proof = ctx.get('DPoP');
      if (!proof) {
        return next();
      }
      const { jti, nonce } = unverifiedClaims(proof);
      if (typeof jti === 'string') {
        dpopJtis.add(jti);
      }
      await next();
      const error = (ctx.body && typeof ctx.body === 'object' && ctx.body.error) || 'ok';
      console.log(`dpop ${ctx.method} ${ctx.path} jti=${jti ?? '-'} nonce=${nonce ?? '-'} ${ctx.status} ${error}`);
      return undefined;
    });
  }
  provider.on('grant.error', (ctx, err) => {
    console.log(`token error ${ctx.oidc?.params?.grant_type} ${err.error}: ${err.error_description}`);
  });
  provider.on('revocation.error', (_ctx, err) => {
    console.log(`revocation error ${err.error}: ${err.error_description}`);
  });
  provider.on('grant.revoked', () => {
    console.log('revoked');
  });
  provider.on('authorization.error', (_ctx, err) => {
    console.log(`authorization error ${err.error}: ${err.error_description}`);
  });
  provider.on('server_error', (_ctx, err) => {
    console.error('server_error', err);
  });
  // A client assertion (or DPoP proof) the server accepted: its jti, so
  // the test sees one new assertion (proof) per request.
  const ReplayDetection = provider.ReplayDetection;
  if (ReplayDetection) {
    const unique = ReplayDetection.unique.bind(ReplayDetection);
    ReplayDetection.unique = async (iss, jti, exp) => {
      const fresh = await unique(iss, jti, exp);
      const kind = dpopJtis.has(jti) ? 'dpop jti' : 'assertion';
      console.log(`${kind} ${jti} ${fresh ? 'fresh' : 'replayed'}`);
      return fresh;
    };
  }
  server.on('request', provider.callback());
  console.log(`listening ${issuer}`);
});

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.stdin.on('error', () => process.exit(0));
