import { Readable, Transform } from 'node:stream';

import type * as ClientS3 from '@aws-sdk/client-s3';
import type * as LibStorage from '@aws-sdk/lib-storage';

import { HttpError, ServiceUnavailableError } from '../../core/errors.js';
import { lazyRequire } from '../../core/lazy.js';

import { type ByteRange, type OpenedFile, resolveRange, type StorageBackend } from './backend.js';
import { StorageConflictError } from './keys.js';

// The AWS SDK costs tens of MB and ~100 ms to load: only a process that uses the s3 backend pays.
const clientS3 = lazyRequire<typeof ClientS3>('@aws-sdk/client-s3');
const libStorage = lazyRequire<typeof LibStorage>('@aws-sdk/lib-storage');

export interface S3Options {
  bucket: string;
  region: string;
  endpoint?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  forcePathStyle: boolean;
  /** Size of each part of a multipart upload (S3's minimum is 5 MiB). */
  partSize?: number;
  /** S3_TIMEOUT_SECONDS, in ms. */
  timeoutMs: number;
}

/** The file store cannot be reached or refuses Keel: 503 for the client, the S3 error as the cause for the log. */
export class StorageUnavailableError extends ServiceUnavailableError {
  constructor(cause: unknown) {
    super('File storage is unavailable, try again later');
    this.cause = cause;
  }
}

function unavailable(error: unknown): unknown {
  return error instanceof HttpError ? error : new StorageUnavailableError(error);
}

/** The object `reachable` asks for: no one writes it, so S3's answer says the bucket works. */
const READINESS_PROBE_KEY = '.keel-readiness-probe';

function notFound(error: unknown): boolean {
  const e = error as { name?: string; $metadata?: { httpStatusCode?: number } };
  return e.name === 'NotFound' || e.name === 'NoSuchKey' || e.name === 'NoSuchUpload' || e.$metadata?.httpStatusCode === 404;
}

/**
 * An object's bytes as they stream (the first `length` of them; the rest is not read): a failure
 * meanwhile (the connection cut, or silent past S3_TIMEOUT_SECONDS, a stalled reader's included)
 * ends the stream as the server's failure (503), as one before them is, so that a reader such as
 * ingestion tries again rather than giving the file up as broken and an HTTP response is closed;
 * the stream destroyed (a client gone) closes the object's connection at once.
 */
function guarded(body: Readable, length = Infinity): Readable {
  let left = length;
  const out = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      if (left <= 0) return done();
      const bytes = chunk.length > left ? chunk.subarray(0, left) : chunk;
      left -= bytes.length;
      done(null, bytes);
      if (left <= 0) {
        body.unpipe(out);
        body.destroy();
        out.end();
      }
    },
  });
  body.on('error', (error) => out.destroy(unavailable(error) as Error));
  out.on('close', () => body.destroy());
  return body.pipe(out);
}

/**
 * An S3-compatible bucket. Uploads go through lib-storage's Upload: one PutObject for a body
 * smaller than a part, a multipart upload otherwise (parts sent while the stream is still read, so
 * a large file is never held whole); the object exists only once the upload completes, and a
 * failed body aborts the multipart upload, so a failed write leaves no object.
 *
 * Checksums are sent and checked only where S3 requires them (`WHEN_REQUIRED`): S3-compatible
 * servers (older MinIO, Ceph, test servers) refuse the SDK's default aws-chunked CRC trailers, and
 * the service computes a SHA-256 of every file it stores anyway.
 */
export class S3StorageBackend implements StorageBackend {
  readonly name = 's3';
  private readonly client: ClientS3.S3Client;

  constructor(private readonly options: S3Options) {
    const { S3Client } = clientS3();
    this.client = new S3Client({
      region: options.region,
      endpoint: options.endpoint,
      forcePathStyle: options.forcePathStyle,
      credentials:
        options.accessKeyId && options.secretAccessKey
          ? { accessKeyId: options.accessKeyId, secretAccessKey: options.secretAccessKey }
          : undefined,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      // The SDK waits for ever by default. An idle socket rather than a whole request's time: a
      // part of a large upload on a slow link takes long and is not stuck.
      requestHandler: { connectionTimeout: Math.min(options.timeoutMs, 10_000), socketTimeout: options.timeoutMs },
    });
  }

