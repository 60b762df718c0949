/**
 * A process killed during a multipart upload (kill -9: lib-storage's abort never runs) leaves the
 * upload's parts in the bucket, stored and billed, and listed by nothing but ListMultipartUploads.
 * The knowledge sweeper aborts those under the knowledge base's prefix once past the uploads'
 * grace. Against moto (test/helpers/moto.ts): s3rver cannot list multipart uploads.
 */
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';

import {
  AbortMultipartUploadCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  ListMultipartUploadsCommand,
  ListPartsCommand,
  S3Client,
  UploadPartCommand,
} from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ABANDONED_WRITE_GRACE_MS, abandonStaleWrites, knowledgeStorage, uploadGraceMs } from '../../src/services/knowledge/files.js';
import { closeStorage } from '../../src/services/storage-service.js';
import { buildTestApp, openTestDatabase, testSettings } from '../helpers/app.js';
import { eventually } from '../helpers/http.js';
import { captureLogs, LEVEL } from '../helpers/logs.js';
import { type Moto, motoInstalled, startMoto } from '../helpers/moto.js';

const BUCKET = 'keel-abandoned-uploads';
const SWEEP_FAILED = 'unfinished knowledge file writes could not be swept; will try again (not warned again until a sweep works)';
/** The date moto gives every upload it lists. */
const MOTO_INITIATED = Date.parse('2010-11-10T20:48:33.000Z');

let moto: Moto;
let client: S3Client;

const S3_CREDENTIALS = { S3_ACCESS_KEY_ID: 'testing', S3_SECRET_ACCESS_KEY: 'testing', S3_FORCE_PATH_STYLE: 'true' };
const s3Settings = () => ({ ...S3_CREDENTIALS, STORAGE_BACKEND: 's3', S3_BUCKET: BUCKET, S3_ENDPOINT: moto.endpoint });

/** What a killed upload leaves: an upload begun, a part sent, never completed nor aborted. */
async function leaveUpload(key: string): Promise<string> {
  const { UploadId } = await client.send(new CreateMultipartUploadCommand({ Bucket: BUCKET, Key: key }));
  await client.send(new UploadPartCommand({ Bucket: BUCKET, Key: key, UploadId, PartNumber: 1, Body: Buffer.alloc(1024, 'x') }));
  return UploadId!;
}

async function uploadsLeft(): Promise<string[]> {
  const { Uploads = [] } = await client.send(new ListMultipartUploadsCommand({ Bucket: BUCKET }));
  return Uploads.map((upload) => upload.Key!).sort();
}

async function clearUploads(): Promise<void> {
  const { Uploads = [] } = await client.send(new ListMultipartUploadsCommand({ Bucket: BUCKET }));
  for (const { Key, UploadId } of Uploads) await client.send(new AbortMultipartUploadCommand({ Bucket: BUCKET, Key, UploadId }));
}

// Skipped on a machine without moto, but not in CI, where a missing moto would hide these tests for good.
describe.skipIf(!motoInstalled && process.env.CI !== 'true')('unfinished multipart uploads a killed process left (moto)', () => {
  beforeAll(async () => {
    moto = await startMoto();
    client = new S3Client({ region: 'us-east-1', endpoint: moto.endpoint, forcePathStyle: true, credentials: { accessKeyId: 'testing', secretAccessKey: 'testing' } });
    await client.send(new CreateBucketCommand({ Bucket: BUCKET }));
  }, 60_000);
  afterAll(async () => {
    client?.destroy();
    await moto?.stop();
  });

  it('are aborted once older than the grace, under the prefix only; a younger one is spared', async () => {
    const settings = testSettings(s3Settings());
    try {
      await clearUploads();
      const mine = 'knowledge-base/owner/folder/entry';
      const uploadId = await leaveUpload(mine);
      // The prefix is a folder: a key that merely begins with its name is not under it.
      await leaveUpload('knowledge-base-other/entry');
      await leaveUpload('elsewhere/entry');
      const storage = knowledgeStorage(settings);

      // A grace reaching back past moto's date makes them all young.
      expect(await storage.abandonStaleWrites(Date.now() - MOTO_INITIATED + 24 * 3600_000)).toBe(0);
      expect(await uploadsLeft()).toEqual(['elsewhere/entry', 'knowledge-base-other/entry', mine]);

      expect(await storage.abandonStaleWrites(uploadGraceMs(settings))).toBe(1);
      expect(await uploadsLeft()).toEqual(['elsewhere/entry', 'knowledge-base-other/entry']);
      // Its parts are gone with it.
      await expect(client.send(new ListPartsCommand({ Bucket: BUCKET, Key: mine, UploadId: uploadId }))).rejects.toMatchObject({ name: 'NoSuchUpload' });
      expect(await storage.abandonStaleWrites(uploadGraceMs(settings))).toBe(0);
    } finally {
      await closeStorage(settings);
    }
  });

  it("are aborted by the app's knowledge sweeper, which logs how many", async () => {
    await clearUploads();
    await leaveUpload('knowledge-base/owner/folder/killed');
    await leaveUpload('elsewhere/kept');
    const logs = captureLogs('info');
    const opened = await openTestDatabase();
    const app = await buildTestApp(opened.database, s3Settings(), { logger: logs.logger });
    try {
      // The sweeper's first round runs as the app starts.
      await eventually(async () => !(await uploadsLeft()).includes('knowledge-base/owner/folder/killed'));
      expect(await uploadsLeft()).toEqual(['elsewhere/kept']);
      await eventually(async () => logs.lines().some((line) => line.msg === 'unfinished knowledge file writes discarded' && line.count === 1));
      expect(logs.lines().filter((line) => (line.level as number) >= LEVEL.warn)).toEqual([]);
    } finally {
      await app.close();
      await opened.destroy();
    }
  });
});

