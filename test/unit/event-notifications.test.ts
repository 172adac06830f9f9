import { describe, expect, it } from 'vitest';
import { type AuthEvent, MAX_NOTIFICATION_BYTES, notificationPayloads } from '../../src/lib/events.js';

/** PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (and with it the whole transaction). */
const POSTGRES_LIMIT = 8000;

const revocation = (i: number): AuthEvent => ({
  type: 'revocation',
  kind: 'session',
  value: `0190f5d2-8a1b-7c3d-9e4f-${String(i).padStart(12, '0')}`,
  revokedAt: 1_765_000_000 + i,
  expiresAt: 1_767_592_000 + i,
});

describe('the notifications of a transaction’s events', () => {
  it('are one for a few events', () => {
    const payloads = notificationPayloads('origin-1', [revocation(1), { type: 'roles_changed' }]);
    expect(payloads).toHaveLength(1);
    expect(JSON.parse(payloads[0]!)).toEqual({
      origin: 'origin-1',
      events: [revocation(1), { type: 'roles_changed' }],
    });
  });

  it('split many events under PostgreSQL’s limit, each whole, all of them in order', () => {
    const events = Array.from({ length: 500 }, (_, i) => revocation(i));
    const payloads = notificationPayloads('origin-1', events);
    expect(payloads.length).toBeGreaterThan(5);
    for (const p of payloads) {
      expect(Buffer.byteLength(p)).toBeLessThanOrEqual(MAX_NOTIFICATION_BYTES);
      expect(MAX_NOTIFICATION_BYTES).toBeLessThan(POSTGRES_LIMIT);
      expect(JSON.parse(p).origin).toBe('origin-1');
    }
    expect(payloads.flatMap((p) => JSON.parse(p).events)).toEqual(events);
  });

  it('count bytes, not characters', () => {
    const wide: AuthEvent = { type: 'user_changed', userId: 'é'.repeat(1000) };
    const payloads = notificationPayloads(
      'o',
      Array.from({ length: 10 }, () => wide),
    );
    for (const p of payloads) expect(Buffer.byteLength(p)).toBeLessThanOrEqual(MAX_NOTIFICATION_BYTES);
    expect(payloads.flatMap((p) => JSON.parse(p).events)).toHaveLength(10);
  });

  it('ask every instance to reload, in its place, for an event too big for any notification', () => {
    const huge: AuthEvent = { type: 'user_changed', userId: 'x'.repeat(MAX_NOTIFICATION_BYTES) };
    const payloads = notificationPayloads('o', [revocation(1), huge, revocation(2)]);
    expect(payloads.map((p) => JSON.parse(p))).toEqual([
      { origin: 'o', events: [revocation(1)] },
      { type: 'resync' },
      { origin: 'o', events: [revocation(2)] },
    ]);
  });

  it('are none for no events', () => {
    expect(notificationPayloads('o', [])).toEqual([]);
  });
});
