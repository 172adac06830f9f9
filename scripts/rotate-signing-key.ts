// Rotates the token signing key: `npm run rotate-signing-key`. The published `next` key starts
// signing; the old one keeps verifying until its last token has expired. Running instances learn of
// it through the NOTIFY sent in the rotation's transaction and reload their keys.
import { parseArgs } from 'node:util';
import type { SigningKeysService } from '../src/modules/signing-keys/signing-keys.service.js';
import { openScriptContext, runScript, UsageError } from './lib/script-context.js';

const USAGE = `usage: npm run rotate-signing-key [-- --force | --revoke-previous]

Makes the published next signing key the active one; the previous key is retiring (still published
and verifying) until every token it signed has expired. Refused (exit code 1, nothing changes) while
the next key has been published for less than 10 minutes, as verifiers may cache the JWKS that long;
--force rotates anyway. --revoke-previous (a key that leaked; implies --force) revokes every key
published so far at once and signs with a new one: they leave the JWKS, and every token they signed
stops verifying. On a database without any signing key (the service never started on it) it exits
with code 1 and changes nothing: the service makes the first keys at its start.

With keys but none active (an operator retired the active key), it does what the service does then:
the published next key becomes active once it has been published for 5 seconds (--force does not
shorten that: running instances must have heard of it), and a new next key is made. Refused (exit
code 1) while the next key is younger (run again after the wait), when there was no next key (one is
made, to be made active 5 seconds later), and when the next key cannot sign (its row altered, or
another KEY_ENCRYPTION_KEY; --revoke-previous then signs with a new key).`;

/** Refused, exit code 1, nothing written. */
class NoSigningKeyError extends Error {
  override name = 'NoSigningKeyError';
  constructor() {
    super(
      'there is no signing key to rotate: the service makes the first keys at its first start, ' +
        'and has not started on this database (is DATABASE_URL, or DATA_DIR, the service’s?); no key ' +
        'was made',
    );
  }
}

/** No key is active, and none could be made active now: exit code 1, with why. */
class NotReplacedError extends Error {
  override name = 'NotReplacedError';
}

/**
 * No active key, keys present: the service's own recovery (keys.replaceMissingActive), whose outcome
 * is told: the active key's kid once one is active (`promoted`: this run made it so).
 */
async function replaceMissingActive(keys: SigningKeysService): Promise<{ kid: string; promoted: boolean }> {
  // Loaded already (by the services): only named here.
  const [{ KeyEncryptionKeyMismatchError }, { REPLACEMENT_PUBLISHED_SECONDS, SigningKeyMismatchError }] =
    await Promise.all([
      import('../src/lib/crypto.js'),
      import('../src/modules/signing-keys/signing-keys.service.js'),
    ]);
  let result: Awaited<ReturnType<typeof keys.replaceMissingActive>>;
  try {
    result = await keys.replaceMissingActive();
  } catch (err) {
    if (err instanceof SigningKeyMismatchError || err instanceof KeyEncryptionKeyMismatchError)
      throw new NotReplacedError(
        `there is no active signing key, and the published next key cannot be made active: ${err.message}`,
      );
    throw err;
  }
  if ('active' in result) return { kid: result.active, promoted: false };
  if ('promoted' in result) return { kid: result.promoted.kid, promoted: true };
  throw new NotReplacedError(
    result.next
      ? `there is no active signing key, and the next key ${result.next} has been published for less ` +
          `than ${REPLACEMENT_PUBLISHED_SECONDS} s (running instances may not know it yet): it can be ` +
          `made active in ${result.waitSeconds} s (the service does it at its next token issuance); ` +
          'nothing was changed'
      : 'there is no active signing key, and no next key was published: a new next key was made and ' +
          `announced; it can be made active in ${result.waitSeconds} s (the service does it at its next ` +
          'token issuance, or run this again then)',
  );
}

async function main() {
  let force = false;
  let revokePrevious = false;
  try {
    const { values } = parseArgs({
      options: {
        help: { type: 'boolean', short: 'h' },
        force: { type: 'boolean' },
        'revoke-previous': { type: 'boolean' },
      },
      strict: true,
      allowPositionals: false,
    });
    if (values.help) {
      process.stdout.write(`${USAGE}\n`);
      return;
    }
    force = values.force === true;
    revokePrevious = values['revoke-previous'] === true;
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const { systemContext } = await import('../src/modules/audit/audit.service.js');
  const { services, close } = await openScriptContext();
  try {
    // Nothing signs on a database without any key (a fresh one): there is nothing to rotate. The
    // service makes the first keys at its first start, under its lock; made here, a rotation forced
    // right after would retire a key that never signed, and an unforced one would be refused after
    // having written keys, though a refusal changes nothing.
    const published = await services.repos.signingKeys.listPublished(new Date());
    if (published.length === 0 && (await services.repos.signingKeys.list({ limit: 1 })).length === 0)
      throw new NoSigningKeyError();
    // Keys, none active (an operator retired it): what the service does itself, not a rotation, which
    // would promote a next key however recently published, or one that cannot sign, with --force.
    // --revoke-previous (the way out of a next key that cannot sign) revokes them all as ever.
    if (!revokePrevious && !published.some((k) => k.state === 'active')) {
      const replaced = await replaceMissingActive(services.keys);
      if (replaced.promoted) {
        process.stdout.write(`active signing key: ${replaced.kid}\n`);
        process.stdout.write(
          'retiring signing key: none (there was no active key: the published next key was made active)\n',
        );
        return;
      }
      // Made active meanwhile (by a running instance): rotated as asked, below.
    }
    const result = await services.keys.rotate(
      { ...systemContext, userAgent: 'scripts/rotate-signing-key' },
      { force, revokePrevious },
    );
    process.stdout.write(`active signing key: ${result.kid}\n`);
    if (result.previous) {
      if (revokePrevious) {
        process.stdout.write(
          `revoked signing key: ${result.previous}, with every other key published before (their tokens no longer verify)\n`,
        );
      } else {
        const retiring = await services.keys.find(result.previous);
        const until = retiring?.publishUntil
          ? `, published until ${retiring.publishUntil.toISOString()}`
          : '';
        process.stdout.write(`retiring signing key: ${result.previous}${until}\n`);
      }
    } else {
      process.stdout.write('retiring signing key: none (there was no active key)\n');
    }
  } finally {
    await close();
  }
}

await runScript(main, USAGE);
