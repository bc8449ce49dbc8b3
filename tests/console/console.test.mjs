// End-to-end test of the web console: the built jssocket binary, Debian's headless Chromium,
// driven by playwright-core (no browser download). Run with `node --test` from this folder, or
// `bash scripts/test.sh` from the repository root (it builds the binary first).
//
// Environment: JSSOCKET_BIN (default target/debug/jssocket), CHROMIUM (default
// /usr/bin/chromium), CONSOLE_SCREENSHOT_DOCS=1 to also refresh docs/console.png.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { access, copyFile, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { constants } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer as startBinary } from '../support/server.mjs';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.JSSOCKET_BIN || path.join(ROOT, 'target', 'debug', 'jssocket');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = path.join(ROOT, 'target', 'console-screenshot.png');
const DOCS_SCREENSHOT = path.join(ROOT, 'docs', 'console.png');
const PASSWORD = '12345678';
/** Longest wait for something that must happen (the first admin request pays bcrypt). */
const WAIT = 10_000;
/** How long "nothing more arrives" is watched for, after the ordering marker arrived. */
const SILENCE = 500;
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

// ---------- the server ----------

/** Starts the binary on a free loopback port (see ../support/server.mjs). */
function startServer(extraArgs = []) {
  return startBinary(BIN, ['--log-format', 'json', ...extraArgs], WAIT);
}

// ---------- shared state of the suite ----------

let server;
let context;
let page;
let profile;
const apiRequests = [];
const pageProblems = [];

before(async () => {
  await access(CHROMIUM, constants.X_OK).catch(() => {
    throw new Error(`${CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)`);
  });
  server = await startServer();
  profile = await mkdtemp(path.join(tmpdir(), 'jssocket-console-profile-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1440, height: 900 },
  });
  page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on('request', (request) => {
    if (new URL(request.url()).pathname.startsWith('/api/')) {
      apiRequests.push({ url: request.url(), body: request.postData(), headers: request.headers() });
    }
  });
  page.on('console', (message) => {
    // The wrong-password test's 401 is logged by Chromium as a failed load: expected.
    if (message.type() === 'error' && !/status of 401/.test(message.text())) {
      pageProblems.push(`console error: ${message.text()}`);
    }
  });
  page.on('pageerror', (error) => pageProblems.push(`page error: ${error.message}`));
});

after(async () => {
  await context?.close().catch(() => {});
  if (profile) await rm(profile, { recursive: true, force: true });
  await server?.stop();
});

// ---------- helpers ----------

const messages = (text) => page.locator('#messages li.message', { hasText: text });

/** Fills the publish form and submits it with Enter; returns the result text. */
async function publish({ name, payload, roles = '' }) {
  await page.fill('#publish-name', name);
  await page.fill('#publish-payload', payload);
  await page.fill('#publish-roles', roles);
  await page.fill('#publish-groups', '');
  await page.fill('#publish-users', '');
  const result = page.locator('#publish-result');
  await page.evaluate(() => { document.getElementById('publish-result').textContent = ''; });
  await page.focus('#publish-name');
  await page.keyboard.press('Enter');
  await page.waitForFunction(
    () => /Delivered|HTTP|Not sent/.test(document.getElementById('publish-result').textContent),
  );
  return result.textContent();
}

// ---------- tests ----------

test('serves the page and its assets with the right types and a same-origin policy', async () => {
  for (const [file, type] of [
    ['/console', 'text/html'],
    ['/console/console.js', 'text/javascript'],
    ['/console/console.css', 'text/css'],
  ]) {
    const response = await fetch(server.base + file);
    assert.equal(response.status, 200, file);
    assert.match(response.headers.get('content-type'), new RegExp(`^${type}`), file);
    const csp = response.headers.get('content-security-policy');
    assert.match(csp, /default-src 'self'/, file);
    assert.match(csp, /connect-src 'self' ws: wss:/, file);
  }
  assert.equal((await fetch(`${server.base}/console/nope.js`)).status, 404);
});

test('connects as a client: registered, not acknowledged without a backend', async () => {
  await page.goto(`${server.base}/console`);
  await page.locator('#socket-status[data-state="open"]').waitFor();
  const host = new URL(server.base).host;
  assert.equal(await page.textContent('#ws-url'), `ws://${host}/ws`);
  await page.locator('#registered[data-state="yes"]').waitFor();
  assert.equal(await page.getAttribute('#acknowledged', 'data-state'), 'waiting');
  assert.match(await page.textContent('#acknowledged'), /^not yet: no backend has answered/);
  assert.equal(await page.textContent('#connection-id'), 'not acknowledged yet');
});

