import { defineConfig } from 'drizzle-kit';

// `npm run db:generate` diffs src/db/schema against drizzle/meta and writes a new SQL migration.
// It needs no database; `npm run db:migrate` applies the migrations to DATABASE_URL (or .data/).
export default defineConfig({
  dialect: 'postgresql',
  schema: './src/db/schema/index.ts',
  out: './drizzle',
  casing: 'snake_case',
  strict: true,
  verbose: true,
});
