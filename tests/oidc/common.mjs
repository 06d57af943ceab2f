// What the oidc-provider launchers share (server.mjs, client_auth.mjs,
// mtls.mjs): the test API as a resource whose access tokens are JWTs (the
// proxy reads `sub` and `exp` from them, and the tests' resource servers
// verify them against /jwks; without a resource, oidc-provider issues
// opaque userinfo tokens).

export const RESOURCE = 'urn:flinks-proxy:test-api';

// `features.resourceIndicators` for RESOURCE: JWT access tokens living
// `ttl` seconds, granting `scope`.
export function jwtResource(scope, ttl) {
  return {
    enabled: true,
    defaultResource: () => RESOURCE,
    useGrantedResource: () => true,
    getResourceServerInfo: () => ({
      scope,
      audience: RESOURCE,
      accessTokenFormat: 'jwt',
      accessTokenTTL: ttl,
    }),
  };
}
