import { readdirSync } from 'node:fs';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { MIGRATIONS_FOLDER } from '../../src/db/client.js';
import { type JournalEntry, readJournal } from '../../src/db/migrations.js';
import {
  type Catalog,
  checkJournal,
  checkLiveDatabase,
  compareWithSnapshot,
  normalizeDefault,
  normalizeType,
  readCatalog,
  readLatestSnapshot,
  snapshotDrift,
} from '../../scripts/lib/schema-check.js';
import { migratedTemplate, ownDatabase, type ScratchDatabase, scratchDatabase } from '../support/database.js';
import { ROOT, runUntilExit } from '../support/spawn-server.js';

/*
 * `npm run db:verify` (scripts/verify-migrations.ts, scripts/lib/schema-check.ts): each kind of drift
 * it exists to catch, made on purpose, is caught and named.
 */

const databaseUrl = inject('databaseUrl');
const entries = readJournal();
const sqlFiles = readdirSync(MIGRATIONS_FOLDER).filter((f) => f.endsWith('.sql'));

describe('the snapshot: drizzle-kit generate, on a copy of drizzle/', () => {
  it('the committed schema needs no new migration', () => {
    expect(snapshotDrift(ROOT, 'src/db/schema/index.ts')).toEqual({ kind: 'none' });
  }, 60_000);

  it('a table with no migration is caught, and the migration it needs named', () => {
    const next = String(entries.length).padStart(4, '0');
    expect(snapshotDrift(ROOT, 'test/scripts/fixtures/drifted-schema.ts')).toEqual({
      kind: 'drift',
      added: [expect.stringMatching(new RegExp(`^${next}_\\w+\\.sql$`))],
    });
    // Nothing was written beside the committed migrations.
    expect(readdirSync(MIGRATIONS_FOLDER).filter((f) => f.endsWith('.sql'))).toEqual(sqlFiles);
  }, 60_000);
});

describe('the journal', () => {
  it('the committed journal is in order', () => {
    expect(checkJournal(entries, sqlFiles)).toEqual([]);
  });

  it('a migration whose when is not later than its predecessor is refused: drizzle would skip it', () => {
    const swapped: JournalEntry[] = entries.map((e) => ({ ...e }));
    // A branch's migration, generated before the one merged ahead of it.
    swapped[5]!.when = swapped[4]!.when - 60_000;
    const problems = checkJournal(swapped, sqlFiles);
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatch(
      /^0005_client_acts_for_creator: its when \(\d+, [\d-]+T[\d:.]+Z\) is not later than 0004_api_key_parent's/,
    );
    expect(problems[0]).toContain('skips a migration older than the last one applied');

    const equal = entries.map((e) => ({ ...e }));
    equal[3]!.when = equal[2]!.when;
    expect(checkJournal(equal, sqlFiles)).toEqual([
      expect.stringMatching(/^0003_sessions_ended_index: its when/),
    ]);
  });

  it('a file missing from the journal, or a journal entry without its file, is named', () => {
    expect(checkJournal(entries, [...sqlFiles, '9999_forgotten.sql'])).toEqual([
      expect.stringMatching(/^not in meta\/_journal\.json: 9999_forgotten/),
    ]);
    expect(checkJournal(entries, sqlFiles.slice(0, -1))).toEqual([
      `journaled but no .sql file: ${entries.at(-1)!.tag}`,
    ]);
  });
});

