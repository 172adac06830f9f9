import type { Config } from './config.js';

export interface StartupWarning {
  message: string;
  fields?: Record<string, unknown>;
}

/**
 * Settings that are allowed but rarely what is meant, said at start where an operator looks first.
 * `roleExists` reads the roles table (the database is migrated by then).
 */
export async function startupWarnings(
  config: Config,
  databaseKind: string,
  roleExists: (name: string) => Promise<boolean>,
): Promise<StartupWarning[]> {
  const warnings: StartupWarning[] = [];
  // A name misspelt there holds nobody back: the administrators it was meant for need no second factor.
  for (const role of config.mfa.requiredRoles)
    if (!(await roleExists(role)))
      warnings.push({
        fields: { role },
        message: `MFA_REQUIRED_ROLES names ${role}, which is not a role (yet): it holds nobody back until it is made`,
      });
  if (config.env !== 'production') return warnings;
  if (!config.publicUrlSet)
    warnings.push({
      fields: { publicUrl: config.publicUrl },
      message:
        'PUBLIC_URL is not set: tokens carry this issuer and discovery points here; set it to the URL clients use',
    });
  if (databaseKind !== 'postgres')
    warnings.push({
      fields: { dataDir: config.dataDir },
      message:
        'no DATABASE_URL: running on the embedded database, which one process alone can open; its files must be on a volume that outlives the container',
    });
  if (config.authProvider === 'local' && !config.mail)
    warnings.push({
      message:
        'no SMTP_URL: password recovery is off (POST /v1/auth/password/forgot answers 404); set SMTP_URL and MAIL_FROM to mail reset links',
    });
  // The pages mailed links open carry the token (in the fragment): over plain HTTP, anyone on the path
  // can rewrite the page to send it elsewhere (ASVS V2.7.4: a secure channel).
  const linkPages: Array<[string, string | undefined]> = [
    ['PASSWORD_RESET_URL', config.passwordReset.url],
    ['EMAIL_CONFIRMATION_URL', config.emailConfirmation.url],
    ['EMAIL_CHANGE_URL', config.emailChange.url],
    ['MAGIC_LINK_URL', config.magicLink.url],
  ];
  for (const [name, url] of linkPages)
    if (url?.toLowerCase().startsWith('http:'))
      warnings.push({
        fields: { [name]: url },
        message: `${name} is plain http: the mailed links' tokens reach a page anyone on the way can rewrite to send them elsewhere; use https`,
      });
  // A sign-in link is an out-of-band authenticator: ASVS (v4 2.7.2, 5.0 6.5.5) gives it 10 minutes at most.
  if (config.authProvider === 'local' && config.magicLink.ttlSeconds > 600)
    warnings.push({
      fields: { magicLinkTtl: config.magicLink.ttlSeconds },
      message: `MAGIC_LINK_TTL=${config.magicLink.ttlSeconds}: a sign-in link works for longer than the 10 minutes OWASP ASVS allows a mailed sign-in token (V2.7.2); a link read from a mailbox later still signs in. Leave it at 600 or below`,
    });
  // `true`, or a range as wide as every address (0.0.0.0/0, ::/0): every hop is a proxy.
  const everyHop =
    config.trustProxy === true
      ? 'true'
      : config.trustProxy === false
        ? undefined
        : config.trustProxy.find((p) => /\/0$/.test(p.trim()));
  if (everyHop !== undefined)
    warnings.push({
      message: `TRUST_PROXY=${everyHop}: X-Forwarded-For is believed whoever sends it, so any client chooses the address the per-IP limits and the audit log see; set TRUST_PROXY to the proxies' addresses or range`,
    });
  if (!config.rateLimit.enabled)
    warnings.push({
      message:
        'RATE_LIMIT_ENABLED=false: no per-address limits and no per-account sign-in lockout; password guessing is limited by nothing but argon2',
    });
  if (config.metricsToken === undefined)
    warnings.push({
      message:
        'no METRICS_TOKEN: GET /metrics answers anyone who reaches it, and its counters tell what the API keeps to itself (whether a reset mail went out, whether a client id exists); set it, or keep /metrics from the proxy',
    });
  return warnings;
}
