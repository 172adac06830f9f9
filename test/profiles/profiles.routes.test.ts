import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { beforeAll, describe, expect, it } from 'vitest';
import { profiles } from '../../src/db/schema/index.js';
import { PROFILE_CHANGES_PER_MINUTE } from '../../src/modules/profiles/profiles.service.js';
import { buildTestApp } from '../support/app.js';
import { createTestClock } from '../support/clock.js';
import { createAdmin, registerUser } from '../support/factories.js';
import { bearer } from '../support/http.js';
import { capCountings } from '../support/redis.js';

describe('profiles', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp();
  });

  /** PATCH /v1/profiles/me with the body as given. */
  const patchMe = (token: string, payload: Record<string, unknown>) =>
    app.inject({ method: 'PATCH', url: '/v1/profiles/me', headers: bearer(token), payload });
  /** GET /v1/profiles/me. */
  const getMe = (token: string) =>
    app.inject({ method: 'GET', url: '/v1/profiles/me', headers: bearer(token) });
  /**
   * That each avatar URL is refused, 400 problem+json with the one error of a host that is not public,
   * leaving the avatar set before as it was. Answers the user it registered, as `username`.
   */
  const expectNotPublicHosts = async (username: string, refused: string[]) => {
    const user = await registerUser(app, username);
    const kept = await patchMe(user.accessToken, { avatar_url: 'https://cdn.example.com/kept.png' });
    expect(kept.statusCode, kept.body).toBe(200);
    for (const sent of refused) {
      const res = await patchMe(user.accessToken, { avatar_url: sent });
      expect(res.statusCode, `${sent}: ${res.body}`).toBe(400);
      expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(res.json().errors, sent).toEqual([
        { field: 'body.avatar_url', message: 'must be a public host name' },
      ]);
    }
    expect((await getMe(user.accessToken)).json().avatar_url).toBe('https://cdn.example.com/kept.png');
    return user;
  };
  /** That an avatar URL is taken, and stored as `stored`. */
  const expectStored = async (token: string, sent: string, stored: string) => {
    const res = await patchMe(token, { avatar_url: sent });
    expect(res.statusCode, `${sent}: ${res.body}`).toBe(200);
    expect(res.json().avatar_url).toBe(stored);
  };

  it('creates a profile at registration and lets the user read and change it', async () => {
    const user = await registerUser(app);
    const mine = await app.inject({
      method: 'GET',
      url: '/v1/profiles/me',
      headers: bearer(user.accessToken),
    });
    expect(mine.statusCode).toBe(200);
    expect(mine.json()).toMatchObject({ user_id: user.id, display_name: null, metadata: {} });
    const patch = await app.inject({
      method: 'PATCH',
      url: '/v1/profiles/me',
      headers: bearer(user.accessToken),
      payload: {
        display_name: 'Grace Hopper',
        avatar_url: 'https://cdn.example.com/a.png',
        bio: 'COBOL',
        locale: 'en-gb',
        timezone: 'Europe/Paris',
        metadata: { theme: 'dark', shortcuts: { save: 'ctrl+s' } },
      },
    });
    expect(patch.statusCode, patch.body).toBe(200);
    expect(patch.json()).toMatchObject({
      display_name: 'Grace Hopper',
      locale: 'en-GB',
      timezone: 'Europe/Paris',
      metadata: { theme: 'dark' },
    });
    const me = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) });
    expect(me.json().profile.display_name).toBe('Grace Hopper');
  });

  it('validates every field and refuses mass assignment of id, roles or status', async () => {
    const user = await registerUser(app);
    const bad: Array<[string, unknown]> = [
      ['avatar_url', 'http://insecure.example.com/a.png'],
      ['avatar_url', 'javascript:alert(1)'],
      ['avatar_url', 'https://user:secret@example.com/a.png'],
      ['avatar_url', `https://example.com/${'a'.repeat(2048)}`],
      // Under 2048 as sent, three times that once percent-encoded (as it would be stored).
      ['avatar_url', `https://x.example.com/${'‹'.repeat(2020)}`],
      ['locale', 'not a locale!'],
      ['timezone', 'Mars/Olympus'],
      ['timezone', '+05:30'],
      ['timezone', '../../etc/passwd'],
      ['display_name', 'x'.repeat(101)],
      ['metadata', 'not an object'],
      ['metadata', { big: 'x'.repeat(5000) }],
      ['metadata', { a: { b: { c: { d: { e: 1 } } } } }],
      ['roles', ['admin']],
      ['status', 'active'],
      ['user_id', '00000000-0000-0000-0000-000000000000'],
      ['id', 'x'],
    ];
    for (const [field, value] of bad) {
      const res = await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { [field]: value },
      });
      expect(res.statusCode, `${field}=${JSON.stringify(value).slice(0, 40)}`).toBe(400);
      expect(res.json().code).toBe('validation_failed');
    }
    const roles = await app.inject({ method: 'GET', url: '/v1/auth/me', headers: bearer(user.accessToken) });
    expect(roles.json().roles).toEqual(['user']);
  });

  it('refuses names that show nothing or other than they hold, and control characters in free text', async () => {
    const user = await registerUser(app);
    const admin = await createAdmin(app);
    const patch = (payload: Record<string, unknown>) =>
      app.inject({ method: 'PATCH', url: '/v1/profiles/me', headers: bearer(user.accessToken), payload });
    const before = (
      await app.inject({ method: 'GET', url: '/v1/profiles/me', headers: bearer(user.accessToken) })
    ).json();
    const refused: Array<[string, string, string]> = [
      ['display_name', '\u200b', 'visible'],
      ['display_name', '\u200b\u2060\ufeff', 'visible'],
      ['display_name', 'a\u0001\u001b[31mred', 'control'],
      ['display_name', 'two\nlines', 'control'],
      ['display_name', 'two\u2028lines', 'line breaks'],
      ['display_name', '\u3164', 'visible'],
      ['display_name', '\u2800\u115f', 'visible'],
      ['display_name', 'abc\u202egnp.exe', 'bidirectional'],
      ['display_name', '\u2067Ada\u2069', 'bidirectional'],
      ['bio', 'a\u0007bell', 'control'],
      ['bio', 'x\u0085y', 'control'],
      ['bio', 'abc\u202egnp.exe', 'bidirectional'],
    ];
    for (const [field, value, word] of refused) {
      const res = await patch({ [field]: value });
      expect(res.statusCode, `${field}=${JSON.stringify(value)}`).toBe(400);
      expect(res.json().errors).toEqual([{ field: `body.${field}`, message: expect.stringContaining(word) }]);
    }
    expect(
      (await app.inject({ method: 'GET', url: '/v1/profiles/me', headers: bearer(user.accessToken) })).json(),
    ).toEqual(before);
    // What people do write still goes through: joined emoji, scripts written right to left, lines.
    const fine = await patch({ display_name: 'عائشة 👩\u200d💻', bio: 'line one\r\nline two\tend' });
    expect(fine.statusCode, fine.body).toBe(200);
    expect(fine.json()).toMatchObject({ display_name: 'عائشة 👩\u200d💻', bio: 'line one\r\nline two\tend' });

    // The same for the other labels and descriptions an administrator reads.
    const role = await app.inject({
      method: 'POST',
      url: '/v1/roles',
      headers: bearer(admin.accessToken),
      payload: { name: 'spoofed', description: 'reads \u202eetirw', permissions: ['users:read'] },
    });
    expect(role.statusCode).toBe(400);
    expect(role.json().errors).toEqual([
      { field: 'body.description', message: expect.stringContaining('bidirectional') },
    ]);
    const client = await app.inject({
      method: 'POST',
      url: '/v1/clients',
      headers: bearer(admin.accessToken),
      payload: { name: '\u200b', description: 'ok', scopes: [] },
    });
    expect(client.statusCode).toBe(400);
    expect(client.json().errors).toEqual([
      { field: 'body.name', message: expect.stringContaining('visible') },
    ]);
    const key = await app.inject({
      method: 'POST',
      url: '/v1/api-keys',
      headers: bearer(admin.accessToken),
      payload: { name: 'ci\u0000' },
    });
    expect(key.statusCode).toBe(400);
    expect(key.json().errors[0].field).toBe('body.name');
  });

  it('takes every IANA time zone name, links included, as browsers report them', async () => {
    const user = await registerUser(app, 'tz');
    // Names ICU resolves but Node 20's list spells otherwise (Asia/Calcutta, Europe/Kiev), links, Etc.
    const cases: Array<[string, string]> = [
      ['Asia/Kolkata', 'Asia/Kolkata'],
      ['Europe/Kyiv', 'Europe/Kyiv'],
      ['America/Argentina/Buenos_Aires', 'America/Argentina/Buenos_Aires'],
      ['Etc/GMT+5', 'Etc/GMT+5'],
      ['US/Pacific', 'US/Pacific'],
      ['GMT', 'GMT'],
      ['europe/paris', 'Europe/Paris'],
    ];
    for (const [sent, stored] of cases) {
      const res = await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { timezone: sent },
      });
      expect(res.statusCode, `${sent}: ${res.body}`).toBe(200);
      expect(res.json().timezone).toBe(stored);
    }
  });

  it('stores a locale in its canonical form, which is accepted back as it reads', async () => {
    const user = await registerUser(app, 'locale');
    const patch = (locale: string) =>
      app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { locale },
      });
    const stored = await patch('EN-us-u-ca-islamicc');
    expect(stored.statusCode, stored.body).toBe(200);
    expect(stored.json().locale).toBe('en-US-u-ca-islamic-civil');
    expect((await patch(stored.json().locale)).statusCode).toBe(200);
    // 34 characters as sent, 39 as canonical: refused, rather than stored as what would be refused.
    const longer = await patch('en-US-u-ca-islamicc-co-phonebk-x-a');
    expect(longer.statusCode).toBe(400);
    expect(longer.json().errors).toEqual([
      { field: 'body.locale', message: 'is over 35 characters in its canonical form' },
    ]);
    const read = await app.inject({
      method: 'GET',
      url: '/v1/profiles/me',
      headers: bearer(user.accessToken),
    });
    expect(read.json().locale).toBe('en-US-u-ca-islamic-civil');
  });

  it('stores an avatar URL as the URL parser writes it out', async () => {
    const user = await registerUser(app, 'avatar');
    for (const [sent, stored] of [
      ['https:example.com', 'https://example.com/'],
      ['HTTPS://Example.COM/a b"><x>', 'https://example.com/a%20b%22%3E%3Cx%3E'],
    ]) {
      const res = await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { avatar_url: sent },
      });
      expect(res.statusCode, res.body).toBe(200);
      expect(res.json().avatar_url).toBe(stored);
    }
  });

  it('refuses an avatar URL whose host is an address, localhost or a name without a dot, in any spelling', async () => {
    const user = await expectNotPublicHosts('avatar-host', [
      'https://localhost/a.png',
      'https://LOCALHOST/a.png',
      'https://localhost./a.png',
      'https://localhost../a.png',
      'https://localhost%2e/a.png',
      'https://ｌｏｃａｌｈｏｓｔ/a.png',
      'https://api.localhost/a.png',
      'https://Foo.Bar.LocalHost./a.png',
      'https://localhost:8443/a.png',
      'https://127.0.0.1/a.png',
      'https://127.0.0.1./a.png',
      'https://127.1/a.png',
      'https://2130706433/a.png',
      'https://0x7f.1/a.png',
      'https://0x7F000001/a.png',
      'https://017700000001/a.png',
      'https://%31%32%37.0.0.1/a.png',
      'https://１２７.０.０.１/a.png',
      'https://0/a.png',
      'https://10.0.0.5/a.png',
      'https://192.168.1.1/a.png',
      'https://169.254.169.254/latest/meta-data/',
      'https://8.8.8.8/a.png',
      'https://[::1]/a.png',
      'https://[0:0:0:0:0:0:0:1]/a.png',
      'https://[::ffff:127.0.0.1]/a.png',
      'https://[fe80::1]/a.png',
      'https://[2001:db8::1]/a.png',
      'https://intranet/a.png',
      'https://INTRANET./a.png',
      'https://.example/a.png',
      'https://a..b/a.png',
    ]);
    // Public names still pass, a trailing dot, a port, a name with digits and a punycode one included.
    for (const [sent, stored] of [
      ['https://cdn.example.com/a.png', 'https://cdn.example.com/a.png'],
      ['https://EXAMPLE.com./a.png', 'https://example.com./a.png'],
      ['https://img.example.org:8443/a.png', 'https://img.example.org:8443/a.png'],
      ['https://127.0.0.1.example.com/a.png', 'https://127.0.0.1.example.com/a.png'],
      ['https://bücher.example.com/a.png', 'https://xn--bcher-kva.example.com/a.png'],
      ['https://localhost.example.com/a.png', 'https://localhost.example.com/a.png'],
    ] as const)
      await expectStored(user.accessToken, sent, stored);
  });

  it('refuses an avatar URL under a special-use or private domain, or a wildcard-DNS name of an address', async () => {
    const user = await expectNotPublicHosts('avatar-domain', [
      // Special-use and private-use domains in any case or width, with trailing dots, and the domain itself.
      'https://printer.local/a.png',
      'https://PRINTER.Local./a.png',
      'https://ｐｒｉｎｔｅｒ。ｌｏｃａｌ/a.png',
      'https://printer.local%2e/a.png',
      'https://a.b.local../a.png',
      'https://metadata.google.internal/computeMetadata/v1/',
      'https://vault.INTERNAL./a.png',
      'https://router.home.arpa/a.png',
      'https://home.arpa/a.png',
      'https://cdn.test/a.png',
      'https://cdn.invalid/a.png',
      'https://cdn.example/a.png',
      'https://bücher.example/a.png',
      'https://duckduckgogg42xjoc72x3sjasowoarfbgcmvfimaftt6twagswzczad.onion/a.png',
      // The names networks conventionally give themselves.
      'https://nas.lan/a.png',
      'https://wiki.intranet/a.png',
      'https://files.corp/a.png',
      'https://nas.home./a.png',
      'https://nas.private/a.png',
      'https://wallet.ALT/a.png',
      'https://webmail.mail./a.png',
      // Wildcard-DNS names of an address, in dots or dashes, anywhere in front of the service's domain.
      'https://127.0.0.1.nip.io/a.png',
      'https://app.127.0.0.1.nip.io/a.png',
      'https://APP.10.0.0.1.NIP.IO./a.png',
      'https://10-0-0-1.sslip.io/a.png',
      'https://www-192-168-0-1.sslip.io/a.png',
      'https://127.0.0.1.app.sslip.io/a.png',
      'https://192.168.1.1.xip.io/a.png',
      'https://magic-169-254-169-254.nip.io/latest/meta-data/',
      'https://172-16-0-1.traefik.me/a.png',
      'https://010.000.000.001.nip.io/a.png',
      // An IPv4 address in 8 hex digits, a label or a dash-separated part of one.
      'https://c0a80101.sslip.io/a.png',
      'https://app-c0a80101.nip.io/a.png',
      'https://7F000001-app.NIP.IO./a.png',
      'https://a9fea9fe.cdn.sslip.io/latest/meta-data/',
      // An IPv6 address with dashes for colons, a label or a dash-separated run of one.
      'https://--1.sslip.io/a.png',
      'https://fe80--1.sslip.io/a.png',
      'https://2001-db8--1.sslip.io/a.png',
      'https://APP.FE80--1.SSLIP.IO./a.png',
      'https://www-2001-db8--1.sslip.io/a.png',
      'https://--ffff-a9fe-a9fe.sslip.io/latest/meta-data/',
      // Any address, as the address itself is refused.
      'https://8.8.8.8.nip.io/a.png',
      // localtest.me, lvh.me, vcap.me and localho.st are 127.0.0.1 whatever is in front.
      'https://localtest.me/a.png',
      'https://app.LocalTest.me./a.png',
      'https://lvh.me/a.png',
      'https://api.lvh.me/a.png',
      'https://vcap.me/a.png',
      'https://uaa.vcap.me/a.png',
      'https://localho.st/a.png',
      'https://app.LOCALHO.ST./a.png',
    ]);
    // A domain is matched by whole labels, and an address only under the services listed.
    for (const sent of [
      'https://cdn.local.example.com/a.png',
      'https://test.com/a.png',
      'https://mylocal.com/a.png',
      'https://home.arpa.example.com/a.png',
      'https://mail.example.com/a.png',
      'https://private.alt.example.com/a.png',
      'https://mynip.io/a.png',
      'https://nip.io.example.com/a.png',
      'https://10-0-0-1.example.com/a.png',
      'https://notlocaltest.me/a.png',
      'https://mylvh.me/a.png',
      'https://lvh.me.example.com/a.png',
      'https://c0a80101.example.com/a.png',
      'https://c0a8010.nip.io/a.png',
      'https://app-c0a801011.sslip.io/a.png',
      'https://my-app.sslip.io/a.png',
      'https://cafe-babe.sslip.io/a.png',
      'https://xn--bcher-kva.sslip.io/a.png',
      'https://fe80--1.example.com/a.png',
    ])
      await expectStored(user.accessToken, sent, sent);
  });

  it('keeps serving and changing a profile whose stored avatar URL predates the host rule', async () => {
    const user = await registerUser(app, 'avatar-stored');
    await app.services.db
      .update(profiles)
      .set({ avatarUrl: 'https://127.0.0.1/old.png' })
      .where(eq(profiles.userId, user.id));
    const read = await getMe(user.accessToken);
    expect(read.statusCode, read.body).toBe(200);
    expect(read.json().avatar_url).toBe('https://127.0.0.1/old.png');
    // A change to another field leaves it as it is.
    const changed = await patchMe(user.accessToken, { bio: 'still here' });
    expect(changed.statusCode, changed.body).toBe(200);
    expect(changed.json()).toMatchObject({ bio: 'still here', avatar_url: 'https://127.0.0.1/old.png' });
  });

  it('clears metadata with null, as the other fields', async () => {
    const user = await registerUser(app, 'meta-null');
    const patch = (body: Record<string, unknown>) => patchMe(user.accessToken, body);
    expect((await patch({ metadata: { theme: 'dark' }, bio: 'hello' })).json()).toMatchObject({
      metadata: { theme: 'dark' },
      bio: 'hello',
    });
    const cleared = await patch({ metadata: null, bio: null });
    expect(cleared.statusCode, cleared.body).toBe(200);
    expect(cleared.json()).toMatchObject({ metadata: {}, bio: null });
  });

  it('replaces metadata whole on PATCH (no merge), as the document says', async () => {
    const user = await registerUser(app, 'meta-whole');
    const patch = (body: Record<string, unknown>) => patchMe(user.accessToken, body);
    await patch({ metadata: { theme: 'dark', shortcuts: { save: 'ctrl+s', quit: 'ctrl+q' } } });
    const replaced = await patch({ metadata: { shortcuts: { save: 'cmd+s' }, beta: null } });
    expect(replaced.statusCode, replaced.body).toBe(200);
    expect(replaced.json().metadata).toEqual({ shortcuts: { save: 'cmd+s' }, beta: null });
    // A PATCH without metadata leaves it as it is.
    expect((await patch({ bio: 'hi' })).json().metadata).toEqual({
      shortcuts: { save: 'cmd+s' },
      beta: null,
    });

    const document = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
    const operation = document.paths['/v1/profiles/me'].patch;
    const body = operation.requestBody.content['application/json'].schema;
    expect(operation.description).toMatch(/`metadata`.*replaced whole.*not merged/s);
    expect(body.properties.metadata.description).toMatch(/Replaced whole, not merged/);
  });

  it('says in the document that avatar_url is https, with the refusal as it was', async () => {
    const document = (await app.inject({ method: 'GET', url: '/openapi.json' })).json();
    const avatar =
      document.paths['/v1/profiles/me'].patch.requestBody.content['application/json'].schema.properties
        .avatar_url;
    const text = avatar.anyOf.find((s: { type: string }) => s.type === 'string');
    expect(avatar.description).toMatch(/https URL/);
    expect(avatar.description).toMatch(
      /public host name \(not an IP address.*not `localhost`.*without a dot\)/,
    );
    expect(avatar.description).toMatch(
      /wildcard-DNS name.*`fe80--1\.sslip\.io`.*special-use or private-use name.*`localtest\.me`, `lvh\.me`, `vcap\.me` or `localho\.st`/,
    );
    const pattern = new RegExp(text.pattern);
    const user = await registerUser(app, 'avatar-doc');
    for (const [sent, accepted] of [
      ['https://cdn.example.com/a.png', true],
      ['HTTPS://Example.COM/a', true],
      ['https:example.com', true],
      ['http://cdn.example.com/a.png', false],
      ['ftp://example.com/a.png', false],
      ['javascript:alert(1)', false],
      ['//example.com/a.png', false],
    ] as const) {
      expect(pattern.test(sent), sent).toBe(accepted);
      const res = await app.inject({
        method: 'PATCH',
        url: '/v1/profiles/me',
        headers: bearer(user.accessToken),
        payload: { avatar_url: sent },
      });
      expect(res.statusCode, `${sent}: ${res.body}`).toBe(accepted ? 200 : 400);
      if (accepted) expect(res.json().avatar_url).toMatch(pattern);
      // One error, the URL check's: the pattern is the document's, not a second check.
      else expect(res.json().errors).toEqual([{ field: 'body.avatar_url', message: 'must be an https URL' }]);
    }
  });

  it('reads user ids in any case (RFC 9562 §4)', async () => {
    const user = await registerUser(app, 'upper');
    const res = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${user.id.toUpperCase()}`,
      headers: bearer(user.accessToken),
    });
    expect(res.statusCode, res.body).toBe(200);
    expect(res.json().user_id).toBe(user.id);
    const keys = await app.inject({
      method: 'GET',
      url: `/v1/api-keys?owner_id=${user.id.toUpperCase()}`,
      headers: bearer(user.accessToken),
    });
    expect(keys.statusCode, keys.body).toBe(200);
  });

  it('hides another user’s profile (404) unless the caller holds profiles:read', async () => {
    const alice = await registerUser(app, 'alice');
    const bob = await registerUser(app, 'bob');
    const idor = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${alice.id}`,
      headers: bearer(bob.accessToken),
    });
    expect(idor.statusCode).toBe(404);
    const missing = await app.inject({
      method: 'GET',
      url: '/v1/profiles/00000000-0000-4000-8000-000000000000',
      headers: bearer(bob.accessToken),
    });
    expect(missing.statusCode).toBe(404);
    expect(idor.json().detail).toBe(missing.json().detail);
    const own = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${alice.id}`,
      headers: bearer(alice.accessToken),
    });
    expect(own.statusCode).toBe(200);
    const admin = await createAdmin(app);
    const read = await app.inject({
      method: 'GET',
      url: `/v1/profiles/${alice.id}`,
      headers: bearer(admin.accessToken),
    });
    expect(read.statusCode).toBe(200);
    expect(
      (
        await app.inject({
          method: 'GET',
          url: '/v1/profiles/not-a-uuid',
          headers: bearer(admin.accessToken),
        })
      ).statusCode,
    ).toBe(400);
  });
});

describe.each(await capCountings('profile changes'))(
  'profile changes per user, counted $counts',
  ({ counts, env, skip }) => {
    const clock = createTestClock();
    let app: FastifyInstance;
    beforeAll(async () => {
      if (skip) return;
      app = await buildTestApp({ env: { RATE_LIMIT_ENABLED: 'true', ...env }, deps: { clock } });
    });

    it.skipIf(skip)(
      `takes ${PROFILE_CHANGES_PER_MINUTE} changes a minute per user, then 429 with Retry-After, writing nothing`,
      async () => {
        const [user, other] = [await registerUser(app, 'busy'), await registerUser(app, 'other')];
        const patch = (token: string, payload: Record<string, unknown>) =>
          app.inject({ method: 'PATCH', url: '/v1/profiles/me', headers: bearer(token), payload });
        for (let i = 0; i < PROFILE_CHANGES_PER_MINUTE; i++) {
          const res = await patch(user.accessToken, { display_name: `name ${i}` });
          expect(res.statusCode, `${i}: ${res.body}`).toBe(200);
          // Setting what is already so is no change, and not counted.
          if (i < 5)
            expect((await patch(user.accessToken, { display_name: `name ${i}` })).statusCode).toBe(200);
        }
        const refused = await patch(user.accessToken, { display_name: 'one too many', metadata: { a: 1 } });
        expect(refused.statusCode, refused.body).toBe(429);
        expect(refused.headers['content-type']).toMatch(/^application\/problem\+json/);
        expect(refused.json().code).toBe('rate_limited');
        expect(Number(refused.headers['retry-after'])).toBeGreaterThan(0);
        expect(Number(refused.headers['retry-after'])).toBeLessThanOrEqual(60);
        const mine = await app.inject({
          method: 'GET',
          url: '/v1/profiles/me',
          headers: bearer(user.accessToken),
        });
        expect(mine.json()).toMatchObject({
          display_name: `name ${PROFILE_CHANGES_PER_MINUTE - 1}`,
          metadata: {},
        });
        const events = await app.services.audit.list({
          subjectId: user.id,
          type: 'profile.updated',
          limit: 200,
        });
        expect(events).toHaveLength(PROFILE_CHANGES_PER_MINUTE);
        // Per user: another's changes go through.
        expect((await patch(other.accessToken, { display_name: 'unhurried' })).statusCode).toBe(200);
        // And the next minute, theirs again (Redis ends its window by its own clock, not the test's).
        if (counts !== 'in memory') return;
        clock.advance(61);
        const later = await patch(user.accessToken, { display_name: 'a minute later' });
        expect(later.statusCode, later.body).toBe(200);
      },
    );
  },
);