describe('the migrations from nothing against the code schema (the latest snapshot)', () => {
  let catalog: Catalog;
  beforeAll(async () => {
    const own = await ownDatabase('auth_verify_fresh');
    try {
      catalog = await readCatalog(own.database.db);
    } finally {
      await own.dispose();
    }
  });
  const snapshot = () => readLatestSnapshot(entries);

  it('agree, column types and defaults included', () => {
    expect(compareWithSnapshot(snapshot(), catalog)).toEqual([]);
  });

  it('a type, a default, a nullability or a column the code has and the migrations do not make is found', () => {
    const code = snapshot();
    const users = code.tables['public.users']!;
    users.columns.email!.type = 'varchar(320)';
    users.columns.status!.default = "'pending'";
    code.tables['public.sessions']!.columns.client_id!.notNull = true;
    code.tables['public.audit_events']!.columns.created_at!.type = 'timestamp with time zone';
    code.tables['public.profiles']!.columns.pronouns = {
      name: 'pronouns',
      type: 'text',
      primaryKey: false,
      notNull: false,
    };
    expect(compareWithSnapshot(code, catalog).sort()).toEqual(
      [
        'column users.email: type text after migrating, character varying(320) in the code',
        "column users.status: default 'active' after migrating, default 'pending' in the code",
        'column sessions.client_id: nullable after migrating, NOT NULL in the code',
        'column audit_events.created_at: type timestamp(3) with time zone after migrating, timestamp with time zone in the code',
        'column profiles.pronouns: missing after migrating',
      ].sort(),
    );
  });

  it('an index or a constraint the code declares and the migrations do not make is found', () => {
    const code = snapshot();
    const sessions = code.tables['public.sessions']!;
    sessions.indexes.sessions_client_idx = { name: 'sessions_client_idx', isUnique: false };
    sessions.indexes.sessions_user_idx!.isUnique = true;
    sessions.uniqueConstraints.sessions_ip_unique = { name: 'sessions_ip_unique' };
    expect(compareWithSnapshot(code, catalog).sort()).toEqual(
      [
        'index sessions_client_idx on sessions: missing after migrating',
        'index sessions_user_idx on sessions: unique in the code, after migrating CREATE INDEX sessions_user_idx ON public.sessions USING btree (user_id)',
        'constraint sessions_ip_unique on sessions: missing after migrating',
      ].sort(),
    );
  });

  it('spells types and defaults as the catalog does', () => {
    expect(normalizeType('timestamp (3) with time zone')).toBe('timestamp(3) with time zone');
    expect(normalizeType('timestamp')).toBe('timestamp without time zone');
    expect(normalizeType('timestamptz')).toBe('timestamp with time zone');
    expect(normalizeType('varchar(64)')).toBe('character varying(64)');
    expect(normalizeType('numeric(10, 2)')).toBe('numeric(10,2)');
    expect(normalizeType('text[]')).toBe('text[]');
    expect(normalizeType('int4')).toBe('integer');
    expect(normalizeDefault("'x'::text", 'text')).toBe("'x'");
    expect(normalizeDefault("'{}'::text[]", 'text[]')).toBe("'{}'");
    expect(normalizeDefault("'{}'::jsonb", 'text')).toBe("'{}'::jsonb");
    expect(normalizeDefault(false, 'boolean')).toBe('false');
    expect(normalizeDefault(undefined, 'text')).toBeNull();
  });
});

/**
 * One database migrated by the service (on PostgreSQL), of which each live database below is a copy:
 * the same database, without migrating each from nothing. (What db:verify compares them with, its
 * own scratch database, it still migrates from nothing each time.)
 */
let migrated: ScratchDatabase | undefined;
beforeAll(async () => {
  if (databaseUrl) migrated = await migratedTemplate('auth_verify_migrated');
});
afterAll(async () => {
  await migrated?.drop();
});

/** A copy of the database migrated by the service, on PostgreSQL, to drift; `drop()` removes it. */
const migratedCopy = async (prefix: string) => (await scratchDatabase(prefix, { template: migrated!.name }))!;

/**
 * Runs `drift` on the database at `url`: one statement at a time, outside a transaction (CREATE INDEX
 * CONCURRENTLY needs that); a concurrent build is expected to fail, leaving its index behind.
 */
async function driftDatabase(url: string, drift: string[]) {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    for (const statement of drift)
      await client.query(statement).catch((err: unknown) => {
        if (!statement.includes(' CONCURRENTLY ')) throw err;
      });
  } finally {
    await client.end();
  }
}

/** A scratch database migrated by the service, drifted by `drift`, then checked as a live database. */
async function checkDrifted(drift: string[]) {
  const own = await migratedCopy('auth_verify_live');
  try {
    await driftDatabase(own.url, drift);
    return await checkLiveDatabase(own.url, { entries });
  } finally {
    await own.drop();
  }
}

