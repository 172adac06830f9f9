// Rotates the token signing key: `npm run rotate-signing-key`. The published `next` key starts
// signing; the old one keeps verifying until its last token has expired. Running instances learn of
// it through the NOTIFY sent in the rotation's transaction and reload their keys.
import { parseArgs } from 'node:util';
import { systemContext } from '../src/modules/audit/audit.service.js';
import { openScriptContext, runScript, UsageError } from './lib/script-context.js';

const USAGE = `usage: npm run rotate-signing-key [-- --force | --revoke-previous]

Makes the published next signing key the active one; the previous key is retiring (still published
and verifying) until every token it signed has expired. Refused (exit code 1, nothing changes) while
the next key has been published for less than 10 minutes, as verifiers may cache the JWKS that long;
--force rotates anyway. --revoke-previous (a key that leaked; implies --force) revokes every key
published so far at once and signs with a new one: they leave the JWKS, and every token they signed
stops verifying. On a database without an active signing key (the service never started on it) it
exits with code 1 and changes nothing: the service makes the first keys at its start.`;

/** Refused, exit code 1, nothing written. */
class NoActiveKeyError extends Error {
  override name = 'NoActiveKeyError';
  constructor() {
    super(
      'there is no active signing key to rotate: the service makes the first keys at its first start, ' +
        'and has not started on this database (is DATABASE_URL, or DATA_DIR, the service’s?); no key ' +
        'was made',
    );
  }
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
  const { services, close } = await openScriptContext();
  try {
    // Nothing signs on a database without an active key (a fresh one): there is nothing to rotate.
    // The service makes the first keys at its first start, under its lock; made here, a rotation
    // forced right after would retire a key that never signed, and an unforced one would be refused
    // after having written keys, though a refusal changes nothing.
    const published = await services.repos.signingKeys.listPublished(new Date());
    if (!published.some((k) => k.state === 'active')) throw new NoActiveKeyError();
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
