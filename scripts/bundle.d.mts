/** Types of scripts/bundle.mjs, for the test that bundles with it. */
export declare const ENTRY_POINTS: Record<string, string>;
export declare const EXTERNAL: string[];
export declare function bundle(root: string, outdir: string, entryPoints?: Record<string, string>): Promise<unknown>;