describe.runIf(databaseUrl)('a live database (DATABASE_URL) against a fresh one on the same server', () => {
  it('a database migrated by the service agrees, with every journaled migration applied', async () => {
    const live = await checkDrifted([`CREATE TABLE public.someone_elses (id integer)`]);
    expect(live).toMatchObject({
      applied: entries.length,
      appliedProblems: [],
      schemaProblems: [],
      comparedWith: 'a scratch database on the same server',
    });
    expect(live.counts.indexes).toBeGreaterThan(20);
    // Another application's table in the same schema is not drift of this one.
    expect(live.notes).toEqual(['tables not made by the migrations, not compared: someone_elses']);
  });

  it.each([
    {
      kind: 'a dropped index',
      drift: ['DROP INDEX api_keys_parent_idx'],
      problem:
        'index api_keys_parent_idx on api_keys: missing (the migrations make: CREATE INDEX api_keys_parent_idx ON public.api_keys USING btree (parent_id))',
    },
    {
      kind: 'an index with another definition',
      drift: [
        'DROP INDEX sessions_user_idx',
        'CREATE INDEX sessions_user_idx ON sessions (user_id, created_at)',
      ],
      problem:
        'index sessions_user_idx: CREATE INDEX sessions_user_idx ON public.sessions USING btree (user_id, created_at), the migrations make: CREATE INDEX sessions_user_idx ON public.sessions USING btree (user_id)',
    },
    {
      kind: 'an index made by hand',
      drift: ['CREATE INDEX users_status_idx ON users (status)'],
      problem:
        'index users_status_idx on users: not made by the migrations (CREATE INDEX users_status_idx ON public.users USING btree (status))',
    },
    {
      kind: 'a dropped column',
      drift: ['ALTER TABLE profiles DROP COLUMN bio'],
      problem: 'column profiles.bio: missing (the migrations make it text)',
    },
    {
      kind: 'an added column',
      drift: ['ALTER TABLE profiles ADD COLUMN pronouns text'],
      problem: 'column profiles.pronouns: not made by the migrations (text)',
    },
    {
      kind: 'a changed nullability',
      drift: ['ALTER TABLE sessions ALTER COLUMN client_id SET NOT NULL'],
      problem: 'column sessions.client_id: NOT NULL, the migrations make it nullable',
    },
    {
      kind: 'a changed default',
      drift: [`ALTER TABLE users ALTER COLUMN status SET DEFAULT 'pending'`],
      problem: "column users.status: default 'pending'::text, the migrations make default 'active'::text",
    },
    {
      kind: 'a dropped default',
      drift: ['ALTER TABLE clients ALTER COLUMN acts_for_creator DROP DEFAULT'],
      problem: 'column clients.acts_for_creator: no default, the migrations make default false',
    },
    {
      kind: 'a changed type',
      drift: ['ALTER TABLE audit_events ALTER COLUMN created_at TYPE timestamptz'],
      problem:
        'column audit_events.created_at: type timestamp with time zone, the migrations make timestamp(3) with time zone',
    },
    {
      kind: 'a dropped constraint',
      drift: ['ALTER TABLE sessions DROP CONSTRAINT sessions_user_id_users_id_fk'],
      problem:
        'constraint sessions_user_id_users_id_fk on sessions: missing (the migrations make: FOREIGN KEY (user_id) REFERENCES public.users(id) ON DELETE CASCADE)',
    },
    {
      kind: 'a constraint never validated',
      drift: [
        'ALTER TABLE profiles DROP CONSTRAINT profiles_user_id_users_id_fk',
        'ALTER TABLE profiles ADD CONSTRAINT profiles_user_id_users_id_fk FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE NOT VALID',
      ],
      problem:
        'constraint profiles_user_id_users_id_fk on profiles: FOREIGN KEY (user_id) REFERENCES public.users(id) ON DELETE CASCADE NOT VALID, the migrations make: FOREIGN KEY (user_id) REFERENCES public.users(id) ON DELETE CASCADE',
    },
  ])('$kind is drift, named', async ({ drift, problem }) => {
    const live = await checkDrifted(drift);
    expect(live.schemaProblems).toEqual([problem]);
    expect(live.appliedProblems).toEqual([]);
  });

  it('an INVALID index left by a failed CREATE INDEX CONCURRENTLY fails, naming the index and the fix', async () => {
    // What MIGRATIONS.md describes: the index built by hand before a deploy, interrupted, here by
    // duplicate rows. It has the right name and definition, and is of no use.
    const live = await checkDrifted([
      'DROP INDEX users_email_key',
      `INSERT INTO users (email, provider) VALUES ('Twin@example.test', 'local'), ('twin@example.test', 'local')`,
      'CREATE UNIQUE INDEX CONCURRENTLY users_email_key ON users (lower(email))',
    ]);
    expect(live.schemaProblems).toHaveLength(1);
    const [problem] = live.schemaProblems;
    expect(problem).toMatch(
      /^index users_email_key on users is INVALID \(left by an interrupted or failed CREATE INDEX CONCURRENTLY\)/,
    );
    expect(problem).toContain('MIGRATIONS.md, "Indexes on big tables"');
    expect(problem).toContain(
      'DROP INDEX CONCURRENTLY public."users_email_key"; then CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS users_email_key ON public.users USING btree (lower(email))',
    );
  });

  it('a journaled migration not applied, or applied from an edited file, is reported', async () => {
    const last = entries.at(-1)!;
    const live = await checkDrifted([
      `DELETE FROM drizzle.__drizzle_migrations WHERE created_at = ${last.when}`,
      `UPDATE drizzle.__drizzle_migrations SET hash = 'edited' WHERE created_at = ${entries[1]!.when}`,
    ]);
    expect(live.applied).toBe(entries.length - 1);
    expect(live.appliedProblems).toEqual([
      '0001_builtin_roles: applied from a different file (its sha256 differs): edited after it was applied?',
      `${last.tag}: not applied (npm run db:migrate)`,
    ]);
  });

  it('a database nothing was applied to is reported as such', async () => {
    const live = await checkDrifted(['DROP SCHEMA drizzle CASCADE']);
    expect(live.appliedProblems).toEqual([
      'no migration has been applied: drizzle.__drizzle_migrations does not exist (npm run db:migrate)',
    ]);
  });
});

