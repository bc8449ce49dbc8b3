// End-to-end test of the web console: the built jssocket binary, Debian's headless Chromium,
// driven by playwright-core (no browser download). Run with `node --test` from this folder, or
// `bash scripts/test.sh` from the repository root (it builds the binary first).
//
// Environment: JSSOCKET_BIN (default target/debug/jssocket), CHROMIUM (default
// /usr/bin/chromium), CONSOLE_SCREENSHOT_DOCS=1 to also refresh docs/console.png.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { access, copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
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
    ['/console/jssocket-client.js', 'text/javascript'],
  ]) {
    const response = await fetch(server.base + file);
    assert.equal(response.status, 200, file);
    assert.match(response.headers.get('content-type'), new RegExp(`^${type}`), file);
    const csp = response.headers.get('content-security-policy');
    assert.match(csp, /default-src 'self'/, file);
    assert.match(csp, /connect-src 'self' ws: wss:/, file);
  }
  assert.equal((await fetch(`${server.base}/console/nope.js`)).status, 404);
  // The page connects with jssocket-client's committed browser bundle, served as it is.
  const bundle = await readFile(path.join(ROOT, 'clients', 'js', 'dist', 'jssocket-client.js'), 'utf8');
  assert.equal(await (await fetch(`${server.base}/console/jssocket-client.js`)).text(), bundle);
});

test('connects as a client: registered, not acknowledged without a backend', async () => {
  await page.goto(`${server.base}/console`);
  await page.locator('#socket-status[data-state="open"]').waitFor();
  const host = new URL(server.base).host;
  // labels=1: notify payloads arrive labelled by the event that sent them.
  assert.equal(await page.textContent('#ws-url'), `ws://${host}/ws?labels=1`);
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
  assert.equal(await notify.getAttribute('data-kind'), 'notify_client');

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
    assert.equal(await item.getAttribute('data-kind'), 'notify_client', marker);
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

// ---------- the admin views (issue 13) ----------

/**
 * A tab holding raw WebSockets to `server`: a backend that acknowledges every client_connect
 * it is forwarded (by the token: `user:<name>` or `user:<name>:<group>`, else no user), and
 * clients that record every frame they get (window.got[name]).
 */
async function fleet(server) {
  const tab = await context.newPage();
  tab.setDefaultTimeout(WAIT);
  await tab.goto(`${server.base}/healthz`);
  await tab.evaluate(async ({ url, password }) => {
    window.got = {};
    window.sockets = {};
    window.closes = {};
    window.open_ = (name, onFrame) => new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      window.got[name] = [];
      ws.onmessage = (event) => { window.got[name].push(event.data); if (onFrame) onFrame(event.data); };
      ws.onopen = () => { window.sockets[name] = ws; resolve(); };
      ws.onclose = (event) => { window.closes[name] = { code: event.code, reason: event.reason }; };
      ws.onerror = reject;
    });
    await window.open_('backend', (text) => {
      const frame = JSON.parse(text);
      if (frame.type !== 'client_connect') return;
      const [, user, group] = (frame.data.token || '').split(':');
      const data = { target: frame.data.target };
      if (user) data.user = user;
      if (group) data.groups = [group];
      window.sockets.backend.send(JSON.stringify({ type: 'client_connected', data }));
    });
    window.sockets.backend.send(JSON.stringify({ type: 'server_connect', data: { auth: password } }));
    await new Promise((resolve) => {
      const check = () => (window.got.backend.includes('{"type":"server_connect","data":true}') ?
        resolve() : setTimeout(check, 20));
      check();
    });
    // A client acknowledged with `token` (see above); resolves once it is.
    window.client = async (name, token) => {
      await window.open_(name);
      window.sockets[name].send(JSON.stringify({ type: 'client_connect', data: { token } }));
      await new Promise((resolve) => {
        const check = () => (window.got[name].some((f) => f.startsWith('{"type":"client_connected"')) ?
          resolve() : setTimeout(check, 20));
        check();
      });
    };
  }, { url: `${server.ws}/ws`, password: PASSWORD });
  return tab;
}

