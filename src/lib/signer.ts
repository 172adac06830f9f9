import { type KeyObject, sign } from 'node:crypto';
import { Worker } from 'node:worker_threads';

/** JWS algorithms the service signs with (RFC 7518 §3.4 ES256, RFC 8037 EdDSA over Ed25519). */
export type SignatureAlg = 'ES256' | 'EdDSA';

export interface Signer {
  /** The JWS signature of `input` (base64url): R‖S for ES256 (`ieee-p1363`), Ed25519's own for EdDSA. */
  sign(alg: SignatureAlg, key: KeyObject, input: string): Promise<string>;
  /** Ends the signing thread; anything still queued is signed on the calling thread. */
  stop(): Promise<void>;
}

interface Job {
  keyId: number;
  alg: SignatureAlg;
  key: KeyObject;
  input: string;
  resolve: (signature: string) => void;
  reject: (err: Error) => void;
}

/** What the thread answers per job: the signature, or why it could not sign. */
type Outcome = string | { error: string };

/**
 * The signing thread. It runs as plain CommonJS (`eval`), so it needs no loader, whether the service
 * runs from TypeScript under tsx, from dist/, or under vitest. It keeps the keys it was sent by id and
 * answers each batch with one message.
 */
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { sign } = require('node:crypto');
const keys = new Map();
parentPort.on('message', (message) => {
  for (const [id, key, alg] of message.keys) {
    keys.set(id, alg === 'ES256' ? ['sha256', { key, dsaEncoding: 'ieee-p1363' }] : [null, key]);
  }
  for (const id of message.forget) keys.delete(id);
  const out = [];
  for (const [id, input] of message.jobs) {
    try {
      const [digest, key] = keys.get(id);
      out.push(sign(digest, Buffer.from(input), key).toString('base64url'));
    } catch (err) {
      out.push({ error: String((err && err.message) || err) });
    }
  }
  parentPort.postMessage(out);
});
`;

/** Signs on the calling thread through libuv's pool: the fallback when the signing thread is gone. */
function signOnPool(alg: SignatureAlg, key: KeyObject, input: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const done = (err: Error | null, signature: Buffer) =>
      err ? reject(err) : resolve(signature.toString('base64url'));
    if (alg === 'ES256') sign('sha256', Buffer.from(input), { key, dsaEncoding: 'ieee-p1363' }, done);
    else sign(null, Buffer.from(input), key, done);
  });
}

/** Keys the thread is told to keep at most; older ones (rotated out long ago) are forgotten. */
const KEPT_KEYS = 8;

export interface SignerOptions {
  /** Told when the signing thread fails and signing falls back to libuv's pool. */
  onThreadFailure?: (err: unknown) => void;
  /** The thread's code (tests only: a thread that fails). */
  threadSource?: string;
}

/**
 * Token signatures on a thread of their own, in batches. A signature is the largest single cost of
 * issuing a token (~25 µs of CPU for ES256). Made on the event loop it delays every other request by
 * that much. Made on libuv's pool (crypto.sign's callback form), it costs a pool thread's wake-up per
 * token, with up to four pool threads contending for two cores, for their caches and for OpenSSL 3's
 * locks: on a 2-core VM, client_credentials issuance cost ~115 µs of CPU per token that way, ~113 µs
 * signing on the event loop, and ~92 µs here (README, "Performance").
 *
 * The tokens asked for in one turn of the event loop go to the thread as one message (at the end of
 * the turn, setImmediate), and the thread answers each with one message, so under load one wake-up
 * each way serves several tokens. The thread starts on the first signature. If it fails or exits,
 * what it held and everything after is signed on the pool instead, and the next turn starts a new one.
 */
export function createSigner(options: SignerOptions = {}): Signer {
  let worker: Worker | undefined;
  let queued: Job[] = [];
  let flushScheduled = false;
  /** Batches sent and not answered yet, oldest first (a port delivers in order). */
  let inFlight: Job[][] = [];
  let stopped = false;
  const keyIds = new WeakMap<KeyObject, number>();
  let nextKeyId = 1;
  /** Keys the current thread holds, least recently used first. */
  let sent: number[] = [];

  function idOf(key: KeyObject): number {
    let id = keyIds.get(key);
    if (id === undefined) {
      id = nextKeyId++;
      keyIds.set(key, id);
    }
    return id;
  }

  function settle(jobs: readonly Job[], outcomes: readonly Outcome[]) {
    jobs.forEach((job, i) => {
      const outcome = outcomes[i];
      if (typeof outcome === 'string') job.resolve(outcome);
      else job.reject(new Error(`signing failed: ${outcome?.error ?? 'no answer from the signing thread'}`));
    });
  }

  /** Signs on the pool what the thread held or would have been sent. */
  function fallBack(jobs: readonly Job[]) {
    for (const job of jobs) signOnPool(job.alg, job.key, job.input).then(job.resolve, job.reject);
  }

  function lose(thread: Worker, err: unknown) {
    if (worker !== thread) return;
    worker = undefined;
    sent = [];
    const held = inFlight.flat();
    inFlight = [];
    fallBack(held);
    if (!stopped) options.onThreadFailure?.(err);
  }

  function start(): Worker {
    const thread = new Worker(options.threadSource ?? WORKER_SOURCE, { eval: true, name: 'jws-signer' });
    thread.unref();
    thread.on('message', (outcomes: Outcome[]) => {
      if (worker === thread) settle(inFlight.shift() ?? [], outcomes);
    });
    thread.on('error', (err) => lose(thread, err));
    thread.on('exit', (code) => lose(thread, new Error(`the signing thread exited with code ${code}`)));
    return thread;
  }

  function flush() {
    flushScheduled = false;
    const jobs = queued;
    queued = [];
    if (jobs.length === 0) return;
    if (stopped) return fallBack(jobs);
    worker ??= start();
    inFlight.push(jobs);
    // The thread keeps the keys of the latest batches: the ones this batch uses go last, so those
    // forgotten were not used since (keys rotated out long ago).
    const keys: [number, KeyObject, SignatureAlg][] = [];
    for (const job of jobs) {
      const at = sent.indexOf(job.keyId);
      if (at === -1) keys.push([job.keyId, job.key, job.alg]);
      else if (at === sent.length - 1) continue;
      else sent.splice(at, 1);
      sent.push(job.keyId);
    }
    const forget = sent.length > KEPT_KEYS ? sent.splice(0, sent.length - KEPT_KEYS) : [];
    worker.postMessage({ keys, forget, jobs: jobs.map((job) => [job.keyId, job.input]) });
  }

  return {
    sign(alg, key, input) {
      if (stopped) return signOnPool(alg, key, input);
      return new Promise((resolve, reject) => {
        queued.push({ keyId: idOf(key), alg, key, input, resolve, reject });
        if (!flushScheduled) {
          flushScheduled = true;
          setImmediate(flush);
        }
      });
    },

    async stop() {
      stopped = true;
      const thread = worker;
      if (thread) {
        lose(thread, undefined);
        await thread.terminate();
      }
    },
  };
}
