import { randomUUID } from 'node:crypto';
import { constants } from 'node:fs';
import { chmod, link, lstat, mkdir, open, readdir, realpath, rename, rmdir, stat, unlink } from 'node:fs/promises';
import { dirname, join, sep } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

import { PROCESS_TAG, processTag, taggedProcessGone } from '../../core/process-tag.js';

import { type ByteRange, type OpenedFile, resolveRange, type StorageBackend } from './backend.js';
import { StorageConflictError, StoragePathError } from './keys.js';

const TEMP_DIR = '.tmp';
/**
 * A temporary file untouched this long belongs to a write that died with its process: one whose
 * process cannot be told from its name (another kernel or pid namespace, or named before names
 * said whose it is).
 */
const STALE_TEMPORARY_MS = 24 * 60 * 60 * 1000;
/** A temporary file's name: the writing process's tag (processTag) and a UUID. */
const TEMPORARY_NAME = new RegExp(`^(${PROCESS_TAG})\\.[0-9a-f-]{36}$`);
/** Tries of a put's rename into place, when a concurrent remove pruned the directory it made (pruneEmptyParents). */
const PUT_ATTEMPTS = 5;

function code(error: unknown): string | undefined {
  return (error as NodeJS.ErrnoException | undefined)?.code;
}

/**
 * Files under `<DATA_DIR>/storage`, private like the rest of DATA_DIR (directories 0700, files
 * 0600). A write goes to `.tmp/<uuid>` (prefixes cannot be `.tmp`: they start with a letter or
 * digit) and is renamed into place once complete, so a failed or aborted write leaves no file.
 * Every path is resolved with realpath and must stay under the root: a symbolic link planted in
 * the tree (by hand, or by another program) cannot make Keel read or write outside it, and the
 * file itself is opened with O_NOFOLLOW.
 */
export class LocalStorageBackend implements StorageBackend {
  readonly name = 'local';
  private rootReal: Promise<string> | undefined;
  /** Removed by the sweep as the backend opened, not yet counted by abandonWritesBefore. */
  private sweptAtOpen = 0;

  constructor(private readonly root: string) {}

  private async realRoot(): Promise<string> {
    this.rootReal ??= (async () => {
      await mkdir(join(this.root, TEMP_DIR), { recursive: true, mode: 0o700 });
      const info = await stat(this.root);
      if (info.mode & 0o077) await chmod(this.root, info.mode & 0o700);
      this.sweptAtOpen = await this.sweepTemporary();
      return realpath(this.root);
    })();
    try {
      return await this.rootReal;
    } catch (error) {
      this.rootReal = undefined;
      throw error;
    }
  }

  /**
   * Removes temporary files a killed process left (kill -9 at the shutdown deadline, mid-upload):
   * those whose name says their process is gone, at once, and any untouched for
   * STALE_TEMPORARY_MS. Another live process sharing DATA_DIR (scaled mode on one host: with a
   * PostgreSQL server nothing locks DATA_DIR) may be writing its own, which are kept. Returns how
   * many went.
   */
  private async sweepTemporary(): Promise<number> {
    const dir = join(this.root, TEMP_DIR);
    const cutoff = Date.now() - STALE_TEMPORARY_MS;
    let removed = 0;
    for (const name of await readdir(dir)) {
      const path = join(dir, name);
      const info = await lstat(path).catch(() => null);
      if (!info?.isFile()) continue;
      const writer = TEMPORARY_NAME.exec(name)?.[1];
      if (info.mtimeMs >= cutoff && !(writer && taggedProcessGone(writer))) continue;
      if (await unlink(path).then(() => true, () => false)) removed++;
    }
    return removed;
  }

  /** The file's path, after checking that its directory (as far as it exists) resolves inside the root. */
  private async pathOf(key: string): Promise<string> {
    const root = await this.realRoot();
    const path = join(this.root, ...key.split('/'));
    let dir = dirname(path);
    for (;;) {
      try {
        const real = await realpath(dir);
        if (real !== root && !real.startsWith(root + sep)) throw new StoragePathError('the path leaves the storage directory');
        return path;
      } catch (error) {
        // Missing, or a file where a folder would be: check the nearest existing ancestor.
        if (code(error) !== 'ENOENT' && code(error) !== 'ENOTDIR') throw error;
        dir = dirname(dir);
      }
    }
  }

