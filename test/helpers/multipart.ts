/** Multipart bodies for uploads; free of vitest so that scripts (npm run eval:kb) can use it too. */
import { randomBytes } from 'node:crypto';

export interface FormFile {
  field?: string;
  filename: string;
  content: Buffer | string;
  type?: string;
}

/** A multipart/form-data body: the files and plain fields given, in order. */
export function multipartBody(parts: (FormFile | { field: string; value: string })[]): { body: Buffer; contentType: string } {
  const boundary = `----keel${randomBytes(8).toString('hex')}`;
  const chunks: Buffer[] = [];
  for (const part of parts) {
    if ('value' in part) {
      chunks.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${part.field}"\r\n\r\n${part.value}\r\n`));
      continue;
    }
    // RFC 7578 lets the name go as UTF-8 in the quoted string; busboy reads it so.
    const head = `--${boundary}\r\nContent-Disposition: form-data; name="${part.field ?? 'file'}"; filename="${part.filename.replace(/"/g, '%22')}"\r\nContent-Type: ${part.type ?? 'application/octet-stream'}\r\n\r\n`;
    chunks.push(Buffer.from(head), Buffer.from(part.content), Buffer.from('\r\n'));
  }
  chunks.push(Buffer.from(`--${boundary}--\r\n`));
  return { body: Buffer.concat(chunks), contentType: `multipart/form-data; boundary=${boundary}` };
}
