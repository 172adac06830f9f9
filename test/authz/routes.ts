import type { MatrixRoute } from '../support/authz-matrix.js';

/**
 * Every route of the service with the access it declares. test/authz/routes-declared.test.ts fails
 * when the app has a route missing here, or one whose declaration differs; each module's
 * *.security.test.ts runs the authorization matrix over its part.
 */
export const PUBLIC_ROUTES: MatrixRoute[] = [
  { method: 'OPTIONS', route: '*', permission: 'public' },
  { method: 'GET', route: '/health/live', permission: 'public' },
  { method: 'GET', route: '/health/ready', permission: 'public' },
  { method: 'GET', route: '/metrics', permission: 'public' },
  { method: 'GET', route: '/openapi.json', permission: 'public' },
  { method: 'GET', route: '/redoc', permission: 'public' },
  { method: 'GET', route: '/redoc/', permission: 'public' },
  { method: 'GET', route: '/.well-known/jwks.json', permission: 'public' },
  { method: 'GET', route: '/.well-known/openid-configuration', permission: 'public' },
  { method: 'GET', route: '/.well-known/oauth-authorization-server', permission: 'public' },
  { method: 'POST', route: '/v1/auth/register', permission: 'public' },
  { method: 'POST', route: '/v1/auth/login', permission: 'public' },
  { method: 'POST', route: '/v1/auth/refresh', permission: 'public' },
  { method: 'POST', route: '/v1/auth/exchange', permission: 'public' },
  { method: 'POST', route: '/v1/auth/password/forgot', permission: 'public' },
  { method: 'POST', route: '/v1/auth/password/reset', permission: 'public' },
  { method: 'POST', route: '/v1/auth/email/confirm', permission: 'public' },
  { method: 'POST', route: '/v1/auth/email/resend', permission: 'public' },
  { method: 'POST', route: '/v1/auth/magic-link', permission: 'public' },
  { method: 'POST', route: '/v1/auth/magic-link/verify', permission: 'public' },
  { method: 'POST', route: '/v1/auth/email/change/confirm', permission: 'public' },
  { method: 'POST', route: '/v1/auth/mfa/verify', permission: 'public' },
];

export const AUTH_ROUTES: MatrixRoute[] = [
  { method: 'POST', route: '/v1/auth/logout', permission: 'account:read', heldNow: false, ownSession: true },
  { method: 'GET', route: '/v1/auth/me', permission: 'account:read' },
  {
    method: 'DELETE',
    route: '/v1/auth/me',
    permission: 'account:write',
    body: () => ({ password: 'whatever-it-is' }),
  },
  { method: 'GET', route: '/v1/auth/email/change', permission: 'account:read' },
  { method: 'DELETE', route: '/v1/auth/email/change', permission: 'account:write' },
  {
    method: 'POST',
    route: '/v1/auth/email/change',
    permission: 'account:write',
    body: () => ({ new_email: 'somewhere-else@example.test', password: 'whatever-it-is' }),
  },
  {
    method: 'POST',
    route: '/v1/auth/password',
    permission: 'account:write',
    body: () => ({ current_password: 'whatever-it-is', new_password: 'another long passphrase' }),
  },
  { method: 'GET', route: '/v1/auth/activity', permission: 'account:read' },
  { method: 'GET', route: '/v1/auth/sessions', permission: 'account:read' },
  {
    method: 'DELETE',
    route: '/v1/auth/sessions/:id',
    permission: 'account:write',
    url: (c) => `/v1/auth/sessions/${c.fixtures.sessionId}`,
    foreignObject: true,
    heldNow: false,
  },
  { method: 'GET', route: '/v1/auth/mfa', permission: 'account:read' },
  {
    method: 'POST',
    route: '/v1/auth/mfa/totp',
    permission: 'account:write',
    body: () => ({ password: 'whatever-it-is' }),
  },
  {
    method: 'POST',
    route: '/v1/auth/mfa/totp/activate',
    permission: 'account:write',
    body: () => ({ code: '123456' }),
  },
  {
    method: 'POST',
    route: '/v1/auth/mfa/totp/deactivate',
    permission: 'account:write',
    body: () => ({ code: '123456' }),
  },
  {
    method: 'POST',
    route: '/v1/auth/mfa/recovery-codes',
    permission: 'account:write',
    body: () => ({ code: '123456' }),
  },
];