/** An S3-compatible server that answers every request with `answer` (an XML body, or a status and body), and the requests it had. */
async function fakeS3(answer: (request: IncomingMessage) => string | { status: number; body: string }) {
  const asked: string[] = [];
  const server = createServer((request, response) => {
    asked.push(`${request.method} ${request.url ?? ''}`);
    const reply = answer(request);
    const { status, body } = typeof reply === 'string' ? { status: 200, body: reply } : reply;
    response.writeHead(status, { 'content-type': 'application/xml' });
    response.end(body);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { asked, settings: { ...S3_CREDENTIALS, STORAGE_BACKEND: 's3', S3_BUCKET: 'b', S3_ENDPOINT: endpoint }, close: () => server.close() };
}

const listing = (uploads: string) =>
  `<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult><Bucket>b</Bucket><IsTruncated>false</IsTruncated>${uploads}</ListMultipartUploadsResult>`;

describe('a listing of uploads that does not move on', () => {
  it('is read once, not for ever, when a truncated page names the marker it was asked from', async () => {
    // An S3-compatible server that answers every ListMultipartUploads "truncated, next at k/u".
    const s3 = await fakeS3(
      () =>
        '<?xml version="1.0" encoding="UTF-8"?><ListMultipartUploadsResult><Bucket>b</Bucket><NextKeyMarker>k</NextKeyMarker><NextUploadIdMarker>u</NextUploadIdMarker><IsTruncated>true</IsTruncated></ListMultipartUploadsResult>',
    );
    const settings = testSettings(s3.settings);
    try {
      expect(await knowledgeStorage(settings).abandonStaleWrites(uploadGraceMs(settings))).toBe(0);
      // The first page, then the one it named, which named itself again.
      expect(s3.asked).toHaveLength(2);
    } finally {
      await closeStorage(settings);
      s3.close();
    }
  });
});

describe("the sweeper's grace for unfinished writes", () => {
  it("spares an upload that an API node with a longer HTTP_REQUEST_TIMEOUT_MS may still be sending, whatever the sweeping node's own setting", async () => {
    // Begun 20 minutes ago: past this worker's own grace (1 s + 15 min), within an API node's that gives requests up to an hour.
    const initiated = new Date(Date.now() - 20 * 60_000).toISOString();
    const old = new Date(Date.now() - ABANDONED_WRITE_GRACE_MS - 60_000).toISOString();
    const s3 = await fakeS3((request) =>
      request.method === 'DELETE'
        ? { status: 204, body: '' }
        : listing(
            `<Upload><Key>knowledge-base/o/f/young</Key><UploadId>u1</UploadId><Initiated>${initiated}</Initiated></Upload>` +
              `<Upload><Key>knowledge-base/o/f/killed</Key><UploadId>u2</UploadId><Initiated>${old}</Initiated></Upload>`,
          ),
    );
    const settings = testSettings({ ...s3.settings, HTTP_REQUEST_TIMEOUT_MS: '1000' });
    try {
      expect(await abandonStaleWrites(settings)).toBe(1);
      expect(s3.asked.filter((line) => line.startsWith('DELETE'))).toEqual([expect.stringMatching(/^DELETE \/b\/knowledge-base\/o\/f\/killed\?uploadId=u2/)]);
    } finally {
      await closeStorage(settings);
      s3.close();
    }
  });

  it('warns once while the bucket cannot list uploads, says when it can again, and warns again when it next cannot', async () => {
    let listable = false;
    const s3 = await fakeS3(() =>
      listable ? listing('') : { status: 501, body: '<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>not implemented</Message></Error>' },
    );
    const logs = captureLogs('info');
    const opened = await openTestDatabase();
    const app = await buildTestApp(opened.database, { ...s3.settings, KB_SWEEP_INTERVAL_MS: '1000' }, { logger: logs.logger });
    const warned = () => logs.lines().filter((line) => line.msg === SWEEP_FAILED).length;
    const listed = () => s3.asked.filter((line) => line.includes('uploads')).length;
    try {
      await eventually(async () => listed() >= 3, 10_000);
      expect(warned()).toBe(1);
      listable = true;
      await eventually(async () => logs.lines().some((line) => line.msg === 'unfinished knowledge file writes can be swept again'), 10_000);
      listable = false;
      await eventually(async () => warned() === 2, 10_000);
    } finally {
      await app.close();
      await opened.destroy();
      await closeStorage(testSettings(s3.settings));
      s3.close();
    }
  });
});
