import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    pool: 'forks',
    // Argon2 and PGlite are CPU-heavy; two workers match this machine's two cores.
    maxWorkers: 2,
    // Each worker runs file after file in one process, its modules loaded once: a fresh process
    // per file imported the app again (Fastify, the AI and AWS SDKs, PGlite), ~1.3 s of CPU a
    // file (6 files: 67.4 -> 59.5 s of CPU). What a file opens it closes (useTestApp's afterAll);
    // module state in src/ is kept per instance (WeakMaps keyed by app, database or settings).
    isolate: false,
    testTimeout: 30_000,
    hookTimeout: 60_000,
    reporters: ['default'],
  },
});
