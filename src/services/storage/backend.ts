import type { Readable } from 'node:stream';

import { StorageRangeError } from './keys.js';

/** What a backend stores: whole files under checked keys (see keys.ts); it never sees client strings. */
export interface StorageBackend {
  readonly name: 'local' | 's3';
  /**
   * Stores `body` under `key`; the file appears only once every byte is written (a failed write
   * leaves none). `contentType` goes with the object where the backend keeps one (S3), else nowhere.
   */
  put(key: string, body: AsyncIterable<Uint8Array>, contentType?: string): Promise<void>;
  /** Bytes `start`..`end` (inclusive) of the file, after checking them against its size; null when there is no file. */
  open(key: string, range: ByteRange | undefined): Promise<OpenedFile | null>;
  size(key: string): Promise<number | null>;
  /** False when there was no file. */
  remove(key: string): Promise<boolean>;
  /** False when there was no file at `from`; throws StorageConflictError when `to` holds one. */
  move(from: string, to: string): Promise<boolean>;
  /**
   * Discards writes under `prefix` begun before `initiatedBefore` and never finished (a process
   * killed mid-write); returns how many. Such writes are invisible yet take room: on S3 the parts
   * of a multipart upload are stored, and billed, until the upload is aborted.
   */
  abandonWritesBefore(prefix: string, initiatedBefore: Date): Promise<number>;
  close(): Promise<void>;
}

/** Inclusive byte offsets, as in an HTTP Range header. */
export interface ByteRange {
  start?: number;
  end?: number;
}

export interface OpenedFile {
  body: Readable;
  /** Size of the whole file. */
  size: number;
  start: number;
  /** Inclusive; start - 1 for an empty file. */
  end: number;
}

/** The inclusive offsets `range` asks for in a file of `size` bytes; StorageRangeError when outside it. */
export function resolveRange(range: ByteRange | undefined, size: number): { start: number; end: number } {
  const start = range?.start ?? 0;
  const end = range?.end ?? size - 1;
  const whole = range?.start === undefined && range?.end === undefined;
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    if (whole) return { start: 0, end: -1 }; // an empty file, read whole
    throw new StorageRangeError(size);
  }
  if (start >= size) throw new StorageRangeError(size);
  return { start, end: Math.min(end, size - 1) };
}
