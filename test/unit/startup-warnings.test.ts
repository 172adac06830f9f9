import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config.js';
import { startupWarnings } from '../../src/startup-warnings.js';

const KEY = Buffer.alloc(32, 7).toString('base64');
const load = (env: Record<string, string>) => loadConfig(env, { generateDevSecrets: false });
const roles = new Set(['admin', 'user']);
const exists = async (name: string) => roles.has(name);
/** Production with only the secrets it cannot start without. */
const PRODUCTION = { NODE_ENV: 'production', KEY_ENCRYPTION_KEY: KEY, SECRET_PEPPER: KEY };
/** Production as it should be set: nothing to warn about. */
const CONFIGURED_PRODUCTION = {
  ...PRODUCTION,
  PUBLIC_URL: 'https://auth.example.com',
  SMTP_URL: 'smtp://mail.example.com',
  MAIL_FROM: 'auth@example.com',
  METRICS_TOKEN: 'a'.repeat(32),
};
const messages = async (env: Record<string, string>, databaseKind = 'postgres') =>
  (await startupWarnings(load(env), databaseKind, exists)).map((w) => w.message);

describe('what the start warns about', () => {
  it('a role in MFA_REQUIRED_ROLES that does not exist: it would hold nobody back', async () => {
    expect(await messages({ MFA_REQUIRED_ROLES: 'admin' })).toEqual([]);
    expect(await messages({ MFA_REQUIRED_ROLES: 'admin,admn' })).toEqual([
      expect.stringMatching(/^MFA_REQUIRED_ROLES names admn, which is not a role/),
    ]);
  });

  it('in production: no PUBLIC_URL, the embedded database, no SMTP_URL, every proxy trusted, limits turned off, /metrics open', async () => {
    const production = PRODUCTION;
    expect(
      await messages({ ...production, TRUST_PROXY: 'true', RATE_LIMIT_ENABLED: 'false' }, 'pglite'),
    ).toEqual([
      expect.stringMatching(/^PUBLIC_URL is not set/),
      expect.stringMatching(/^no DATABASE_URL/),
      expect.stringMatching(/^no SMTP_URL/),
      expect.stringMatching(/^TRUST_PROXY=true: X-Forwarded-For is believed whoever sends it/),
      expect.stringMatching(/^RATE_LIMIT_ENABLED=false/),
      expect.stringMatching(/^no METRICS_TOKEN: GET \/metrics answers anyone/),
    ]);
    // Production as it should be set: nothing to say.
    const configured = { ...CONFIGURED_PRODUCTION, TRUST_PROXY: '10.0.0.0/8' };
    expect(await messages(configured)).toEqual([]);
    // A range of every address trusts every hop as `true` does.
    for (const everyAddress of ['0.0.0.0/0', '10.0.0.1, ::/0'])
      expect(await messages({ ...configured, TRUST_PROXY: everyAddress }), everyAddress).toEqual([
        expect.stringMatching(
          /^TRUST_PROXY=(0\.0\.0\.0|::)\/0: X-Forwarded-For is believed whoever sends it/,
        ),
      ]);
    // Development says none of those.
    expect(await messages({ RATE_LIMIT_ENABLED: 'false', TRUST_PROXY: 'true' }, 'pglite')).toEqual([]);
  });

  it('a sign-in link that works past the 10 minutes ASVS V2.7.2 allows, by default none', async () => {
    const production = CONFIGURED_PRODUCTION;
    expect(load(production).magicLink.ttlSeconds).toBe(600);
    expect(await messages(production)).toEqual([]);
    expect(await messages({ ...production, MAGIC_LINK_TTL: '600' })).toEqual([]);
    expect(await messages({ ...production, MAGIC_LINK_TTL: '900' })).toEqual([
      expect.stringMatching(/^MAGIC_LINK_TTL=900: a sign-in link works for longer than the 10 minutes/),
    ]);
  });

  it('a page for mailed links (their tokens) on plain http, in production', async () => {
    const production = CONFIGURED_PRODUCTION;
    const pages = {
      PASSWORD_RESET_URL: 'https://app.example.com/reset',
      EMAIL_CONFIRMATION_URL: 'https://app.example.com/confirm',
      EMAIL_CHANGE_URL: 'https://app.example.com/email',
      MAGIC_LINK_URL: 'https://app.example.com/sign-in',
    };
    expect(await messages({ ...production, ...pages })).toEqual([]);
    expect(
      await messages({
        ...production,
        ...pages,
        PASSWORD_RESET_URL: 'http://app.example.com/reset',
        MAGIC_LINK_URL: 'HTTP://app.example.com/sign-in',
      }),
    ).toEqual([
      expect.stringMatching(/^PASSWORD_RESET_URL is plain http: the mailed links' tokens/),
      expect.stringMatching(/^MAGIC_LINK_URL is plain http/),
    ]);
    // Development (a page on localhost) says nothing.
    expect(await messages({ PASSWORD_RESET_URL: 'http://localhost:3000/reset' })).toEqual([]);
  });
});
