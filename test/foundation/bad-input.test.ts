import { randomUUID } from 'node:crypto';
import type { FastifyInstance } from 'fastify';
import type { InjectOptions } from 'light-my-request';
import { sql } from 'drizzle-orm';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { basicAuthorization } from '../../src/modules/oauth/oauth.client-auth.js';
import { createClient } from '../clients/helpers.js';
import { buildTestApp } from '../support/app.js';
import { type FakeGoTrue, startFakeGoTrue, supabaseEnv } from '../support/fake-gotrue.js';
import { ownDatabase } from '../support/database.js';
import { createAdmin } from '../support/factories.js';
import { bearer } from '../support/http.js';

/*
 * API.md: "No 500 for bad input". Every operation of the OpenAPI document is sent, as an
 * administrator, bodies, path parameters, query strings and content types it must refuse (or accept),
 * generated from its own schema: wrong types, NUL bytes and lone surrogates in every string field,
 * oversized strings, numbers out of range, malformed JSON, foreign content types, junk ids. Each answer
 * must be below 500 and, when an error, in the endpoint's documented error format.
 */

type JsonSchema = {
  type?: string | string[];
  properties?: Record<string, JsonSchema>;
  required?: string[];
  items?: JsonSchema;
  anyOf?: JsonSchema[];
  oneOf?: JsonSchema[];
  enum?: unknown[];
  format?: string;
  pattern?: string;
  minLength?: number;
  minimum?: number;
  minItems?: number;
};

interface Operation {
  method: string;
  path: string;
  parameters: { in: string; name: string; schema?: JsonSchema }[];
  /** The statuses the document declares for the operation. */
  responses: string[];
  bodies: { contentType: string; schema: JsonSchema }[];
}

/** A value the schema accepts, as plain as possible (used as the base every mutation starts from). */
function sample(schema: JsonSchema, name = ''): unknown {
  const options = schema.anyOf ?? schema.oneOf;
  if (options) return sample(options.find((o) => o.type !== 'null') ?? options[0]!, name);
  if (schema.enum) return schema.enum[0];
  const type = Array.isArray(schema.type) ? schema.type[0] : schema.type;
  switch (type) {
    case 'object': {
      const out: Record<string, unknown> = {};
      for (const key of schema.required ?? []) out[key] = sample(schema.properties?.[key] ?? {}, key);
      return out;
    }
    case 'array':
      return Array.from({ length: schema.minItems ?? 0 }, () => sample(schema.items ?? {}, name));
    case 'integer':
    case 'number':
      return schema.minimum ?? 1;
    case 'boolean':
      return true;
    case 'null':
      return null;
    default:
      if (schema.format === 'uuid') return randomUUID();
      if (schema.format === 'uri') return 'https://example.test/a.png';
      if (name === 'email') return `bad-input-${randomUUID().slice(0, 8)}@example.test`;
      if (name.includes('password')) return 'a long enough passphrase 42';
      if (schema.pattern) return 'bad-input-role';
      return 'x'.repeat(Math.max(1, schema.minLength ?? 1));
  }
}

const STRINGS = [
  '\u0000',
  'a\u0000b',
  '\ud800',
  'x'.repeat(100_000),
  '',
  ' ',
  "'; select pg_sleep(1); --",
  '%00',
  '{"$gt":""}',
  '../../etc/passwd',
];
const NON_STRINGS = [null, true, 0, -1, 1.5, 1e308, [], {}, ['x'], { a: 1 }];
/** Instants at the edges of what the date-time pattern allows (year 0, year 9999 with a negative offset). */
const DATE_TIMES = [
  '0000-01-01T00:00:00Z',
  '0001-01-01T00:00:00+23:59',
  '1969-12-31T23:59:59.999999999Z',
  '9999-12-31T23:59:59.999Z',
  '9999-12-31T23:59:59-23:59',
  '2024-02-29T12:00:00+01:00',
  '2026-02-30T00:00:00Z',
  '2026-01-01T24:00:00Z',
];
/** The tables whose rows a refused request must leave as they were. */
const STATE_TABLES = [
  'users',
  'roles',
  'user_roles',
  'profiles',
  'api_keys',
  'clients',
  'sessions',
  'refresh_tokens',
  'revocations',
  'signing_keys',
];
const NUMBERS = [-1, 1.5, 1e308, -1e308, 2 ** 53 + 1, '1', '', null, true, []];

