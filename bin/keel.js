#!/usr/bin/env node
// Loads the TypeScript entry in this process through tsx, so `npx keel ...` needs no build step
// and signals (SIGTERM for graceful shutdown) reach the server directly.
import { register } from 'tsx/esm/api';

register();
await import('../src/main.ts');