  /**
   * A killed write leaves a temporary file, outside any prefix: those go when the backend opens and
   * at each sweep of the knowledge sweeper, which calls this (sweepTemporary), so that a process of
   * this DATA_DIR that died meanwhile leaves nothing either.
   */
  async abandonWritesBefore(): Promise<number> {
    await this.realRoot();
    const swept = this.sweptAtOpen + (await this.sweepTemporary());
    this.sweptAtOpen = 0;
    return swept;
  }

  private async makeParent(path: string): Promise<void> {
    try {
      await mkdir(dirname(path), { recursive: true, mode: 0o700 });
    } catch (error) {
      if (code(error) === 'EEXIST' || code(error) === 'ENOTDIR') throw new StorageConflictError('A folder of the path is a file');
      throw error;
    }
  }

  async put(key: string, body: AsyncIterable<Uint8Array>): Promise<void> {
    const root = await this.realRoot();
    // Named for this process, so that once it is gone the next sweep knows the file is nobody's.
    const temp = join(root, TEMP_DIR, `${processTag()}.${randomUUID()}`);
    const handle = await open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    try {
      await pipeline(body, handle.createWriteStream());
      for (let attempt = 1; ; attempt++) {
        try {
          const path = await this.pathOf(key);
          await this.makeParent(path);
          // The directories made just now: check again that none of them resolved outside the root.
          await this.pathOf(key);
          await rename(temp, path);
          break;
        } catch (error) {
          // A remove of the last file beside it pruned a directory while it was made, or before the
          // rename (mkdir and rename both say ENOENT): made again.
          if (code(error) === 'ENOENT' && attempt < PUT_ATTEMPTS) continue;
          if (['EISDIR', 'ENOTEMPTY', 'EEXIST'].includes(code(error) ?? '')) throw new StorageConflictError('A folder exists at that path');
          throw error;
        }
      }
    } catch (error) {
      await handle.close().catch(() => undefined);
      await unlink(temp).catch(() => undefined);
      throw error;
    }
  }

  private async fileInfo(path: string): Promise<{ size: number } | null> {
    try {
      const info = await lstat(path);
      return info.isFile() ? info : null;
    } catch (error) {
      if (code(error) === 'ENOENT' || code(error) === 'ENOTDIR') return null;
      throw error;
    }
  }

  async open(key: string, range: ByteRange | undefined): Promise<OpenedFile | null> {
    const path = await this.pathOf(key);
    let handle;
    try {
      handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
    } catch (error) {
      if (['ENOENT', 'ENOTDIR', 'ELOOP', 'EISDIR'].includes(code(error) ?? '')) return null;
      throw error;
    }
    try {
      const info = await handle.stat();
      if (!info.isFile()) {
        await handle.close();
        return null;
      }
      const { start, end } = resolveRange(range, info.size);
      if (end < start) {
        await handle.close();
        return { body: Readable.from([]), size: info.size, start, end };
      }
      return { body: handle.createReadStream({ start, end }), size: info.size, start, end };
    } catch (error) {
      await handle.close().catch(() => undefined);
      throw error;
    }
  }

  async size(key: string): Promise<number | null> {
    return (await this.fileInfo(await this.pathOf(key)))?.size ?? null;
  }

  async remove(key: string): Promise<boolean> {
    const path = await this.pathOf(key);
    if (!(await this.fileInfo(path))) return false;
    try {
      await unlink(path);
    } catch (error) {
      if (code(error) === 'ENOENT') return false;
      throw error;
    }
    await this.pruneEmptyParents(path, key);
    return true;
  }

  /** Removes the directories a key's parts made once they are empty, never the prefix's own directory. */
  private async pruneEmptyParents(path: string, key: string): Promise<void> {
    let dir = dirname(path);
    for (let depth = key.split('/').length - 2; depth > 0; depth--) {
      try {
        await rmdir(dir);
      } catch {
        return; // not empty (or gone): stop
      }
      dir = dirname(dir);
    }
  }

  async move(from: string, to: string): Promise<boolean> {
    const source = await this.pathOf(from);
    if (!(await this.fileInfo(source))) return false;
    const target = await this.pathOf(to);
    await this.makeParent(target);
    await this.pathOf(to);
    try {
      // link fails when the target exists, where rename would replace it.
      await link(source, target);
    } catch (error) {
      if (code(error) === 'EEXIST') throw new StorageConflictError();
      if (code(error) === 'ENOENT') return false;
      throw error;
    }
    await unlink(source);
    await this.pruneEmptyParents(source, from);
    return true;
  }

  async close(): Promise<void> {}
}