export const ADMIN_ROUTES: MatrixRoute[] = [
  { method: 'GET', route: '/v1/users', permission: 'users:read' },
  { method: 'GET', route: '/v1/users/:id', permission: 'users:read', url: (c) => `/v1/users/${c.owner.id}` },
  {
    method: 'PATCH',
    route: '/v1/users/:id',
    permission: 'users:write',
    url: (c) => `/v1/users/${c.owner.id}`,
    body: () => ({ status: 'disabled' }),
  },
  {
    method: 'DELETE',
    route: '/v1/users/:id',
    permission: 'users:write',
    url: (c) => `/v1/users/${c.owner.id}`,
  },
  {
    method: 'GET',
    route: '/v1/users/:id/sessions',
    permission: 'users:read',
    url: (c) => `/v1/users/${c.owner.id}/sessions`,
  },
  {
    method: 'DELETE',
    route: '/v1/users/:id/sessions',
    permission: 'users:write',
    url: (c) => `/v1/users/${c.owner.id}/sessions`,
  },
  { method: 'DELETE', route: '/v1/users/:id/sessions/:session_id', permission: 'users:write' },
  {
    method: 'DELETE',
    route: '/v1/users/:id/mfa',
    permission: 'users:write',
    url: (c) => `/v1/users/${c.owner.id}/mfa`,
  },
  {
    method: 'POST',
    route: '/v1/users/:id/password-reset',
    permission: 'users:write',
    url: (c) => `/v1/users/${c.owner.id}/password-reset`,
  },
  {
    method: 'POST',
    route: '/v1/users',
    permission: 'users:write',
    body: () => ({ email: `invited-${Math.random().toString(36).slice(2)}@example.test` }),
  },
  {
    method: 'POST',
    route: '/v1/users/:id/email-change',
    permission: 'users:write',
    url: (c) => `/v1/users/${c.owner.id}/email-change`,
    body: () => ({ new_email: 'somewhere-else@example.test' }),
  },
  {
    method: 'GET',
    route: '/v1/users/:id/roles',
    permission: 'users:read',
    url: (c) => `/v1/users/${c.owner.id}/roles`,
  },
  {
    method: 'PUT',
    route: '/v1/users/:id/roles/:role',
    permission: 'roles:assign',
    url: (c) => `/v1/users/${c.owner.id}/roles/admin`,
  },
  {
    method: 'DELETE',
    route: '/v1/users/:id/roles/:role',
    permission: 'roles:assign',
    url: (c) => `/v1/users/${c.owner.id}/roles/user`,
  },
  { method: 'GET', route: '/v1/roles', permission: 'roles:read' },
  { method: 'GET', route: '/v1/roles/:role', permission: 'roles:read', url: () => '/v1/roles/user' },
  {
    method: 'POST',
    route: '/v1/roles',
    permission: 'roles:write',
    body: () => ({ name: 'matrix-role', permissions: [] }),
  },
  {
    method: 'PATCH',
    route: '/v1/roles/:role',
    permission: 'roles:write',
    url: () => '/v1/roles/user',
    body: () => ({ description: 'x' }),
  },
  { method: 'DELETE', route: '/v1/roles/:role', permission: 'roles:write', url: () => '/v1/roles/user' },
  { method: 'GET', route: '/v1/permissions', permission: 'roles:read' },
  {
    method: 'POST',
    route: '/v1/authz/check',
    permission: 'authz:check',
    heldNow: false,
    body: (c) => ({ subject_id: c.owner.id, permissions: ['users:read'] }),
  },
  { method: 'GET', route: '/v1/audit-events', permission: 'audit:read' },
  { method: 'GET', route: '/v1/signing-keys', permission: 'keys:read' },
  { method: 'POST', route: '/v1/signing-keys/rotate', permission: 'keys:write' },
];