  async put(key: string, body: AsyncIterable<Uint8Array>, contentType?: string): Promise<void> {
    const { Upload } = libStorage();
    // The body's own failure is the one to report: Upload would answer with its abort's instead when that fails too.
    let bodyError: Error | undefined;
    async function* watched(): AsyncGenerator<Uint8Array> {
      try {
        yield* body;
      } catch (error) {
        bodyError = error instanceof Error ? error : new Error(String(error));
        throw bodyError;
      }
    }
    const upload = new Upload({
      client: this.client,
      params: { Bucket: this.options.bucket, Key: key, Body: Readable.from(watched(), { objectMode: false }), ContentType: contentType },
      partSize: this.options.partSize ?? 8 * 1024 * 1024,
      queueSize: 2,
      leavePartsOnError: false,
    });
    try {
      await upload.done();
    } catch (error) {
      if (!bodyError) throw unavailable(error);
      if (error !== bodyError) bodyError.cause ??= error;
      throw bodyError;
    }
  }

  async size(key: string): Promise<number | null> {
    return this.guard(() => this.headSize(key));
  }

  private async headSize(key: string): Promise<number | null> {
    const { HeadObjectCommand } = clientS3();
    try {
      const head = await this.client.send(new HeadObjectCommand({ Bucket: this.options.bucket, Key: key }));
      return head.ContentLength ?? 0;
    } catch (error) {
      if (notFound(error)) return null;
      throw error;
    }
  }

  async open(key: string, range: ByteRange | undefined): Promise<OpenedFile | null> {
    return this.guard(() => this.openObject(key, range));
  }

  private async openObject(key: string, range: ByteRange | undefined): Promise<OpenedFile | null> {
    const size = await this.size(key);
    if (size === null) return null;
    const { start, end } = resolveRange(range, size);
    if (end < start) return { body: Readable.from([]), size, start, end };
    const { GetObjectCommand } = clientS3();
    try {
      const object = await this.client.send(
        new GetObjectCommand({ Bucket: this.options.bucket, Key: key, Range: `bytes=${start}-${end}` }),
      );
      const body = object.Body as Readable;
      const length = end - start + 1;
      // Some S3-compatible servers answer `bytes=0-0` with the rest of the file: hold them to the range.
      if (object.ContentLength !== undefined && object.ContentLength > length) {
        if (!object.ContentRange?.startsWith(`bytes ${start}-`)) {
          body.destroy();
          throw new Error(`S3 answered range ${object.ContentRange ?? 'none'} for bytes=${start}-${end}`);
        }
        return { body: guarded(body, length), size, start, end };
      }
      return { body: guarded(body), size, start, end };
    } catch (error) {
      if (notFound(error)) return null;
      throw error;
    }
  }

  async remove(key: string): Promise<boolean> {
    return this.guard(() => this.removeObject(key));
  }

  private async removeObject(key: string): Promise<boolean> {
    if ((await this.size(key)) === null) return false;
    const { DeleteObjectCommand } = clientS3();
    await this.client.send(new DeleteObjectCommand({ Bucket: this.options.bucket, Key: key }));
    return true;
  }

  /** Copy then delete (S3 has no rename); a single CopyObject takes objects up to 5 GB. */
  async move(from: string, to: string): Promise<boolean> {
    return this.guard(() => this.moveObject(from, to));
  }

  private async moveObject(from: string, to: string): Promise<boolean> {
    if ((await this.size(from)) === null) return false;
    if ((await this.size(to)) !== null) throw new StorageConflictError();
    const { CopyObjectCommand, DeleteObjectCommand } = clientS3();
    const source = `${this.options.bucket}/${from.split('/').map(encodeURIComponent).join('/')}`;
    try {
      await this.client.send(new CopyObjectCommand({ Bucket: this.options.bucket, Key: to, CopySource: source }));
    } catch (error) {
      if (notFound(error)) return false;
      throw error;
    }
    await this.client.send(new DeleteObjectCommand({ Bucket: this.options.bucket, Key: from }));
    return true;
  }

