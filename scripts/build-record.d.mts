/** Types of scripts/build-record.mjs, for the tests that read builds. */
export declare const publishedText: (began: Date, name: string) => string;
export declare function readPublished(dist: string): { began: number; name: string } | null;
export declare function runningMark(pid?: number): string;
export declare function parseRunningMark(name: string): { host: string; pid: number } | null;
export declare function modified(path: string): number;
export declare const UNCHECKABLE_MARK_MS: number;
export declare function markInUse(dir: string, name: string): boolean;
export declare function markRunning(dir: string): void;
