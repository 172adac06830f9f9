import { generateKeyPairSync, type KeyObject, verify } from 'node:crypto';
import { afterEach, describe, expect, it } from 'vitest';
import { createSigner, type SignatureAlg, type Signer } from '../../src/lib/signer.js';

/** The token signer's thread, its batches, its keys, and its fallback to libuv's pool. */

const es256 = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const ed25519 = generateKeyPairSync('ed25519');

function valid(alg: SignatureAlg, publicKey: KeyObject, input: string, signature: string): boolean {
  const bytes = Buffer.from(signature, 'base64url');
  return alg === 'ES256'
    ? verify('sha256', Buffer.from(input), { key: publicKey, dsaEncoding: 'ieee-p1363' }, bytes)
    : verify(null, Buffer.from(input), publicKey, bytes);
}

let signer: Signer | undefined;
afterEach(async () => {
  await signer?.stop();
  signer = undefined;
});

describe('signer', () => {
  it('signs ES256 as R‖S (64 bytes) and EdDSA, each verifiable with its public key', async () => {
    signer = createSigner();
    const [a, b] = await Promise.all([
      signer.sign('ES256', es256.privateKey, 'header.payload-a'),
      signer.sign('EdDSA', ed25519.privateKey, 'header.payload-b'),
    ]);
    expect(Buffer.from(a, 'base64url')).toHaveLength(64);
    expect(valid('ES256', es256.publicKey, 'header.payload-a', a)).toBe(true);
    expect(valid('ES256', es256.publicKey, 'header.payload-b', a)).toBe(false);
    expect(valid('EdDSA', ed25519.publicKey, 'header.payload-b', b)).toBe(true);
  });

  it('answers each of many concurrent signatures with its own input’s, across keys and turns', async () => {
    signer = createSigner();
    const keys = [es256, generateKeyPairSync('ec', { namedCurve: 'P-256' })];
    const inputs = Array.from({ length: 200 }, (_, i) => `h.p-${i}`);
    const first = await Promise.all(
      inputs.map((input, i) => signer!.sign('ES256', keys[i % 2]!.privateKey, input)),
    );
    // A later turn, a batch of its own, with the keys the thread already holds.
    const later = await Promise.all(
      inputs.slice(0, 20).map((input) => signer!.sign('ES256', keys[1]!.privateKey, input)),
    );
    first.forEach((signature, i) => {
      expect(valid('ES256', keys[i % 2]!.publicKey, inputs[i]!, signature)).toBe(true);
    });
    later.forEach((signature, i) => {
      expect(valid('ES256', keys[1]!.publicKey, inputs[i]!, signature)).toBe(true);
    });
  });

  it('keeps signing with more keys than the thread keeps (rotated keys forgotten and sent again)', async () => {
    signer = createSigner();
    const keys = Array.from({ length: 12 }, () => generateKeyPairSync('ec', { namedCurve: 'P-256' }));
    for (const round of [0, 1]) {
      for (const [i, key] of keys.entries()) {
        const signature = await signer.sign('ES256', key.privateKey, `h.p-${round}-${i}`);
        expect(valid('ES256', key.publicKey, `h.p-${round}-${i}`, signature)).toBe(true);
      }
    }
  });

  it('signs on the pool, and says so, when the thread dies holding a batch; a new thread serves later ones', async () => {
    const failures: unknown[] = [];
    // A thread that exits on its first batch, as a crash would.
    signer = createSigner({
      threadSource: `require('node:worker_threads').parentPort.on('message', () => process.exit(3));`,
      onThreadFailure: (err) => failures.push(err),
    });
    const signatures = await Promise.all(
      ['h.p-1', 'h.p-2'].map((input) => signer!.sign('ES256', es256.privateKey, input)),
    );
    expect(valid('ES256', es256.publicKey, 'h.p-1', signatures[0]!)).toBe(true);
    expect(valid('ES256', es256.publicKey, 'h.p-2', signatures[1]!)).toBe(true);
    expect(failures).toHaveLength(1);
    expect(String(failures[0])).toContain('exited with code 3');
    // The next turn starts another thread (which dies the same way, and is recovered the same way).
    const again = await signer.sign('ES256', es256.privateKey, 'h.p-3');
    expect(valid('ES256', es256.publicKey, 'h.p-3', again)).toBe(true);
    expect(failures).toHaveLength(2);
  });

  it('rejects a signature the key cannot make, without failing the batch it came in', async () => {
    signer = createSigner();
    const [wrong, right] = await Promise.allSettled([
      // An Ed25519 key asked for ES256: OpenSSL refuses the digest.
      signer.sign('ES256', ed25519.privateKey, 'h.p-wrong'),
      signer.sign('ES256', es256.privateKey, 'h.p-right'),
    ]);
    expect(wrong.status).toBe('rejected');
    expect(String((wrong as PromiseRejectedResult).reason)).toMatch(/^Error: signing failed: /);
    expect(right.status).toBe('fulfilled');
    expect(
      valid('ES256', es256.publicKey, 'h.p-right', (right as PromiseFulfilledResult<string>).value),
    ).toBe(true);
  });

  it('after stop, still signs (on the pool) and starts no thread', async () => {
    const failures: unknown[] = [];
    signer = createSigner({ onThreadFailure: (err) => failures.push(err) });
    await signer.sign('EdDSA', ed25519.privateKey, 'h.p-before');
    await signer.stop();
    const after = await signer.sign('EdDSA', ed25519.privateKey, 'h.p-after');
    expect(valid('EdDSA', ed25519.publicKey, 'h.p-after', after)).toBe(true);
    expect(failures).toEqual([]);
  });
});
