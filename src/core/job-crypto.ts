import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from 'node:crypto';

const VERSION = 'v1';
/** AES-GCM's full tag: `open` refuses a shorter one. */
const TAG_BYTES = 16;

/**
 * Seals job data for Redis with AES-256-GCM under a key derived (HKDF-SHA256) from SECRET_KEY:
 * queued and failed jobs hold no email address or reset link in clear, and a payload cannot be
 * altered or moved to another job name (the name is authenticated with it). Every node that
 * queues or runs jobs shares SECRET_KEY already; jobs sealed under an older key fail for good.
 */
export class JobSealer {
  private readonly key: Buffer;

  /** `purpose` separates keys by use (provider secrets are sealed under another key than jobs). */
  constructor(secretKey: string, purpose = 'keel:job-data') {
    this.key = Buffer.from(hkdfSync('sha256', secretKey, 'keel', purpose, 32));
  }

  seal(name: string, data: unknown): string {
    const iv = randomBytes(12);
    const cipher = createCipheriv('aes-256-gcm', this.key, iv).setAAD(Buffer.from(name));
    const sealed = Buffer.concat([cipher.update(JSON.stringify(data), 'utf8'), cipher.final()]);
    return [VERSION, iv, sealed, cipher.getAuthTag()].map((part) => (typeof part === 'string' ? part : part.toString('base64url'))).join('.');
  }

  /** The data `seal` was given; throws when the payload was altered, is another job's, or was sealed under another key. */
  open(name: string, sealed: string): unknown {
    const [version, iv, data, tag] = sealed.split('.');
    if (version !== VERSION || iv === undefined || data === undefined || tag === undefined) throw new Error('not a sealed job payload');
    const tagBytes = Buffer.from(tag, 'base64url');
    if (tagBytes.length !== TAG_BYTES) throw new Error('not a sealed job payload');
    // The tag's full 16 bytes: without authTagLength, Node checks only as many as the payload carries (4 would do).
    const decipher = createDecipheriv('aes-256-gcm', this.key, Buffer.from(iv, 'base64url'), { authTagLength: TAG_BYTES })
      .setAAD(Buffer.from(name))
      .setAuthTag(tagBytes);
    const plain = Buffer.concat([decipher.update(Buffer.from(data, 'base64url')), decipher.final()]);
    return JSON.parse(plain.toString('utf8')) as unknown;
  }
}
