/**
 * EventStreamSlots on real HTTP responses: a response counted after its client had already gone
 * (it left while the request was being authenticated) is given back at once — its `close` came
 * before the count and will not come again, and the user would be locked out a place for good.
 */
import { createServer, request, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

import { expect, it } from 'vitest';

import { createMetrics } from '../../src/core/metrics.js';

import { EventStreamSlots } from '../../src/services/event-streams.js';

/** A real server response whose client has left (its socket closed) by the time it is handed over. */
async function responseOfAGoneClient(): Promise<{ response: ServerResponse; close: () => Promise<void> }> {
  let handed: (response: ServerResponse) => void = () => undefined;
  const got = new Promise<ServerResponse>((resolve) => (handed = resolve));
  const server = createServer((_req, response) => {
    response.once('close', () => handed(response));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const client = request({ port: (server.address() as AddressInfo).port, host: '127.0.0.1', path: '/' });
  client.on('error', () => undefined);
  client.end();
  // Gone before an answer.
  setTimeout(() => client.destroy(), 50);
  const response = await got;
  return { response, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

it('gives back at once a response whose client left before it was counted', async () => {
  const slots = new EventStreamSlots(1, createMetrics().eventStreams);
  const { response, close } = await responseOfAGoneClient();
  try {
    expect(response.closed).toBe(true);
    slots.hold('user', response);
    expect(slots.heldBy('user')).toBe(0);
    // The user's one place is free.
    slots.hold('user', response);
    expect(slots.heldBy('user')).toBe(0);
  } finally {
    await close();
  }
});
