/**
 * The most verbose logs (LOG_LEVEL=trace) on the paths that log a request's headers themselves:
 * the multipart plugin logs its parser's options, the request's headers among them, at trace. A
 * credential in them (a bearer token, an API key, a cookie) is redacted there too.
 */
import { describe, expect, it } from 'vitest';

import { useTestApp } from '../helpers/app.js';
import { createUser } from '../helpers/factories.js';
import { createKey, xApiKey } from '../helpers/http.js';
import { createFolder, upload } from '../helpers/knowledge.js';
import { captureLogs } from '../helpers/logs.js';

const logs = captureLogs('trace');
const ctx = useTestApp({}, { logger: logs.logger });

describe('credentials in trace logs', () => {
  it('an upload logs none of the headers that carry them', async () => {
    const user = await createUser(ctx.app);
    const folder = await createFolder(ctx.app, user.headers);
    const key = await createKey(ctx.app, user);
    logs.clear();
    const cookie = { cookie: 'session=cookie-secret-value' };
    expect((await upload(ctx.app, { ...user.headers, ...cookie }, folder.id, { filename: 'a.txt', content: 'One.', type: 'text/plain' })).statusCode).toBe(201);
    expect((await upload(ctx.app, xApiKey(key.key), folder.id, { filename: 'b.txt', content: 'Two.', type: 'text/plain' })).statusCode).toBe(201);
    const written = JSON.stringify(logs.lines());
    // The plugin's trace lines are there, with their headers, redacted.
    expect(written).toContain('busboyOptions');
    expect(written).not.toContain(user.headers.authorization!.slice('Bearer '.length));
    expect(written).not.toContain(key.key);
    expect(written).not.toContain('cookie-secret-value');
  });
});
