import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';

const load = (env: Record<string, string>) => loadConfig(env, { generateDevSecrets: false });

describe('configuration', () => {
  it('starts with no configuration at all, on the embedded defaults', () => {
    const config = load({});
    expect(config.port).toBe(8000);
    expect(config.host).toBe('0.0.0.0');
    expect(config.databaseUrl).toBeUndefined();
    expect(config.authProvider).toBe('local');
    expect(config.issuer).toBe('http://localhost:8000');
    expect(config.tokens).toMatchObject({
      accessTtl: 900,
      refreshIdleTtl: 2_592_000,
      refreshAbsoluteTtl: 7_776_000,
    });
    expect(config.rateLimit.enabled).toBe(true);
    expect(config.db.migrations).toEqual({
      lockTimeoutMs: 5000,
      statementTimeoutMs: 600_000,
      retryBudgetMs: 60_000,
      connectTimeoutMs: 2000,
    });
    expect(config.keyEncryptionKey).toHaveLength(32);
    expect(Object.isFrozen(config)).toBe(true);
  });

  it('reads numbers as whole decimal numbers; an empty one is its default, never 0', () => {
    const empty = load({ PORT: '', DB_POOL_MAX: ' ', ACCESS_TOKEN_TTL: '', PASSWORD_HASH_CONCURRENCY: '' });
    expect(empty.port).toBe(8000);
    expect(empty.issuer).toBe('http://localhost:8000');
    expect(empty.db.poolMax).toBe(10);
    expect(empty.tokens.accessTtl).toBe(900);
    expect(load({ PORT: ' 8080 ' }).port).toBe(8080);
    // The cross-checks read an empty one as its default too.
    expect(load({ SHUTDOWN_TIMEOUT_MS: '', SHUTDOWN_DRAIN_MS: '5000' }).shutdownDrainMs).toBe(5000);
    expect(
      load({ REFRESH_TOKEN_ABSOLUTE_TTL: '', REFRESH_TOKEN_IDLE_TTL: '86400' }).tokens.refreshIdleTtl,
    ).toBe(86_400);
    for (const [name, value] of [
      ['PORT', '0x1F40'],
      ['PORT', '1.5e3'],
      ['PORT', '0'],
      ['PORT', '80.5'],
      ['DB_POOL_MAX', '0x10'],
      ['ACCESS_TOKEN_TTL', '1e3'],
      ['ACCESS_TOKEN_TTL', '-1'],
      ['PASSWORD_HASH_CONCURRENCY', 'many'],
    ]) {
      let message = '';
      try {
        load({ [name!]: value! });
      } catch (err) {
        message = err instanceof ConfigError ? err.message : String(err);
      }
      expect(message, `${name}=${value}`).toMatch(
        new RegExp(`${name}: must be a whole number from \\d+ to \\d+, in decimal digits`),
      );
      expect(message).not.toContain(value);
    }
  });

  it('names every bad variable in one error, without echoing values', () => {
    try {
      load({
        NODE_ENV: 'production',
        DATABASE_URL: 'mysql://nope',
        PORT: 'eighty',
        RATE_LIMIT_ENABLED: 'perhaps',
        SECRET_PEPPER: 'c2VjcmV0LXZhbHVl',
      });
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      const message = (err as Error).message;
      for (const name of [
        'DATABASE_URL',
        'PORT',
        'RATE_LIMIT_ENABLED',
        'KEY_ENCRYPTION_KEY',
        'SECRET_PEPPER',
      ]) {
        expect(message).toContain(name);
      }
      expect(message).not.toContain('c2VjcmV0LXZhbHVl');
      expect(message).not.toContain('mysql://nope');
    }
  });

  it('names a bootstrap admin password that breaks the password rules, beside a bad email, without echoing either', () => {
    for (const [password, rule] of [
      ['short', '8 to 128 characters'],
      ['password123', 'too common'],
    ] as const) {
      try {
        load({ BOOTSTRAP_ADMIN_EMAIL: 'not-an-email', BOOTSTRAP_ADMIN_PASSWORD: password });
        expect.unreachable();
      } catch (err) {
        expect(err).toBeInstanceOf(ConfigError);
        const message = (err as Error).message;
        expect(message).toContain('BOOTSTRAP_ADMIN_EMAIL');
        expect(message).toMatch(new RegExp(`BOOTSTRAP_ADMIN_PASSWORD[^\n]*${rule}`));
        expect(message).not.toContain(password);
        expect(message).not.toContain('not-an-email');
      }
    }
    expect(
      load({ BOOTSTRAP_ADMIN_EMAIL: 'a@example.test', BOOTSTRAP_ADMIN_PASSWORD: 'a long enough passphrase' })
        .bootstrapAdmin,
    ).toEqual({
      email: 'a@example.test',
      password: 'a long enough passphrase',
    });
    // A password alone would be ignored: no administrator, and no word why.
    expect(() => load({ BOOTSTRAP_ADMIN_PASSWORD: 'a long enough passphrase' })).toThrow(
      /BOOTSTRAP_ADMIN_EMAIL: is required with BOOTSTRAP_ADMIN_PASSWORD/,
    );
  });

  it('takes a shutdown drain only when it leaves the requests in flight a second of the timeout', () => {
    expect(load({}).shutdownDrainMs).toBe(0);
    expect(load({ SHUTDOWN_DRAIN_MS: '5000' }).shutdownDrainMs).toBe(5000);
    expect(() => load({ SHUTDOWN_DRAIN_MS: '8500' })).toThrow(/SHUTDOWN_DRAIN_MS/);
    expect(load({ SHUTDOWN_DRAIN_MS: '8500', SHUTDOWN_TIMEOUT_MS: '15000' }).shutdownDrainMs).toBe(8500);
  });

  it('takes the migration timeouts and retry budget, and refuses a lock timeout of 0 (no timeout)', () => {
    const config = load({
      DB_MIGRATION_LOCK_TIMEOUT_MS: '2000',
      DB_MIGRATION_STATEMENT_TIMEOUT_MS: '3600000',
      DB_MIGRATION_RETRY_MS: '0',
      DB_CONNECT_TIMEOUT_MS: '500',
    });
    expect(config.db.migrations).toEqual({
      lockTimeoutMs: 2000,
      statementTimeoutMs: 3_600_000,
      retryBudgetMs: 0,
      connectTimeoutMs: 500,
    });
    expect(() => load({ DB_MIGRATION_LOCK_TIMEOUT_MS: '0' })).toThrow(/DB_MIGRATION_LOCK_TIMEOUT_MS/);
  });

  it('takes MAX_SESSIONS_PER_USER from 1 to 10000 (100 by default), and names anything else', () => {
    expect(load({}).sessions.maxPerUser).toBe(100);
    expect(load({ MAX_SESSIONS_PER_USER: '' }).sessions.maxPerUser).toBe(100);
    expect(load({ MAX_SESSIONS_PER_USER: '1' }).sessions.maxPerUser).toBe(1);
    expect(load({ MAX_SESSIONS_PER_USER: '10000' }).sessions.maxPerUser).toBe(10_000);
    // 0 is no "unlimited": there is none, and a limit of no session would refuse every sign-in.
    for (const value of ['0', '10001', '-5', '2.5', '1e2', 'unlimited']) {
      expect(() => load({ MAX_SESSIONS_PER_USER: value }), value).toThrow(
        'MAX_SESSIONS_PER_USER: must be a whole number from 1 to 10000, in decimal digits',
      );
    }
  });

  it('takes MFA_SETUP_TTL from 60 to 86400 seconds (900 by default), and names anything else', () => {
    expect(load({}).mfa.setupTtlSeconds).toBe(900);
    expect(load({ MFA_SETUP_TTL: '' }).mfa.setupTtlSeconds).toBe(900);
    expect(load({ MFA_SETUP_TTL: '60' }).mfa.setupTtlSeconds).toBe(60);
    expect(load({ MFA_SETUP_TTL: '86400' }).mfa.setupTtlSeconds).toBe(86_400);
    for (const value of ['0', '59', '86401', '2.5', 'forever']) {
      expect(() => load({ MFA_SETUP_TTL: value }), value).toThrow(
        'MFA_SETUP_TTL: must be a whole number from 60 to 86400, in decimal digits',
      );
    }
  });

  it('takes MAX_API_KEYS_PER_USER from 1 to 10000 (100 by default), and names anything else', () => {
    expect(load({}).apiKeys.maxPerUser).toBe(100);
    expect(load({ MAX_API_KEYS_PER_USER: '' }).apiKeys.maxPerUser).toBe(100);
    expect(load({ MAX_API_KEYS_PER_USER: '1' }).apiKeys.maxPerUser).toBe(1);
    expect(load({ MAX_API_KEYS_PER_USER: '10000' }).apiKeys.maxPerUser).toBe(10_000);
    // As for sessions, 0 is no "unlimited": there is none.
    for (const value of ['0', '10001', '-5', '2.5', '1e2', 'unlimited']) {
      expect(() => load({ MAX_API_KEYS_PER_USER: value }), value).toThrow(
        'MAX_API_KEYS_PER_USER: must be a whole number from 1 to 10000, in decimal digits',
      );
    }
  });

  it('takes MAX_CLIENTS_PER_USER from 1 to 10000 (100 by default), and names anything else', () => {
    expect(load({}).clients.maxPerUser).toBe(100);
    expect(load({ MAX_CLIENTS_PER_USER: '' }).clients.maxPerUser).toBe(100);
    expect(load({ MAX_CLIENTS_PER_USER: '1' }).clients.maxPerUser).toBe(1);
    expect(load({ MAX_CLIENTS_PER_USER: '10000' }).clients.maxPerUser).toBe(10_000);
    for (const value of ['0', '10001', '-5', '2.5', '1e2', 'unlimited']) {
      expect(() => load({ MAX_CLIENTS_PER_USER: value }), value).toThrow(
        'MAX_CLIENTS_PER_USER: must be a whole number from 1 to 10000, in decimal digits',
      );
    }
  });

  it('requires KEY_ENCRYPTION_KEY in production', () => {
    expect(() =>
      load({ NODE_ENV: 'production', SECRET_PEPPER: Buffer.alloc(32, 1).toString('base64') }),
    ).toThrow(/KEY_ENCRYPTION_KEY/);
  });

  it('does not demand the production secrets of a command that uses none (needsSecrets: false)', () => {
    const config = loadConfig(
      { NODE_ENV: 'production', DATA_DIR: '/nonexistent/data' },
      { needsSecrets: false },
    );
    expect(config.env).toBe('production');
    // Random, in memory: nothing was written under the (unwritable) DATA_DIR.
    expect(config.keyEncryptionKey).toHaveLength(32);
    expect(config.secretPepper).toHaveLength(32);
  });

  it('chooses supabase when SUPABASE_URL is set, and requires its anon and service-role keys', () => {
    expect(() => load({ SUPABASE_URL: 'https://x.supabase.co' })).toThrow(
      /SUPABASE_ANON_KEY[\s\S]*SUPABASE_SERVICE_ROLE_KEY/,
    );
    // Without the service-role key a user deleted here would come back at their next sign-in.
    expect(() => load({ SUPABASE_URL: 'https://x.supabase.co', SUPABASE_ANON_KEY: 'anon' })).toThrow(
      /SUPABASE_SERVICE_ROLE_KEY: is required when AUTH_PROVIDER=supabase/,
    );
    const config = load({
      SUPABASE_URL: 'https://x.supabase.co',
      SUPABASE_ANON_KEY: 'anon',
      SUPABASE_SERVICE_ROLE_KEY: 'service',
    });
    expect(config.authProvider).toBe('supabase');
    expect(config.supabase?.serviceRoleKey).toBe('service');
  });

  it('takes SUPABASE_USER_RECHECK_SECONDS from 0 (every refresh) to 86400 (300 by default), and names anything else', () => {
    const supabase = {
      SUPABASE_URL: 'https://x.supabase.co',
      SUPABASE_ANON_KEY: 'anon',
      SUPABASE_SERVICE_ROLE_KEY: 'service',
    };
    expect(load(supabase).supabase?.userRecheckSeconds).toBe(300);
    expect(load({ ...supabase, SUPABASE_USER_RECHECK_SECONDS: '' }).supabase?.userRecheckSeconds).toBe(300);
    expect(load({ ...supabase, SUPABASE_USER_RECHECK_SECONDS: '0' }).supabase?.userRecheckSeconds).toBe(0);
    expect(load({ ...supabase, SUPABASE_USER_RECHECK_SECONDS: '86400' }).supabase?.userRecheckSeconds).toBe(
      86_400,
    );
    for (const value of ['86401', '-1', '2.5', '5m']) {
      expect(() => load({ ...supabase, SUPABASE_USER_RECHECK_SECONDS: value }), value).toThrow(
        'SUPABASE_USER_RECHECK_SECONDS: must be a whole number from 0 to 86400, in decimal digits',
      );
    }
  });

  it('checks TRUST_PROXY entries as Fastify reads them, naming each bad one', () => {
    for (const good of [
      '',
      'true',
      'false',
      '10.0.0.1',
      '10.0.0.0/8, 192.168.0.0/255.255.0.0',
      'loopback, ::1',
      'fd00::/8',
    ])
      expect(() => load({ TRUST_PROXY: good }), good).not.toThrow();
    expect(load({ TRUST_PROXY: '10.0.0.0/8,loopback' }).trustProxy).toEqual(['10.0.0.0/8', 'loopback']);
    // Empty entries (a trailing comma) are no entries, here as in the check.
    expect(load({ TRUST_PROXY: '10.0.0.1,,loopback,' }).trustProxy).toEqual(['10.0.0.1', 'loopback']);
    for (const bad of ['garbage', '10.0.0.0/33', '10.0.0.1/8/1', 'true,10.0.0.1', 'fd00::/129'])
      expect(() => load({ TRUST_PROXY: bad }), bad).toThrow(/TRUST_PROXY: /);
    expect(() => load({ TRUST_PROXY: 'garbage' })).toThrow(/"garbage" is not an IP address/);
    // A trailing comma leaves the single word as it is, not an address named "true".
    expect(load({ TRUST_PROXY: 'true,' }).trustProxy).toBe(true);
    expect(load({ TRUST_PROXY: ' false , ' }).trustProxy).toBe(false);
    // Fastify 5.12.1 ignores a hop count (it trusts no forwarded hop), which would silently put every
    // client behind the load balancer's one address: refused, saying what to set instead.
    for (const hops of ['1', '2', '1, 10.0.0.0/8'])
      expect(() => load({ TRUST_PROXY: hops }), hops).toThrow(
        /TRUST_PROXY: "\d+" is a hop count.*address or range/,
      );
  });

  it('takes CORS_ORIGINS as origins, normalized as browsers send them; refuses * and paths', () => {
    expect(
      load({ CORS_ORIGINS: 'https://App.example.com/, http://localhost:5173,https://x.test:443' })
        .corsOrigins,
    ).toEqual(['https://app.example.com', 'http://localhost:5173', 'https://x.test']);
    expect(() => load({ CORS_ORIGINS: '*' })).toThrow(/CORS_ORIGINS: must list the origins/);
    expect(() => load({ CORS_ORIGINS: 'https://*.example.com' })).toThrow(/has a wildcard/);
    for (const bad of ['not a url', 'https://app.example.com/path', 'ftp://x.test', 'https://x.test?a=1'])
      expect(() => load({ CORS_ORIGINS: bad }), bad).toThrow(/CORS_ORIGINS: ".*" is not an origin/);
  });

  it('derives the issuer from PUBLIC_URL without a trailing slash', () => {
    expect(load({ PUBLIC_URL: 'https://auth.example.com/' }).issuer).toBe('https://auth.example.com');
    expect(load({ PUBLIC_URL: 'https://example.com/auth' }).issuer).toBe('https://example.com/auth');
  });

  it('refuses addresses that would publish a password, carry a query or point at the wrong thing', () => {
    const supabaseKeys = { SUPABASE_ANON_KEY: 'anon', SUPABASE_SERVICE_ROLE_KEY: 'service' };
    const refused: Array<[string, string, string]> = [
      // Into every token's iss, the discovery document and the start-up log.
      ['PUBLIC_URL', 'https://ops:s3cret@auth.example.com', 'user name or password'],
      // RFC 8414 §2: an issuer has neither; paths appended after them go nowhere.
      ['PUBLIC_URL', 'https://auth.example.com/?tenant=a', 'query or a fragment'],
      ['PUBLIC_URL', 'https://auth.example.com/#x', 'query or a fragment'],
      ['PUBLIC_URL', 'https://auth.example.com?', 'query or a fragment'],
      ['PUBLIC_URL', 'ftp://auth.example.com', 'http://'],
      // Into every log line about an unreachable Supabase.
      ['SUPABASE_URL', 'https://user:s3cret@x.supabase.co', 'user name or password'],
      // supabase-js adds /auth/v1: this one would answer 404 to everything, and every sign-in fail.
      ['SUPABASE_URL', 'https://x.supabase.co/auth/v1', 'without /auth/v1'],
      ['SUPABASE_URL', 'https://x.supabase.co/auth/v1/', 'without /auth/v1'],
      // libpq would take the user's name for the database: the tables would go into `postgres`.
      ['DATABASE_URL', 'postgres://postgres@127.0.0.1:5432/', 'database name'],
      ['DATABASE_URL', 'postgres://postgres@127.0.0.1:5432', 'database name'],
      ['REDIS_URL', 'redis://', 'host'],
      // A listen failure, not a database one.
      ['HOST', 'localhost ', 'host name or an IP address'],
      ['HOST', 'not a host!', 'host name or an IP address'],
    ];
    for (const [name, value, words] of refused) {
      const attempt = () => load({ [name]: value, ...(name === 'SUPABASE_URL' ? supabaseKeys : {}) });
      expect(attempt, `${name}=${value}`).toThrow(ConfigError);
      expect(attempt, `${name}=${value}`).toThrow(new RegExp(`${name}: .*${words.replace(/[/.]/g, '\\$&')}`));
      expect(attempt).not.toThrow(/s3cret/);
    }
    expect(load({ HOST: '::' }).host).toBe('::');
    expect(load({ HOST: 'auth-0.internal' }).host).toBe('auth-0.internal');
    expect(load({ DATABASE_URL: 'postgresql://u@db.example.com/auth' }).databaseUrl).toBe(
      'postgresql://u@db.example.com/auth',
    );
    expect(load({ SUPABASE_URL: 'https://sb.example.com/prefix', ...supabaseKeys }).authProvider).toBe(
      'supabase',
    );
  });

  it('takes METRICS_TOKEN as a bearer token of 16 characters or more, never echoed when refused', () => {
    expect(load({}).metricsToken).toBeUndefined();
    expect(load({ METRICS_TOKEN: '' }).metricsToken).toBeUndefined();
    expect(load({ METRICS_TOKEN: 'c2NyYXBlLXRva2VuLTAx+/==' }).metricsToken).toBe('c2NyYXBlLXRva2VuLTAx+/==');
    for (const value of [
      'short-s3cret',
      'has a s3cret space in it',
      's3cret,with,commas,0123',
      'c2NyYXBlLXRva2VuLTAx+/s3cret===',
    ]) {
      expect(() => load({ METRICS_TOKEN: value }), value).toThrow(/METRICS_TOKEN: must be a bearer token/);
      expect(() => load({ METRICS_TOKEN: value })).not.toThrow(/s3cret/);
    }
  });
});