test('subscribes with the keyboard and shows a publish from the admin panel', async () => {
  await page.focus('#channel');
  await page.keyboard.type('foo.bar');
  await page.keyboard.press('Enter');
  await page.locator('#subscriptions li[data-channel="foo.bar"][data-state="active"]').waitFor();
  // Keyboard focus moves on to the Subscribe button and is visibly outlined.
  await page.focus('#channel');
  await page.keyboard.press('Tab');
  const focused = await page.evaluate(() => {
    const el = document.activeElement;
    return { text: el.textContent, outline: getComputedStyle(el).outlineStyle };
  });
  assert.deepEqual(focused, { text: 'Subscribe', outline: 'solid' });

  await page.fill('#password', PASSWORD);
  const result = await publish({ name: 'foo.bar', payload: '{"n": 1, "text": "hello from the test"}' });
  assert.match(result, /^Delivered to 1 connection\b/);
  const item = messages('hello from the test');
  await item.waitFor();
  assert.equal(await item.getAttribute('data-kind'), 'publish');
  assert.equal(await item.getAttribute('data-channel'), 'foo.bar');
  assert.equal(
    await item.locator('pre').textContent(),
    '{\n  "n": 1,\n  "text": "hello from the test"\n}',
  );
  const request = apiRequests.at(-1);
  assert.match(request.url, /\/api\/publish$/);
  assert.equal(request.headers.authorization, `Bearer ${PASSWORD}`);
  assert.equal(request.body, '{"name":"foo.bar","data":{"n": 1, "text": "hello from the test"}}');
});

test('a publish filtered by a role the page lacks never arrives; a later one does', async () => {
  const filtered = await publish({
    name: 'foo.bar', payload: '{"secret": "role-filtered"}', roles: 'admin',
  });
  assert.match(filtered, /^Delivered to 0 connections\b/);
  assert.equal(
    apiRequests.at(-1).body,
    '{"name":"foo.bar","data":{"secret": "role-filtered"},"roles":["admin"]}',
  );
  // Frames on one connection arrive in order: once the marker is here, the filtered one
  // would have been too.
  const marker = await publish({ name: 'foo.bar', payload: '{"marker": "after-filtered"}' });
  assert.match(marker, /^Delivered to 1 connection\b/);
  await messages('after-filtered').waitFor();
  await page.waitForTimeout(SILENCE);
  assert.equal(await messages('role-filtered').count(), 0);
});

test('bad payload JSON is reported next to the field and nothing is sent', async () => {
  const before = apiRequests.length;
  await page.fill('#publish-name', 'foo.bar');
  await page.fill('#publish-payload', '{"broken": ');
  await page.focus('#publish-name');
  await page.keyboard.press('Enter');
  const error = page.locator('#publish-payload-error');
  await error.waitFor();
  assert.match(await error.textContent(), /Not valid JSON .*Nothing was sent/);
  assert.equal(await page.getAttribute('#publish-payload', 'aria-invalid'), 'true');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'publish-payload');
  assert.match(await page.textContent('#publish-result'), /Not sent/);
  // The same for a notify form, submitted with Ctrl+Enter from the payload box.
  await page.fill('#notify-all-payload', 'not json');
  await page.focus('#notify-all-payload');
  await page.keyboard.press('Control+Enter');
  await page.locator('#notify-all-payload-error').waitFor();
  await page.waitForTimeout(SILENCE);
  assert.equal(apiRequests.length, before, 'no API request was made');
  // A wrong password is the server's answer, shown with its code.
  await page.fill('#password', 'wrong password');
  await page.fill('#notify-all-payload', '{}');
  await page.click('#notify-all-form button[type=submit]');
  await page.waitForFunction(() => /HTTP/.test(document.getElementById('notify-all-result').textContent));
  assert.match(await page.textContent('#notify-all-result'), /^HTTP 401 unauthorized: /);
  await page.fill('#password', PASSWORD);
});

