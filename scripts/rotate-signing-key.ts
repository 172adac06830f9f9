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
stops verifying.`;

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
    // A fresh database has no keys yet; the service would create them at its first start.
    await services.keys.ensureKeys();
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
