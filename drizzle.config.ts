import { defineConfig } from 'drizzle-kit';

// Only generation uses this file; `keel migrate` applies the SQL itself (see src/core/migrate.ts).
export default defineConfig({
  dialect: 'postgresql',
  schema: './src/models/index.ts',
  out: './migrations',
  casing: 'snake_case',
});