/** Frames client `name` of `tab` got after its client_connected. */
const framesOf = (tab, name) => tab.evaluate((name) => window.got[name]
  .filter((f) => !f.startsWith('{"type":"client_connected"') && !f.startsWith('{"type":"subscribed"')), name);

/** Submits an admin form with its button and waits for its result text. */
async function submitForm(tab, id) {
  await tab.evaluate((id) => { document.querySelector(`#${id} output`).textContent = ''; }, id);
  await tab.click(`#${id} button[type=submit]`);
  await tab.waitForFunction((id) => /Delivered|Closed|HTTP|Not sent/.test(document.querySelector(`#${id} output`).textContent), id);
  return tab.textContent(`#${id} output`);
}

test('admin views: overview counts, users and connections, a notify to a picked user reaches only it', async () => {
  const own = await startServer(['--auth', '$2b$04$dODXgGN5PieAre7bihB2aeEbZUa6kaMXEadSzdIWoM/eSGT3GjoJa']);
  const ships = await fleet(own);
  const admin = await context.newPage();
  admin.setDefaultTimeout(WAIT);
  const problems = [];
  admin.on('console', (message) => {
    if (message.type() === 'error') problems.push(`console error: ${message.text()}`);
  });
  admin.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
  try {
    // 3 clients of 2 users; bob's subscribes to a channel; publish-filter groups staff, ops.
    await ships.evaluate(async () => {
      await window.client('alice1', 'user:alice:staff');
      await window.client('alice2', 'user:alice:staff');
      await window.client('bob', 'user:bob:ops');
      window.sockets.bob.send('{"type":"subscribe","data":{"name":"news"}}');
    });
    await ships.waitForFunction(() => window.got.bob.includes('{"type":"subscribed","data":{"name":"news"}}'));
    // The console is a fourth connection: acknowledged with no user (token ''), so no user.
    await admin.goto(`${own.base}/console`);
    await admin.locator('#acknowledged[data-state="yes"]').waitFor();
    const consoleId = await admin.textContent('#connection-id');

    await admin.fill('#password', PASSWORD);
    await admin.click('#overview-refresh');
    await admin.waitForFunction(() => document.getElementById('stat-connections').textContent === '4');
    const stat = (name) => admin.textContent(`#stat-${name}`);
    assert.equal(await stat('users'), '2');
    assert.equal(await stat('channels'), '1');
    assert.equal(await stat('groups'), '2');
    assert.equal(await stat('nodes'), '1');
    assert.match(await stat('version'), /^\d+\.\d+\.\d+/);
    assert.match(await stat('uptime'), /^\d+ (s|min)/);
    // messages/s needs two samples of /metrics: the next automatic refresh (5 s) gives it.
    await admin.waitForFunction(() => /^in [\d.]+ · out [\d.]+$/.test(document.getElementById('stat-rate').textContent),
      null, { timeout: 15_000 });

    // Users, searchable by prefix.
    await admin.click('#users-form button[type=submit]');
    await admin.locator('#user-list li[data-user="bob"]').waitFor();
    assert.deepEqual(
      await admin.$$eval('#user-list li', (items) => items.map((li) => li.textContent)),
      ['alice2 connectionsConnectionsPick', 'bob1 connectionConnectionsPick'],
    );
    await admin.fill('#users-prefix', 'b');
    await admin.press('#users-prefix', 'Enter');
    await admin.waitForFunction(() => document.querySelectorAll('#user-list li').length === 1);
    assert.equal(await admin.getAttribute('#user-list li', 'data-user'), 'bob');

    // Pick bob: notify_group goes to bob's group (named after the user) and nobody else.
    await admin.click('#user-list li[data-user="bob"] button:text("Pick")');
    assert.equal(await admin.inputValue('#notify-group-target'), 'bob');
    assert.equal(await admin.inputValue('#publish-users'), 'bob');
    assert.equal(await admin.inputValue('#disconnect-who'), 'bob');
    assert.equal(await admin.isChecked('#disconnect-kind-user'), true);
    assert.match(await admin.textContent('#picked'), /^Picked user bob: filled into publish \(users filter\), notify_group, disconnect\.$/);
    await admin.fill('#notify-group-payload', '{"for":"bob"}');
    assert.match(await submitForm(admin, 'notify-group-form'), /^Delivered to 1 connection\b/);
    // A marker to everyone: frames on one connection come in order, so whoever got the
    // group's notify has it before the marker.
    await admin.fill('#notify-all-payload', '{"marker":1}');
    assert.match(await submitForm(admin, 'notify-all-form'), /^Delivered to 4 connections\b/);
    await ships.waitForFunction(() => ['alice1', 'alice2', 'bob'].every((n) => window.got[n].includes('{"marker":1}')));
    assert.deepEqual(await framesOf(ships, 'bob'), ['{"for":"bob"}', '{"marker":1}']);
    assert.deepEqual(await framesOf(ships, 'alice1'), ['{"marker":1}']);
    assert.deepEqual(await framesOf(ships, 'alice2'), ['{"marker":1}']);
    // The console is labelled: it saw the marker as notify_all and not bob's notify.
    const marker = admin.locator('#messages li.message', { hasText: '"marker"' });
    await marker.waitFor();
    assert.equal(await marker.getAttribute('data-kind'), 'notify_all');
    assert.equal(await admin.locator('#messages li.message', { hasText: '"for"' }).count(), 0);

    // alice's connections, paged with `next`; picking one fills notify_client.
    await admin.click('#user-list li[data-user="bob"] button:text("Connections")');
    await admin.waitForFunction(() => document.querySelectorAll('#connection-list li').length === 1);
    await admin.fill('#connections-user', '');
    await admin.press('#connections-user', 'Enter');
    await admin.waitForFunction(() => document.querySelectorAll('#connection-list li').length === 4);
    assert.equal(await admin.locator('#connections-more').isVisible(), false);
    await admin.fill('#connections-user', 'alice');
    await admin.press('#connections-user', 'Enter');
    await admin.waitForFunction(() => document.querySelectorAll('#connection-list li').length === 2);
    const aliceIds = await admin.$$eval('#connection-list li', (items) => items.map((li) => li.dataset.target));
    await admin.click(`#connection-list li[data-target="${aliceIds[1]}"] button`);
    assert.equal(await admin.inputValue('#notify-client-target'), aliceIds[1]);
    assert.equal(await admin.inputValue('#disconnect-who'), aliceIds[1]);
    assert.equal(await admin.isChecked('#disconnect-kind-target'), true);
    await admin.fill('#notify-client-payload', '{"just":"one"}');
    assert.match(await submitForm(admin, 'notify-client-form'), /^Delivered to 1 connection\b/);
    // Which of alice's sockets is aliceIds[1]: the one that got it; the other gets nothing.
    await ships.waitForFunction(() => ['alice1', 'alice2'].some((n) => window.got[n].includes('{"just":"one"}')));
    await admin.waitForTimeout(SILENCE);
    const got = [await framesOf(ships, 'alice1'), await framesOf(ships, 'alice2')];
    assert.deepEqual(got.map((frames) => frames.includes('{"just":"one"}')).sort(), [false, true]);
    assert.ok((await framesOf(ships, 'bob')).every((f) => f !== '{"just":"one"}'));

    // The console's own connection, picked: a notify_client and a notify_group (its group
    // is public) are labelled with their kind.
    await admin.fill('#connections-user', '');
    await admin.press('#connections-user', 'Enter');
    await admin.waitForFunction(() => document.querySelectorAll('#connection-list li').length === 4);
    assert.match(await admin.textContent(`#connection-list li[data-target="${consoleId}"]`), /this page/);
    await admin.click(`#connection-list li[data-target="${consoleId}"] button`);
    await admin.fill('#notify-client-payload', '{"labelled": "client"}');
    await submitForm(admin, 'notify-client-form');
    await admin.fill('#notify-group-target', '');
    await admin.fill('#notify-group-payload', '{"labelled": "group"}');
    await submitForm(admin, 'notify-group-form');
    for (const [text, kind] of [['"client"', 'notify_client'], ['"group"', 'notify_group']]) {
      const item = admin.locator('#messages li.message', { hasText: text });
      await item.waitFor();
      assert.equal(await item.getAttribute('data-kind'), kind);
      assert.equal(await item.locator('.kind').textContent(), kind);
    }

    // Paging: with 12 more users, the users list comes in pages of the chosen size.
    await ships.evaluate(async () => {
      for (let i = 0; i < 12; i++) await window.client(`u${i}`, `user:user${String(i).padStart(2, '0')}`);
    });
    await admin.selectOption('#page-size', '10');
    await admin.fill('#users-prefix', '');
    await admin.press('#users-prefix', 'Enter');
    await admin.waitForFunction(() => document.querySelectorAll('#user-list li').length === 10);
    assert.equal(await admin.locator('#users-more').isVisible(), true);
    await admin.click('#users-more');
    await admin.waitForFunction(() => document.querySelectorAll('#user-list li').length === 14);
    assert.equal(await admin.locator('#users-more').isVisible(), false);
    const users = await admin.$$eval('#user-list li', (items) => items.map((li) => li.dataset.user));
    assert.equal(new Set(users).size, 14, 'each user once across pages');
    assert.equal(users[0], 'alice');

    // disconnect, from a picked user: a code out of range is refused on the page; a good one
    // sends SPEC §12's body, and bob's one connection is closed with that code and reason.
    const bodies = [];
    admin.on('request', (request) => {
      if (new URL(request.url()).pathname === '/api/disconnect') bodies.push(request.postData());
    });
    await admin.click('#user-list li[data-user="bob"] button:text("Pick")');
    await admin.fill('#disconnect-code', '5000');
    assert.match(await submitForm(admin, 'disconnect-form'), /^Not sent/);
    assert.match(await admin.textContent('#disconnect-code-error'), /4000 to 4999/);
    await admin.fill('#disconnect-code', '4001');
    await admin.fill('#disconnect-reason', 'bye');
    const closed = await submitForm(admin, 'disconnect-form');
    assert.deepEqual(bodies, ['{"user":"bob","code":4001,"reason":"bye"}']);
    assert.match(closed, /^Closed 1 connection on 1 node \(HTTP 200\)$/);
    const close = await (await ships.waitForFunction(() => window.closes.bob)).jsonValue();
    assert.deepEqual(close, { code: 4001, reason: 'bye' });
    assert.deepEqual(await ships.evaluate(() => Object.keys(window.closes)), ['bob'], 'only bob was closed');

    // The CSP is the same strict one; the page logged no violation.
    const csp = (await fetch(`${own.base}/console`)).headers.get('content-security-policy');
    assert.match(csp, /^default-src 'self'; connect-src 'self' ws: wss:;/);
    assert.deepEqual(problems, [], 'the admin page logged no errors (CSP violations included)');
  } finally {
    await admin.close();
    await ships.close();
    await own.stop();
  }
});

test('screenshot for the README', async () => {
  await page.fill('#publish-payload', '{"order": 42, "status": "shipped", "items": ["book", "pen"]}');
  await page.fill('#publish-roles', '');
  await publish({ name: 'foo.bar', payload: '{"order": 42, "status": "shipped", "items": ["book", "pen"]}' });
  await messages('shipped').waitFor();
  // The admin views filled in: the overview, the users, alice picked, a labelled notify_all.
  await page.fill('#notify-all-payload', '{"maintenance": "tonight at 22:00"}');
  await page.click('#notify-all-form button[type=submit]');
  await messages('maintenance').waitFor();
  await page.uncheck('#overview-auto');
  await page.click('#overview-refresh');
  await page.waitForFunction(() => document.getElementById('stat-connections').textContent !== '–');
  await page.click('#users-form button[type=submit]');
  await page.locator('#user-list li[data-user="alice"]').waitFor();
  await page.click('#user-list li[data-user="alice"] button:text("Connections")');
  await page.locator('#connection-list li').first().waitFor();
  await page.click('#user-list li[data-user="alice"] button:text("Pick")');
  // Tall enough for the first column's four cards.
  await page.setViewportSize({ width: 1440, height: 1560 });
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
