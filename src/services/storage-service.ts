import { createHash } from 'node:crypto';
import { join } from 'node:path';
import type { Readable } from 'node:stream';

import type { Settings } from '../core/config.js';
import { HttpError } from '../core/errors.js';

import type { Outcome } from '../utils/time-limit.js';
import type { ByteRange, OpenedFile, StorageBackend } from './storage/backend.js';
import { buildKey, checkPrefix, splitKey, StorageNotFoundError } from './storage/keys.js';
import { LocalStorageBackend } from './storage/local.js';
import { S3StorageBackend } from './storage/s3.js';

export type { ByteRange, OpenedFile, StorageBackend } from './storage/backend.js';
export {
  MAX_KEY_BYTES,
  MAX_PART_BYTES,
  MAX_PARTS,
  StorageConflictError,
  StorageNotFoundError,
  StoragePathError,
  StorageRangeError,
} from './storage/keys.js';
export { StorageUnavailableError } from './storage/s3.js';

/** A stream grew past the caller's `maxBytes`: the write is abandoned and nothing is stored. */
export class StorageTooLargeError extends HttpError {
  constructor(readonly limit: number) {
    super(413, `File too large: the limit is ${limit} bytes`);
  }
}

export interface StoredFile {
  key: string;
  size: number;
  /** Hex SHA-256 of the bytes stored. */
  sha256: string;
}

export interface SaveOptions {
  /** Abandon the write (StorageTooLargeError) once more than this many bytes arrive. */
  maxBytes?: number;
}

export type FileContent = Readable | AsyncIterable<Uint8Array> | Uint8Array | string;

/**
 * Files under one prefix (`knowledge-base`, …): the guide's `get_storage_service(prefix=…)`.
 * Keys are `<prefix>/<path parts…>/<filename>`, built from checked parts only (see
 * storage/keys.ts), and every key handed back in is checked again, so no client string reaches
 * outside the prefix. Errors are typed HttpErrors (422 path, 404, 409, 413, 416).
 */
export class StorageService {
  constructor(
    readonly backend: StorageBackend,
    readonly prefix: string,
  ) {
    checkPrefix(prefix);
  }

  /** The key a file named `filename` gets under `pathParts`, checked. */
  keyFor(filename: string, pathParts: readonly string[] = []): string {
    return buildKey(this.prefix, [...pathParts, filename]);
  }

  private checked(key: string): string {
    splitKey(this.prefix, key);
    return key;
  }

  /**
   * Stores `content` (streamed: never held whole) as `filename` under `pathParts`, replacing a
   * file already there. The file appears only once complete: a stream that fails, is destroyed or
   * exceeds `maxBytes` leaves nothing. `mimeType` is stored with the object on S3 (its
   * Content-Type); on local disk the caller's record keeps it.
   */
  async saveFile(
    content: FileContent,
    filename: string,
    mimeType?: string,
    pathParts: readonly string[] = [],
    options: SaveOptions = {},
  ): Promise<StoredFile> {
    const key = this.keyFor(filename, pathParts);
    const hash = createHash('sha256');
    let size = 0;
    const limit = options.maxBytes;
    const chunks: AsyncIterable<Uint8Array | string> | Iterable<Uint8Array> =
      typeof content === 'string' || content instanceof Uint8Array ? [Buffer.from(content)] : content;
    async function* counted(): AsyncGenerator<Uint8Array> {
      for await (const chunk of chunks) {
        const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
        size += bytes.length;
        if (limit !== undefined && size > limit) throw new StorageTooLargeError(limit);
        hash.update(bytes);
        yield bytes;
      }
    }
    await this.backend.put(key, counted(), mimeType);
    return { key, size, sha256: hash.digest('hex') };
  }

  /** The whole file; StorageNotFoundError when there is none. Meant for small files: use `stream` otherwise. */
  async readFile(key: string): Promise<Buffer> {
    const opened = await this.stream(key);
    const parts: Buffer[] = [];
    for await (const chunk of opened.body) parts.push(Buffer.from(chunk as Uint8Array));
    return Buffer.concat(parts);
  }

  /** Bytes `start`..`end` (inclusive, as in HTTP Range) or the whole file; 404 / 416 as typed errors. */
  async stream(key: string, range?: ByteRange): Promise<OpenedFile> {
    const opened = await this.backend.open(this.checked(key), range);
    if (!opened) throw new StorageNotFoundError();
    return opened;
  }