function verify(env: Record<string, string>) {
  return runUntilExit({ tsx: 'scripts/verify-migrations.ts', env: { LOG_LEVEL: 'warn', ...env } });
}

describe('npm run db:verify', () => {
  const drifted: Array<() => Promise<void>> = [];
  afterAll(async () => {
    for (const dispose of drifted) await dispose();
  });

  it('without DATABASE_URL (as CI runs it) checks the snapshot, the journal and a fresh migration', async () => {
    const result = await verify({ DATABASE_URL: '' });
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toContain('✓ drizzle/ snapshot matches src/db/schema');
    expect(result.stdout).toContain(
      `✓ ${entries.length} migrations, all journaled, their \`when\` strictly increasing`,
    );
    expect(result.stdout).toMatch(
      /✓ migrations applied to an empty database match the code \(\d+ columns with types/,
    );
    expect(result.stdout).toContain('- DATABASE_URL is not set: no live database checked');
  }, 60_000);

  it.runIf(databaseUrl)(
    'with DATABASE_URL, a drifted database fails it with exit code 1, naming the drift',
    async () => {
      const own = await migratedCopy('auth_verify_cli');
      drifted.push(own.drop);
      await driftDatabase(own.url, ['DROP INDEX api_keys_parent_idx']);
      const url = new URL(own.url);
      url.password = 'not-shown';
      const result = await verify({ DATABASE_URL: url.toString() });
      expect(result.code, result.stdout).toBe(1);
      expect(result.stdout).toContain(`: all ${entries.length} journaled migrations applied`);
      expect(result.stderr).toContain(
        'the schema differs from what the migrations make (a scratch database on the same server)',
      );
      expect(result.stderr).toContain('    index api_keys_parent_idx on api_keys: missing');
      expect(result.stdout + result.stderr).not.toContain('not-shown');
    },
    60_000,
  );
});
