/**
 * The permission catalogue (GET /v1/permissions). Permissions are `resource:action`; a grant of
 * `resource:*` covers every action on the resource and `*` covers everything.
 */
export const PERMISSIONS = {
  'account:read': 'Read one’s own account: /v1/auth/me, one’s profile and sessions',
  'account:write': 'Change one’s own account: profile, password, sessions',
  'api_keys:own': 'Create and manage one’s own API keys',
  'api_keys:read': 'Read anyone’s API keys (never their secrets)',
  'api_keys:write': 'Revoke or change anyone’s API keys',
  'api_keys:verify': 'Verify API keys presented to another service (POST /v1/api-keys/verify)',
  'users:read': 'List and read users and their roles',
  'users:write': 'Disable, enable and delete users',
  'roles:read': 'Read roles and the permission catalogue',
  'roles:write': 'Create, change and delete roles',
  'roles:assign': 'Grant roles to users and remove them',
  'profiles:read': 'Read any user’s profile',
  'clients:read': 'Read app clients',
  'clients:write': 'Register, change, rotate and delete app clients',
  'tokens:introspect': 'Introspect tokens (RFC 7662) issued to anyone',
  'keys:read': 'Read the signing keys’ public parts and states',
  'keys:write': 'Rotate the signing keys',
  'audit:read': 'Read the audit log',
  'authz:check': 'Ask whether a user holds permissions (POST /v1/authz/check)',
} as const;

export type Permission = keyof typeof PERMISSIONS;

/**
 * The permissions of one's own account, held by a user's token or API key: a service has no account,
 * so its token reaches nothing with them (403, "This route is for users, not services"). The OpenAPI
 * document offers a service's token (the `clientCredentials` scheme) on the others only.
 */
export const SELF_SERVICE_PERMISSIONS: ReadonlySet<string> = new Set<Permission>([
  'account:read',
  'account:write',
  'api_keys:own',
]);

/** `*`, `resource:*` or `resource:action`, lower case; also the OpenAPI document's `pattern`. */
export const PERMISSION_PATTERN = /^(\*|[a-z][a-z0-9_]*:(\*|[a-z][a-z0-9_]*))$/;

export const isPermissionString = (p: string) => PERMISSION_PATTERN.test(p) && p.length <= 100;

/** Whether a grant covers a required permission: exact, `resource:*`, or `*`. */
export function grantCovers(grant: string, required: string): boolean {
  if (grant === '*' || grant === required) return true;
  if (grant.endsWith(':*')) return required.startsWith(grant.slice(0, -1));
  return false;
}

export function hasPermission(grants: Iterable<string>, required: string): boolean {
  for (const g of grants) if (grantCovers(g, required)) return true;
  return false;
}

function holdsFully(held: readonly string[], permission: string): boolean {
  if (permission === '*') return held.includes('*');
  if (permission.endsWith(':*')) return held.some((h) => h === '*' || h === permission);
  return hasPermission(held, permission);
}

/** True when everything `requested` would give is already covered by `held` (nobody grants more than they hold). */
export function isSubset(requested: Iterable<string>, held: Iterable<string>): boolean {
  const heldList = [...held];
  for (const r of requested) if (!holdsFully(heldList, r)) return false;
  return true;
}

/** The permissions of `requested` that `held` does not fully cover, in their order: what a refusal names. */
export function notHeld(requested: Iterable<string>, held: Iterable<string>): string[] {
  const heldList = [...held];
  return [...requested].filter((r) => !holdsFully(heldList, r));
}

/**
 * What a credential limited to `scopes` may do when its owner holds `held`: each scope survives
 * only as far as the owner still holds it. Used for API keys at every use.
 */
export function intersectPermissions(scopes: Iterable<string>, held: Iterable<string>): string[] {
  const heldList = [...held];
  const out = new Set<string>();
  for (const s of scopes) {
    if (holdsFully(heldList, s)) out.add(s);
    else for (const h of heldList) if (grantCovers(s, h)) out.add(h);
  }
  return [...out].sort();
}
