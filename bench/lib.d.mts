// Types for what the TypeScript benches (bench/kb.ts) import from bench/lib.mjs.
export function keelScript(checkout?: string): { env: Record<string, string>; flags: string[] };
