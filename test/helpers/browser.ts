import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import type { FastifyInstance } from 'fastify';
import { type BrowserContext, chromium, type Page } from 'playwright-core';
import { describe, it } from 'vitest';

/** Debian's Chromium (`apt-get install chromium`); `.ci/run` installs it when missing. */
export const CHROMIUM = '/usr/bin/chromium';
export const ARTIFACTS_DIR = resolve(import.meta.dirname, '../../artifacts');

/**
 * `describe` for tests that drive Chromium. Without it they are skipped with a message, so `npm
 * test` passes on a fresh machine, except under CI=true, where a missing browser fails the run
 * (CI must not skip them silently).
 */
export function describeWithChromium(name: string, body: () => void): void {
  if (existsSync(CHROMIUM)) {
    describe(name, body);
  } else if (process.env.CI === 'true') {
    describe(name, () => {
      it('needs Chromium', () => {
        throw new Error(`${CHROMIUM} is missing: install it (apt-get install -y chromium); CI runs the browser tests`);
      });
    });
  } else {
    describe.skip(`${name} (skipped: ${CHROMIUM} not found; apt-get install -y chromium to run it)`, body);
  }
}

export interface Browser {
  context: BrowserContext;
  close(): Promise<void>;
}

/** Headless Chromium with a fresh profile and nothing of its own on the network; `args`: more of its switches. */
export async function launchChromium(args: readonly string[] = []): Promise<Browser> {
  const profile = mkdtempSync(join(tmpdir(), 'keel-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', ...args],
  });
  return {
    context,
    close: async () => {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

export interface PageLog {
  requests: string[];
  consoleErrors: string[];
}

/** Records every request the page makes and every console error or uncaught exception. */
export function watch(page: Page): PageLog {
  const log: PageLog = { requests: [], consoleErrors: [] };
  page.on('request', (request) => log.requests.push(request.url()));
  page.on('console', (message) => {
    if (message.type() === 'error') log.consoleErrors.push(message.text());
  });
  page.on('pageerror', (error) => log.consoleErrors.push(String(error)));
  return log;
}

export async function screenshot(page: Page, name: string): Promise<string> {
  mkdirSync(ARTIFACTS_DIR, { recursive: true });
  const path = join(ARTIFACTS_DIR, name);
  await page.screenshot({ path, fullPage: false });
  return path;
}

/** The app on a real port of 127.0.0.1, for a browser; returns its base URL. */
export async function listen(app: FastifyInstance): Promise<string> {
  await app.listen({ host: '127.0.0.1', port: 0 });
  return `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`;
}

export interface PageServer {
  origin: string;
  close(): Promise<void>;
}

/** A tiny HTTP server on 127.0.0.1 answering every GET with `html`: a page on an origin of its own. */
export async function servePage(html: string): Promise<PageServer> {
  const server: Server = createServer((_request, response) => {
    response.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(html);
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  return {
    origin: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => new Promise<void>((done) => server.close(() => done())),
  };
}
