/**
 * moto's S3 server (`moto_server`, Python; installed on this kind of machine), for what s3rver
 * does not speak: s3rver 3.7.1 answers ListMultipartUploads with NotImplemented and
 * AbortMultipartUpload with 405. moto keeps everything in memory and starts with no bucket.
 * Its known departures from S3: every listed upload says it was initiated 2010-11-10, and a
 * listing is never truncated (max-uploads is ignored).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';

/** Whether `moto_server` can be run here. */
export const motoInstalled = spawnSync('sh', ['-c', 'command -v moto_server'], { stdio: 'ignore' }).status === 0;

export interface Moto {
  endpoint: string;
  stop(): Promise<void>;
}

/** Starts moto on a port of its choosing; resolves once it listens. */
export async function startMoto(timeoutMs = 30_000): Promise<Moto> {
  const child: ChildProcess = spawn('moto_server', ['-H', '127.0.0.1', '-p', '0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<void>((done) => child.once('exit', () => done()));
  const endpoint = await new Promise<string>((resolve, reject) => {
    let said = '';
    const timer = setTimeout(() => reject(new Error(`moto_server did not start in ${timeoutMs} ms: ${said}`)), timeoutMs);
    // Werkzeug says where it listens on stderr.
    const listen = (chunk: Buffer) => {
      said += chunk.toString('utf8');
      const found = /Running on (http:\/\/127\.0\.0\.1:\d+)/.exec(said);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]!);
      }
    };
    child.stdout!.on('data', listen);
    child.stderr!.on('data', listen);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`moto_server exited (${code}): ${said}`));
    });
  });
  return {
    endpoint,
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}