/** Bodies derived from the base: every property replaced by every hostile value of its kind. */
function mutations(schema: JsonSchema): unknown[] {
  const base = sample(schema);
  const object = (schema.anyOf ?? schema.oneOf ?? [schema]).find((s) => s.type === 'object') ?? schema;
  const out: unknown[] = [base, null, [], 'text', 42, { ...(base as object), unknown_field: 1 }];
  for (const [key, property] of Object.entries(object.properties ?? {})) {
    const types = (property.anyOf ?? property.oneOf ?? [property]).map((s) => s.type);
    const numeric = types.includes('integer') || types.includes('number');
    const values: unknown[] = [...(numeric ? NUMBERS : [...STRINGS, ...NON_STRINGS])];
    if ((property.anyOf ?? property.oneOf ?? [property]).some((s) => s.format === 'date-time'))
      values.push(...DATE_TIMES);
    if (types.includes('array')) values.push([...STRINGS], Array(1000).fill('x:y'), [null]);
    for (const value of values) {
      if (value === null && types.includes('null')) continue;
      out.push({ ...(base as object), [key]: value });
    }
  }
  return out;
}

const RAW_BODIES = [
  '{',
  '{"a":',
  '\u0000',
  '{"__proto__":{"polluted":true}}',
  '{"constructor":{"prototype":{"polluted":true}}}',
  '['.repeat(5000) + ']'.repeat(5000),
  `{"k":"${'x'.repeat(70_000)}"}`,
];
const PATH_VALUES = [randomUUID(), 'not-a-uuid', '%00', '%E0%A4%A', 'x'.repeat(3000), '..', 'Admin!', '%20'];
const QUERY_VALUES = [
  '',
  '-1',
  '0',
  '1e9',
  'abc',
  '%00',
  'x'.repeat(3000),
  'not-a-date',
  'eyJ4IjoxfQ',
  '%E0%A4%A',
  // Cursors shaped like the service's own (base64url JSON [created_at, id]) with values out of range.
  ...[
    ['0000-01-01T00:00:00Z', randomUUID()],
    ['9999-12-31T23:59:59-23:59', randomUUID()],
    ['2026-01-01T00:00:00Z', 'not-a-uuid'],
    ['2026-01-01T00:00:00Z', 'x'.repeat(150)],
  ].map((tuple) => Buffer.from(JSON.stringify(tuple)).toString('base64url')),
];

function operations(document: {
  paths: Record<string, Record<string, { parameters?: Operation['parameters']; requestBody?: unknown }>>;
}): Operation[] {
  const out: Operation[] = [];
  for (const [path, methods] of Object.entries(document.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const content = (op.requestBody as { content?: Record<string, { schema: JsonSchema }> } | undefined)
        ?.content;
      out.push({
        method: method.toUpperCase(),
        path,
        responses: Object.keys((op as { responses?: object }).responses ?? {}),
        parameters: op.parameters ?? [],
        bodies: Object.entries(content ?? {}).map(([contentType, c]) => ({ contentType, schema: c.schema })),
      });
    }
  }
  return out;
}

/** Form encoding; a lone surrogate, which UTF-8 cannot carry, goes as the invalid bytes it would be. */
function formComponent(value: string): string {
  return value.replace(/[\s\S]/gu, (c) => {
    try {
      return encodeURIComponent(c);
    } catch {
      return '%ED%A0%80';
    }
  });
}

function encodeForm(value: unknown): string {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return String(value);
  return Object.entries(value as Record<string, unknown>)
    .map(([k, v]) => `${formComponent(k)}=${formComponent(typeof v === 'string' ? v : JSON.stringify(v))}`)
    .join('&');
}