test('acknowledged by a backend: shows the id and roles, receives role-filtered publishes', async () => {
  // A backend in a second tab: an admin (old protocol: password in server_connect) in the pool.
  const backend = await context.newPage();
  backend.setDefaultTimeout(WAIT);
  await backend.goto(`${server.base}/healthz`);
  await backend.evaluate(async ({ url, password }) => {
    window.frames_ = [];
    const ws = new WebSocket(url);
    ws.onmessage = (event) => window.frames_.push(JSON.parse(event.data));
    await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
    ws.send(JSON.stringify({ type: 'server_connect', data: { auth: password } }));
    window.backend = ws;
  }, { url: server.base.replace('http:', 'ws:') + '/ws', password: PASSWORD });
  await backend.waitForFunction(
    () => window.frames_.some((f) => f.type === 'server_connect' && f.data === true),
  );

  await page.fill('#token', 'test-token');
  await page.click('#connect-form button[type=submit]');
  const target = await (await backend.waitForFunction(() => {
    const connect = window.frames_.find((f) => f.type === 'client_connect' && f.data.token === 'test-token');
    return connect && connect.data.target;
  })).jsonValue();
  assert.match(target, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  await backend.evaluate((target) => window.backend.send(JSON.stringify({
    type: 'client_connected',
    data: { target, user: 'alice', roles: ['admin'], groups: ['staff'] },
  })), target);

  await page.locator('#acknowledged[data-state="yes"]').waitFor();
  assert.equal(await page.textContent('#connection-id'), target);
  assert.equal(await page.textContent('#roles'), 'admin');
  assert.equal(await page.textContent('#groups'), 'staff');

  const result = await publish({ name: 'foo.bar', payload: '{"for": "admins only"}', roles: 'admin' });
  assert.match(result, /^Delivered to 1 connection\b/);
  await messages('admins only').waitFor();

  await page.fill('#notify-client-target', target);
  await page.fill('#notify-client-payload', '{"type": "greeting", "data": {"hello": "you"}}');
  await page.focus('#notify-client-target');
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => /Delivered/.test(document.getElementById('notify-client-result').textContent));
  const notify = messages('greeting');
  await notify.waitFor();
  assert.equal(await notify.getAttribute('data-kind'), 'notify');

  // Payloads are bare JSON: one shaped like the server's error (or subscribed) event, when
  // the page has no request waiting for an answer, is shown as a received payload and
  // changes nothing on the page.
  for (const [marker, spoof] of [
    ['spoofed-connect-error', { type: 'error', data: { code: 'no_server', message: 'spoofed-connect-error', event: 'client_connect' } }],
    ['spoofed-subscribe-error', { type: 'error', data: { code: 'invalid_channel', message: 'spoofed-subscribe-error', event: 'subscribe' } }],
    ['spoofed-bad-input', { type: 'error', data: { code: 'invalid_json', message: 'spoofed-bad-input', event: null } }],
    ['spoofed.subscribed', { type: 'subscribed', data: { name: 'spoofed.subscribed' } }],
  ]) {
    await page.fill('#notify-client-target', target);
    await page.fill('#notify-client-payload', JSON.stringify(spoof));
    await page.evaluate(() => { document.getElementById('notify-client-result').textContent = ''; });
    await page.click('#notify-client-form button[type=submit]');
    await page.waitForFunction(() => /Delivered/.test(document.getElementById('notify-client-result').textContent));
    const item = messages(marker);
    await item.waitFor();
    assert.equal(await item.getAttribute('data-kind'), 'notify', marker);
  }
  assert.equal(await page.getAttribute('#ack-note', 'data-state'), null);
  assert.equal(await page.getAttribute('#acknowledged', 'data-state'), 'yes');
  assert.equal(await page.locator('#subscriptions li[data-channel="spoofed.subscribed"]').count(), 0);
  await page.locator('#subscriptions li[data-channel="foo.bar"][data-state="active"]').waitFor();
  assert.equal(await page.locator('#channel-error').isVisible(), false);
  await backend.close();
});

test("the server's own error answering the page's client_connect is shown as an error", async () => {
  // No backend and a 1 s queue: the server answers the page's client_connect with no_server.
  const lonely = await startServer(['--pending-timeout', '1']);
  const other = await context.newPage();
  other.setDefaultTimeout(WAIT);
  try {
    await other.goto(`${lonely.base}/console`);
    await other.locator('#ack-note[data-state="error"]').waitFor();
    assert.match(await other.textContent('#ack-note'), /no_server/);
    const item = other.locator('#messages li.message', { hasText: 'no_server' });
    await item.waitFor();
    assert.equal(await item.getAttribute('data-kind'), 'error');
  } finally {
    await other.close();
    await lonely.stop();
  }
});

test('filters and clears the message list', async () => {
  const total = await messages('').count();
  assert.ok(total >= 4, `expected several messages, got ${total}`);
  await page.fill('#message-filter', 'after-filtered');
  assert.equal(await page.locator('#messages li.message:visible').count(), 1);
  assert.match(await page.textContent('#message-count'), /1 of \d+ shown/);
  await page.fill('#message-filter', '');
  assert.equal(await page.locator('#messages li.message:visible').count(), total);
});

test('screenshot for the README', async () => {
  await page.fill('#publish-payload', '{"order": 42, "status": "shipped", "items": ["book", "pen"]}');
  await page.fill('#publish-roles', '');
  await publish({ name: 'foo.bar', payload: '{"order": 42, "status": "shipped", "items": ["book", "pen"]}' });
  await messages('shipped').waitFor();
  await page.evaluate(() => {
    document.activeElement.blur();
    for (const column of document.querySelectorAll('.column')) column.scrollTop = 0;
  });
  await page.mouse.move(0, 0);
  await mkdir(path.dirname(SCREENSHOT), { recursive: true });
  await page.screenshot({ path: SCREENSHOT });
  if (process.env.CONSOLE_SCREENSHOT_DOCS === '1') {
    await mkdir(path.dirname(DOCS_SCREENSHOT), { recursive: true });
    await copyFile(SCREENSHOT, DOCS_SCREENSHOT);
  }
  assert.deepEqual(pageProblems, [], 'the page logged no errors (CSP violations included)');
});

test('--console off: /console is not served (404)', async () => {
  const off = await startServer(['--console', 'off']);
  try {
    for (const file of ['/console', '/console/', '/console/console.js']) {
      assert.equal((await fetch(off.base + file)).status, 404, file);
    }
    assert.equal((await fetch(`${off.base}/healthz`)).status, 200);
  } finally {
    await off.stop();
  }
});
