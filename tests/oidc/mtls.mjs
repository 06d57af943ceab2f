// A real authorization server speaking mutual TLS for tests/mtls.rs:
// node's `oidc-provider` (pinned in package-lock.json) on a node `https`
// server that asks every client for a certificate (RFC 8705): one client
// authenticating with `tls_client_auth` (its certificate's SAN dNSName),
// the client_credentials and refresh_token grants, and certificate-bound
// JWT access tokens (`cnf.x5t#S256`) for one resource.
//
// Usage:
//   node tests/oidc/mtls.mjs --cert server.pem --key server.key --ca ca.pem \
//     --client-id ID --san-dns NAME [--port 0]
//
// It listens on 127.0.0.1 only (port 0: one the kernel picks) and prints
// `listening https://127.0.0.1:PORT` on stdout once it answers; the issuer
// is that URL. Every token request prints `token GRANT_TYPE` (or `token
// error GRANT_TYPE ERROR: DESCRIPTION`). It exits when its stdin closes.

import { randomBytes, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

import { jwtResource } from './common.mjs';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string' },
    cert: { type: 'string' },
    key: { type: 'string' },
    ca: { type: 'string' },
    'client-id': { type: 'string' },
    'san-dns': { type: 'string' },
  },
});

function setting(flag, fallback) {
  const value = args[flag] ?? fallback;
  if (value === undefined || value === '') {
    console.error(`mtls.mjs: --${flag} is required`);
    process.exit(2);
  }
  return value;
}

const port = Number(setting('port', '0'));
const clientId = setting('client-id');
const sanDns = setting('san-dns');

// The certificate the client presented on this request's TLS connection,
// PEM (oidc-provider hashes it into `cnf.x5t#S256`).
function getCertificate(ctx) {
  const peer = ctx.socket.getPeerCertificate(true);
  if (!peer || !peer.raw) {
    return undefined;
  }
  const b64 = peer.raw.toString('base64').match(/.{1,64}/g).join('\n');
  return `-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`;
}

function configuration() {
  return {
    clients: [{
      client_id: clientId,
      redirect_uris: ['https://127.0.0.1/unused'],
      response_types: [],
      grant_types: ['client_credentials', 'refresh_token'],
      token_endpoint_auth_method: 'tls_client_auth',
      tls_client_auth_san_dns: sanDns,
      tls_client_certificate_bound_access_tokens: true,
    }],
    clientAuthMethods: ['tls_client_auth'],
    async findAccount(_ctx, id) {
      return { accountId: id, async claims() { return { sub: id }; } };
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      mTLS: {
        enabled: true,
        certificateBoundAccessTokens: true,
        tlsClientAuth: true,
        getCertificate,
        // Node verified the chain against --ca (requestCert; unauthorized
        // connections are let in so that the endpoint answers them with an
        // OAuth error instead of a failed handshake).
        certificateAuthorized: (ctx) => ctx.socket.authorized === true,
        certificateSubjectMatches(ctx, property, expected) {
          const pem = getCertificate(ctx);
          if (!pem || property !== 'tls_client_auth_san_dns') {
            return false;
          }
          const san = new X509Certificate(pem).subjectAltName ?? '';
          return san.split(', ').includes(`DNS:${expected}`);
        },
      },
      resourceIndicators: jwtResource('', 300),
    },
    ttl: {
      AccessToken: 300,
      ClientCredentials: 300,
      IdToken: 3600,
      Interaction: 600,
      Session: 3600,
      Grant: 86400,
      RefreshToken: 86400,
    },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
  };
}

const server = createServer({
  cert: readFileSync(setting('cert')),
  key: readFileSync(setting('key')),
  ca: readFileSync(setting('ca')),
  requestCert: true,
  rejectUnauthorized: false,
});
server.listen(port, '127.0.0.1', () => {
  const issuer = `https://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, configuration());
  provider.on('grant.success', (ctx) => {
    console.log(`token ${ctx.oidc.params.grant_type}`);
  });
  provider.on('grant.error', (ctx, err) => {
    console.log(`token error ${ctx.oidc?.params?.grant_type} ${err.error}: ${err.error_description}`);
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