  /**
   * Aborts the multipart uploads under `prefix` initiated before `initiatedBefore`: an upload whose
   * process was killed (no `leavePartsOnError` abort ran) keeps its parts, stored and billed but
   * listed nowhere else, until aborted. Listed a page (up to 1000) at a time, each page aborted
   * before the next is asked for. An upload that ended meanwhile (completed, or aborted by another
   * process's sweep) is no failure; any other failure is thrown (503) and the next sweep tries again.
   */
  async abandonWritesBefore(prefix: string, initiatedBefore: Date): Promise<number> {
    const { AbortMultipartUploadCommand, ListMultipartUploadsCommand } = clientS3();
    const bucket = this.options.bucket;
    let aborted = 0;
    let keyMarker: string | undefined;
    let uploadIdMarker: string | undefined;
    do {
      const page = await this.guard(() =>
        this.client.send(new ListMultipartUploadsCommand({ Bucket: bucket, Prefix: prefix, KeyMarker: keyMarker, UploadIdMarker: uploadIdMarker })),
      );
      const stale = (page.Uploads ?? []).filter((upload) => upload.Key && upload.UploadId && upload.Initiated && upload.Initiated < initiatedBefore);
      for (const upload of stale) {
        try {
          await this.client.send(new AbortMultipartUploadCommand({ Bucket: bucket, Key: upload.Key, UploadId: upload.UploadId }));
          aborted++;
        } catch (error) {
          if (!notFound(error)) throw unavailable(error);
        }
      }
      // A truncated page names where the next begins; a server that gives no marker, or the one it
      // was asked from (it would list that page for ever), has nothing more to give.
      const nextKey = page.IsTruncated ? page.NextKeyMarker : undefined;
      const nextUploadId = page.IsTruncated ? page.NextUploadIdMarker : undefined;
      if (nextKey === keyMarker && nextUploadId === uploadIdMarker) break;
      keyMarker = nextKey;
      uploadIdMarker = nextUploadId;
    } while (keyMarker);
    return aborted;
  }

  /**
   * Throws unless S3 answers at the bucket within `timeoutMs` (the request is aborted then): the
   * server down or silent, the endpoint not S3, the bucket gone, or our key or secret refused. It
   * asks for an object no one writes: "no such key" is the answer of a bucket that works, and so
   * is AccessDenied, S3's answer for a missing key to credentials without s3:ListBucket (the
   * signature was accepted; a wrong key or secret is InvalidAccessKeyId or SignatureDoesNotMatch).
   * So it checks that S3 is there and takes our credentials, not what they may do: credentials
   * with no rights at all read as working too (uploads then answer 503). HeadBucket would tell
   * more but needs s3:ListBucket, which Keel needs nowhere else: without it every node of a
   * deployment upgraded onto this check would have left its load balancer. For readiness
   * (storage-service.ts caches it).
   */
  async reachable(timeoutMs: number): Promise<void> {
    const { GetObjectCommand } = clientS3();
    try {
      const probe = await this.client.send(new GetObjectCommand({ Bucket: this.options.bucket, Key: READINESS_PROBE_KEY, Range: 'bytes=0-0' }), {
        abortSignal: AbortSignal.timeout(timeoutMs),
      });
      (probe.Body as Readable | undefined)?.destroy();
    } catch (error) {
      // S3's own codes only: a bare 404 is a web server that is not S3 (S3_ENDPOINT wrong).
      const name = (error as { name?: string }).name;
      if (name === 'NoSuchKey' || name === 'AccessDenied') return;
      throw unavailable(error);
    }
  }

  /** S3 errors other than a missing object are the server's (down, refusing our credentials): 503, cause kept for the log. */
  private async guard<T>(operation: () => Promise<T>): Promise<T> {
    try {
      return await operation();
    } catch (error) {
      throw unavailable(error);
    }
  }

  async close(): Promise<void> {
    this.client.destroy();
  }
}