export const PROFILE_ROUTES: MatrixRoute[] = [
  { method: 'GET', route: '/v1/profiles/me', permission: 'account:read' },
  {
    method: 'PATCH',
    route: '/v1/profiles/me',
    permission: 'account:write',
    body: () => ({ bio: 'matrix' }),
  },
  {
    method: 'GET',
    route: '/v1/profiles/:user_id',
    permission: ['account:read', 'profiles:read'],
    url: (c) => `/v1/profiles/${c.owner.id}`,
    foreignObject: true,
  },
];

const API_KEY_READ = ['api_keys:own', 'api_keys:read'];
const API_KEY_WRITE = ['api_keys:own', 'api_keys:write'];

/** The owner's key is `fixtures.apiKeyId` (made by test/api-keys/api-keys.security.test.ts). */
export const API_KEY_ROUTES: MatrixRoute[] = [
  {
    method: 'POST',
    route: '/v1/api-keys',
    permission: 'api_keys:own',
    body: () => ({ name: 'matrix', scopes: [] }),
  },
  { method: 'GET', route: '/v1/api-keys', permission: API_KEY_READ },
  {
    method: 'POST',
    route: '/v1/api-keys/verify',
    permission: 'api_keys:verify',
    heldNow: false,
    body: () => ({ key: 'pak_not_a_key' }),
  },
  {
    method: 'GET',
    route: '/v1/api-keys/:id',
    permission: API_KEY_READ,
    url: (c) => `/v1/api-keys/${c.fixtures.apiKeyId}`,
    foreignObject: true,
  },
  {
    method: 'PATCH',
    route: '/v1/api-keys/:id',
    permission: API_KEY_WRITE,
    url: (c) => `/v1/api-keys/${c.fixtures.apiKeyId}`,
    body: () => ({ name: 'renamed by someone else' }),
    foreignObject: true,
  },
  {
    method: 'DELETE',
    route: '/v1/api-keys/:id',
    permission: API_KEY_WRITE,
    url: (c) => `/v1/api-keys/${c.fixtures.apiKeyId}`,
    foreignObject: true,
  },
  {
    method: 'POST',
    route: '/v1/api-keys/:id/rotate',
    permission: API_KEY_WRITE,
    url: (c) => `/v1/api-keys/${c.fixtures.apiKeyId}/rotate`,
    body: () => ({ grace_seconds: 60 }),
    foreignObject: true,
  },
];

/** App clients; the foreign-object (404) cases are in test/clients/clients.security.test.ts. */
export const CLIENT_ROUTES: MatrixRoute[] = [
  {
    method: 'POST',
    route: '/v1/clients',
    permission: 'clients:write',
    body: () => ({ name: 'matrix', scopes: [] }),
  },
  { method: 'GET', route: '/v1/clients', permission: 'clients:read' },
  { method: 'GET', route: '/v1/clients/:id', permission: 'clients:read' },
  { method: 'PATCH', route: '/v1/clients/:id', permission: 'clients:write', body: () => ({ name: 'x' }) },
  { method: 'DELETE', route: '/v1/clients/:id', permission: 'clients:write' },
  {
    method: 'POST',
    route: '/v1/clients/:id/secrets',
    permission: 'clients:write',
    body: () => ({ grace_seconds: 60 }),
  },
];

/** The OAuth endpoints authenticate their callers themselves (RFC 6749 §2.3), so they are public routes. */
export const OAUTH_ROUTES: MatrixRoute[] = [
  { method: 'POST', route: '/oauth/token', permission: 'public' },
  { method: 'POST', route: '/oauth/introspect', permission: 'public' },
  { method: 'POST', route: '/oauth/revoke', permission: 'public' },
];

/** Modules add their route lists here as they land. */
export const ALL_ROUTES: MatrixRoute[] = [
  ...PUBLIC_ROUTES,
  ...AUTH_ROUTES,
  ...ADMIN_ROUTES,
  ...PROFILE_ROUTES,
  ...API_KEY_ROUTES,
  ...CLIENT_ROUTES,
  ...OAUTH_ROUTES,
];