/** The operations that reach Supabase when it is the provider: run a second time against the fake GoTrue. */
const REACHES_PROVIDER = (op: Operation) =>
  op.path.startsWith('/v1/auth/') || (op.method === 'DELETE' && op.path === '/v1/users/{id}');

describe.each(['local', 'supabase'] as const)(
  'bad input never gets a 500 (API.md), %s provider',
  (provider) => {
    let app: FastifyInstance;
    let gotrue: FakeGoTrue | undefined;
    let documentOperations: Operation[];
    let basic: string;

    let own: Awaited<ReturnType<typeof ownDatabase>>;

    // A database of its own: the row digest below must see only what this file's requests do.
    beforeAll(async () => {
      own = await ownDatabase('auth_bad_input');
      gotrue = provider === 'supabase' ? await startFakeGoTrue() : undefined;
      const supabase: Record<string, string> = gotrue
        ? {
            ...supabaseEnv(gotrue),
          }
        : {};
      app = await buildTestApp({
        env: { RATE_LIMIT_ENABLED: 'false', ...supabase },
        deps: { database: own.database },
      });
      const admin = await createAdmin(app);
      const client = await createClient(app, admin.accessToken, {
        name: 'bad-input',
        scopes: ['tokens:introspect'],
      });
      basic = basicAuthorization(client.client_id, client.client_secret);
      const doc = await app.inject({ method: 'GET', url: '/openapi.json' });
      documentOperations = operations(doc.json());
      expect(documentOperations.length).toBeGreaterThan(40);
    });

    afterAll(async () => {
      await app.close();
      await own.dispose();
      await gotrue?.close();
    });

    /**
     * Every row of the tables a request can change, as one digest. Audit events are left out: refusing a
     * login or a permission is itself audited.
     */
    async function stateDigest(): Promise<string> {
      const digests = STATE_TABLES.map(
        (t) => `(select md5(coalesce(string_agg(x::text, '|' order by x::text), '')) from ${t} x)`,
      );
      const result = (await app.services.db.execute(
        sql.raw(`select ${digests.join(' || ')} as digest`),
      )) as unknown as {
        rows: Array<{ digest: string }>;
      };
      return result.rows[0]!.digest;
    }

    /**
     * Sends each request; collects every answer that breaks the rule instead of stopping at the first.
     * With `declared`, a status the operation's document does not list breaks it too. A 4xx that
     * changed any row breaks it as well (API.md: bad input changes nothing).
     */
    async function probe(requests: InjectOptions[], oauth: boolean, declared?: string[]): Promise<string[]> {
      const failures: string[] = [];
      let before = await stateDigest();
      for (const request of requests) {
        const res = await app.inject(request);
        const after = await stateDigest();
        if (res.statusCode >= 400 && res.statusCode < 500 && after !== before) {
          failures.push(
            `${request.method} ${String(request.url).slice(0, 120)} -> ${res.statusCode}, but changed rows`,
          );
        }
        before = after;
        if (declared && !declared.includes(String(res.statusCode))) {
          failures.push(
            `${request.method} ${String(request.url).slice(0, 120)} -> ${res.statusCode}, not declared`,
          );
        }
        const type = String(res.headers['content-type'] ?? '');
        const errorFormat = oauth
          ? type.startsWith('application/json')
          : type.startsWith('application/problem+json');
        if (res.statusCode >= 500 || (res.statusCode >= 400 && !errorFormat)) {
          const payload =
            typeof request.payload === 'string' ? request.payload : JSON.stringify(request.payload);
          failures.push(
            `${request.method} ${String(request.url).slice(0, 120)} [${(payload ?? '').slice(0, 120)}] -> ` +
              `${res.statusCode} ${type} ${res.body.slice(0, 200)}`,
          );
        }
      }
      return failures;
    }

    it('answers every operation’s hostile bodies, paths and queries below 500, in its error format, with a status its document declares', async () => {
      const failures: string[] = [];
      for (const op of documentOperations.filter((o) => provider === 'local' || REACHES_PROVIDER(o))) {
        const oauth = op.path.startsWith('/oauth/');
        // A fresh administrator per operation: logout or a password change must not starve the rest.
        const admin = await createAdmin(app);
        const auth = oauth ? { authorization: basic } : bearer(admin.accessToken);
        const pathParams = op.parameters.filter((p) => p.in === 'path');
        const url = (value: (name: string) => string) =>
          op.path.replace(/\{(\w+)\}/g, (_m, name: string) => value(name));
        const validUrl = url((name) => (name === 'role' ? 'bad-input-role' : randomUUID()));
        const requests: InjectOptions[] = [];

        for (const value of PATH_VALUES) {
          if (pathParams.length > 0)
            requests.push({ method: op.method as 'GET', url: url(() => value), headers: auth });
        }
        for (const param of op.parameters.filter((p) => p.in === 'query')) {
          const dates = param.schema?.format === 'date-time' ? DATE_TIMES.map(encodeURIComponent) : [];
          for (const value of [...QUERY_VALUES, ...dates]) {
            requests.push({
              method: op.method as 'GET',
              url: `${validUrl}?${param.name}=${value}`,
              headers: auth,
            });
          }
          requests.push({
            method: op.method as 'GET',
            url: `${validUrl}?${param.name}=1&${param.name}=2`,
            headers: auth,
          });
        }
        for (const body of op.bodies) {
          const form = body.contentType === 'application/x-www-form-urlencoded';
          for (const payload of mutations(body.schema)) {
            requests.push({
              method: op.method as 'POST',
              url: validUrl,
              headers: { ...auth, 'content-type': body.contentType },
              payload: form ? encodeForm(payload) : JSON.stringify(payload),
            });
          }
          for (const payload of RAW_BODIES) {
            requests.push({
              method: op.method as 'POST',
              url: validUrl,
              headers: { ...auth, 'content-type': body.contentType },
              payload,
            });
          }
        }
        // Any method but GET may carry a body, whether the operation takes one or not.
        if (op.method !== 'GET') {
          for (const [contentType, payload] of [
            ['text/plain', '{}'],
            ['application/xml', '{}'],
            ['application/json; charset=utf-16', '{}'],
            ['multipart/form-data; boundary=x', '{}'],
            ['application/json', '{'],
            ['application/json', `"${'x'.repeat(70_000)}"`],
          ] as const) {
            requests.push({
              method: op.method as 'POST',
              url: validUrl,
              headers: { ...auth, 'content-type': contentType },
              payload,
            });
          }
        }
        failures.push(...(await probe(requests, oauth, op.responses)));
      }
      expect(failures).toEqual([]);
    }, 180_000);

    it.runIf(provider === 'local')('answers hostile credentials below 500, in the error format', async () => {
      const junk = [
        '',
        'Bearer',
        'Bearer ',
        'Bearer x.y.z',
        'Bearer \u0000',
        `Bearer ${'a'.repeat(9000)}`,
        'Basic',
        'Basic !!!',
        'Basic Og==',
        `Basic ${Buffer.from('\u0000:\u0000').toString('base64')}`,
        'pak_',
        'pak_x_y',
        'Negotiate abc',
      ];
      const requests: InjectOptions[] = [];
      for (const value of junk) {
        requests.push({ method: 'GET', url: '/v1/auth/me', headers: { authorization: value } });
        requests.push({ method: 'GET', url: '/v1/auth/me', headers: { 'x-api-key': value } });
      }
      const oauthRequests: InjectOptions[] = junk.map((value) => ({
        method: 'POST',
        url: '/oauth/introspect',
        headers: { authorization: value, 'content-type': 'application/x-www-form-urlencoded' },
        payload: 'token=abc',
      }));
      expect([...(await probe(requests, false)), ...(await probe(oauthRequests, true))]).toEqual([]);
    });

    it.runIf(provider === 'local')(
      'refuses a NUL anywhere in a body, query or path with a 400 naming the field, and changes nothing',
      async () => {
        const admin = await createAdmin(app);
        const auth = bearer(admin.accessToken);
        const before = await app.inject({ method: 'GET', url: '/v1/profiles/me', headers: auth });

        const body = await app.inject({
          method: 'PATCH',
          url: '/v1/profiles/me',
          headers: auth,
          payload: { display_name: 'Ada\u0000', bio: 'fine', metadata: { 'k\u0000': 'v' } },
        });
        expect(body.statusCode).toBe(400);
        expect(body.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(body.json()).toMatchObject({ code: 'validation_failed' });
        expect(
          body
            .json()
            .errors.map((e: { field: string }) => e.field)
            .sort(),
        ).toEqual(['body.display_name', 'body.metadata.k\\u0000']);
        const after = await app.inject({ method: 'GET', url: '/v1/profiles/me', headers: auth });
        expect(after.json()).toEqual(before.json());

        const query = await app.inject({
          method: 'GET',
          url: '/v1/audit-events?type=login%00',
          headers: auth,
        });
        expect(query.statusCode).toBe(400);
        expect(query.json().errors).toEqual([
          { field: 'query.type', message: expect.stringContaining('NUL') },
        ]);

        const path = await app.inject({ method: 'GET', url: '/v1/roles/admin%00', headers: auth });
        expect(path.statusCode).toBe(400);
        expect(path.json().errors).toEqual([{ field: 'path.role', message: expect.stringContaining('NUL') }]);

        const form = await app.inject({
          method: 'POST',
          url: '/oauth/introspect',
          headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
          payload: 'token=abc%00def',
        });
        expect(form.statusCode).toBe(400);
        expect(form.json()).toMatchObject({ error: 'invalid_request' });
      },
    );

    it.runIf(provider === 'local')(
      'refuses a raw NUL in a form body as it refuses %00 (the form parser’s no-decoding path)',
      async () => {
        // No `%` and no `+`: src/lib/form.ts splits such a body itself instead of fast-querystring.
        for (const [url, payload] of [
          ['/oauth/introspect', 'token=abc\u0000def'],
          ['/oauth/token', 'grant_type=client_credentials&scope=tokens:introspect\u0000'],
        ] as const) {
          const res = await app.inject({
            method: 'POST',
            url,
            headers: { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' },
            payload,
          });
          expect(res.statusCode, url).toBe(400);
          expect(res.json(), url).toMatchObject({ error: 'invalid_request' });
        }
      },
    );

    it.runIf(provider === 'local')(
      'takes an escaped backslash before u0000, or %2500, as the text it is',
      async () => {
        const admin = await createAdmin(app);
        const auth = bearer(admin.accessToken);
        const text = await app.inject({
          method: 'PATCH',
          url: '/v1/profiles/me',
          headers: { ...auth, 'content-type': 'application/json' },
          payload: '{"bio":"C: \\\\u0000 is not a NUL"}',
        });
        expect(text.statusCode, text.body).toBe(200);
        expect(text.json().bio).toBe('C: \\u0000 is not a NUL');
        const query = await app.inject({
          method: 'GET',
          url: '/v1/audit-events?actor_id=%2500',
          headers: auth,
        });
        expect(query.statusCode, query.body).toBe(200);
      },
    );

    it.runIf(provider === 'local')(
      'answers URLs the router refuses in problem+json, with the API headers',
      async () => {
        const admin = await createAdmin(app);
        for (const url of ['/v1/users/%E0%A4%A', `/v1/users/${'x'.repeat(3000)}`]) {
          const res = await app.inject({ method: 'GET', url, headers: bearer(admin.accessToken) });
          expect(res.statusCode).toBeGreaterThanOrEqual(400);
          expect(res.statusCode).toBeLessThan(500);
          expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
          expect(res.headers['x-content-type-options']).toBe('nosniff');
          expect(res.headers['x-request-id']).toBe(res.json().request_id);
        }
      },
    );

    it.runIf(provider === 'local')(
      'decodes a path once: %25 is a % in the value, never the start of another escape; a broken escape is a 400',
      async () => {
        const admin = await createAdmin(app);
        const auth = bearer(admin.accessToken);
        const get = (url: string) => app.inject({ method: 'GET', url, headers: auth });
        expect((await get('/v1/roles/%61dmin')).json()).toMatchObject({ name: 'admin' });
        // The admin's id with its first character written as %25 and its code: `%3X…` once decoded.
        const id = `%25${admin.id.charCodeAt(0).toString(16)}${admin.id.slice(1)}`;
        for (const [method, url, field] of [
          ['GET', '/v1/roles/%2561dmin', 'path.role'],
          ['GET', `/v1/users/${id}`, 'path.id'],
          ['PUT', `/v1/users/${admin.id}/roles/%2561dmin`, 'path.role'],
          ['DELETE', `/v1/users/${admin.id}/roles/%2561dmin`, 'path.role'],
        ] as const) {
          const res = await app.inject({ method, url, headers: auth });
          expect(res.statusCode, `${method} ${url}: ${res.body}`).toBe(400);
          expect(res.json().errors.map((e: { field: string }) => e.field)).toEqual([field]);
        }
        // Swagger UI's files (@fastify/static re-encodes what it decodes before sending).
        expect((await get('/docs/static/%73wagger-ui.css')).statusCode).toBe(200);
        expect((await get('/docs/static/%2573wagger-ui.css')).statusCode).toBe(404);
        for (const url of ['/v1/roles/%E0%A4%A', '/v1/roles/a%2', '/v1/roles/%C0%80', '/v1/users/%zz']) {
          const res = await get(url);
          expect(res.statusCode, url).toBe(400);
          expect(res.headers['content-type'], url).toMatch(/^application\/problem\+json/);
          expect(res.json(), url).toMatchObject({ code: 'bad_request' });
        }
      },
    );

    it.runIf(provider === 'local')(
      'refuses instants outside years 0001–9999 UTC, and cursors it did not issue, naming the field',
      async () => {
        const admin = await createAdmin(app);
        const auth = bearer(admin.accessToken);
        const fieldsOf = (res: { json(): { errors?: { field: string }[] } }) =>
          (res.json().errors ?? []).map((e) => e.field);

        const since = await app.inject({
          method: 'GET',
          url: `/v1/audit-events?since=${encodeURIComponent('9999-12-31T23:59:59-23:59')}`,
          headers: auth,
        });
        expect(since.statusCode).toBe(400);
        expect(since.json().code).toBe('validation_failed');
        expect(fieldsOf(since)).toEqual(['query.since']);

        for (const expires_at of ['0000-06-01T00:00:00Z', '9999-12-31T23:59:59-23:59']) {
          const key = await app.inject({
            method: 'POST',
            url: '/v1/api-keys',
            headers: auth,
            payload: { name: 'edge', scopes: [], expires_at },
          });
          expect(key.statusCode, expires_at).toBe(400);
          expect(fieldsOf(key)).toEqual(['body.expires_at']);
        }
        const edge = await app.inject({
          method: 'POST',
          url: '/v1/api-keys',
          headers: auth,
          payload: { name: 'edge', scopes: [], expires_at: '9999-12-31T23:59:59+01:00' },
        });
        expect(edge.statusCode, edge.body).toBe(201);
        expect(edge.json().expires_at).toBe('9999-12-31T22:59:59.000Z');

        const cursor = Buffer.from(JSON.stringify(['2026-01-01T00:00:00Z', 'not-a-uuid'])).toString(
          'base64url',
        );
        const page = await app.inject({ method: 'GET', url: `/v1/users?cursor=${cursor}`, headers: auth });
        expect(page.statusCode).toBe(400);
        expect(page.json().code).toBe('validation_failed');
        expect(fieldsOf(page)).toEqual(['query.cursor']);
      },
    );
  },
);
