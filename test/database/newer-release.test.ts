import { sql } from 'drizzle-orm';
import { describe, expect, it } from 'vitest';
import { readJournal, runMigrations } from '../../src/db/migrations.js';
import { ownDatabase } from '../support/database.js';
import { captureLogs } from '../support/logs.js';

describe('a database migrated by a newer release', () => {
  it('is said at start and by db:migrate: the migrations this release does not know are counted and warned of', async () => {
    const own = await ownDatabase('newer_release');
    try {
      const quiet = captureLogs();
      const first = await runMigrations(own.database, own.url, quiet.logger);
      expect(first.unknown).toBe(0);
      expect(quiet.lines.join('')).not.toContain('newer than this release');

      // What the next release's migrator records after applying its migration.
      const newest = readJournal().at(-1)!.when;
      await own.database.db.execute(
        sql.raw(
          `INSERT INTO drizzle.__drizzle_migrations (hash, created_at) VALUES ('from-a-newer-release', ${newest + 60_000})`,
        ),
      );
      const { lines, logger } = captureLogs();
      const again = await runMigrations(own.database, own.url, logger);
      expect(again).toMatchObject({ applied: [], unknown: 1 });
      const warning = lines.map((l) => JSON.parse(l)).find((l) => l.unknown === 1);
      expect(warning).toMatchObject({ level: 40, unknown: 1 });
      expect(warning.msg).toContain('1 migration newer than this release knows');
    } finally {
      await own.dispose();
    }
  });
});
