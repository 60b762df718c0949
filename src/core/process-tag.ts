import { hostname } from 'node:os';

import { processIdentity, recordedProcess } from './process-identity.mjs';

/**
 * This process in a file name, for files it alone may write and that outlive it only if it dies
 * (unwritten-usage.ts's taken files, local storage's temporary files): `<pid>_<boot id>_<pid
 * namespace inode>_<start time>`, or `<pid>` alone where /proc does not tell.
 */
export function processTag(): string {
  const [boot, namespace, start] = processIdentity().split(' ');
  const inode = /^pid:\[(\d+)\]$/.exec(namespace ?? '')?.[1];
  return `${process.pid}${boot && inode && start ? `_${boot}_${inode}_${start}` : ''}`;
}

/** processTag's shape (pid, and boot id, inode and start time when it has them). */
export const PROCESS_TAG = '\\d+(?:_[0-9a-f-]+_\\d+_\\d+)?';

/**
 * Whether the process `tag` (processTag) names is known to be gone, by its identity. Never this
 * process, nor one that cannot be checked from here (a tag without identity; another kernel or pid
 * namespace: a container sharing the directory, or this container before a restart).
 */
export function taggedProcessGone(tag: string): boolean {
  if (tag === processTag()) return false;
  const [pid, boot, inode, start] = tag.split('_');
  // A pid alone (no /proc where it was written) may be another host's or container's live process
  // sharing the directory, whatever kill(pid, 0) says here: never gone by its name.
  if (!boot) return false;
  return recordedProcess(hostname(), Number(pid), `${boot} pid:[${inode}] ${start}`) === 'gone';
}
