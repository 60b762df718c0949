/** Types of process-identity.mjs. */
export declare function startTime(pid: number): string | null;
export declare function processIdentity(): string;
export declare function recordedProcess(host: string, pid: number, identity: string): 'alive' | 'gone' | 'unknown';
export declare function pidNamespace(): string;