  /** Size in bytes, or null when there is no file. */
  async size(key: string): Promise<number | null> {
    return this.backend.size(this.checked(key));
  }

  async exists(key: string): Promise<boolean> {
    return (await this.size(key)) !== null;
  }

  /** False when there was no file (deleting twice is not an error). */
  async deleteFile(key: string): Promise<boolean> {
    return this.backend.remove(this.checked(key));
  }

  /**
   * Discards this prefix's writes begun more than `graceMs` ago and never finished (a process
   * killed mid-write: on S3, a multipart upload's parts); returns how many. `graceMs` must outlast
   * any write still going, which would otherwise fail at its end.
   */
  async abandonStaleWrites(graceMs: number): Promise<number> {
    return this.backend.abandonWritesBefore(`${this.prefix}/`, new Date(Date.now() - graceMs));
  }

  /** Moves a file to `filename` under `pathParts`; returns the new key. 404 when absent, 409 when the target exists. */
  async moveFile(key: string, filename: string, pathParts: readonly string[] = []): Promise<string> {
    const target = this.keyFor(filename, pathParts);
    if (!(await this.backend.move(this.checked(key), target))) throw new StorageNotFoundError();
    return target;
  }
}

/** The backend STORAGE_BACKEND chooses: files under DATA_DIR/storage, or an S3-compatible bucket. */
export function createStorageBackend(settings: Settings): StorageBackend {
  if (settings.STORAGE_BACKEND === 'local') return new LocalStorageBackend(join(settings.dataDir, 'storage'));
  return new S3StorageBackend({
    bucket: settings.S3_BUCKET!, // loadSettings refuses s3 without a bucket
    region: settings.S3_REGION,
    endpoint: settings.S3_ENDPOINT,
    accessKeyId: settings.S3_ACCESS_KEY_ID,
    secretAccessKey: settings.S3_SECRET_ACCESS_KEY,
    forcePathStyle: settings.S3_FORCE_PATH_STYLE,
    timeoutMs: settings.S3_TIMEOUT_SECONDS * 1000,
  });
}

const backends = new WeakMap<Settings, StorageBackend>();

/** The guide's `get_storage_service(prefix=…)`: one backend per settings object, shared by every prefix. */
export function getStorageService(settings: Settings, { prefix }: { prefix: string }): StorageService {
  return new StorageService(sharedBackend(settings), prefix);
}

function sharedBackend(settings: Settings): StorageBackend {
  let backend = backends.get(settings);
  if (!backend) {
    backend = createStorageBackend(settings);
    backends.set(settings, backend);
  }
  return backend;
}

/**
 * How long a readiness answer about the bucket stands: a load balancer may ask `/ready` every
 * second on every node, and each answer would otherwise be a request to S3 (billed, and slower
 * than the database's `select 1`).
 */
export const STORAGE_CHECK_CACHE_MS = 5_000;
const storageChecks = new WeakMap<StorageBackend, { at: number; reachable: Promise<Outcome> }>();

/**
 * Whether the bucket answers (S3Backend.reachable within `timeoutMs`), or why not; null when STORAGE_BACKEND is
 * local (a directory beside the data, not a dependency of its own). The answer is kept for
 * STORAGE_CHECK_CACHE_MS, and callers that ask while a check runs share it.
 */
export function storageReachable(settings: Settings, timeoutMs: number): Promise<Outcome> | null {
  const backend = sharedBackend(settings);
  if (!(backend instanceof S3StorageBackend)) return null;
  const cached = storageChecks.get(backend);
  if (cached && Date.now() - cached.at < STORAGE_CHECK_CACHE_MS) return cached.reachable;
  const reachable = backend.reachable(timeoutMs).then(
    (): Outcome => ({ ok: true }),
    (error: unknown): Outcome => ({ ok: false, error }),
  );
  storageChecks.set(backend, { at: Date.now(), reachable });
  return reachable;
}

/** Releases the backend `getStorageService` made for `settings` (the S3 client's sockets). */
export async function closeStorage(settings: Settings): Promise<void> {
  const backend = backends.get(settings);
  backends.delete(settings);
  await backend?.close();
}
