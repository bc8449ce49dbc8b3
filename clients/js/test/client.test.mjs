// jssocket-client against the built relay (real sockets): registration, channels, notify,
// admin publish, invoke, reconnect with resubscription, backoff bounds, close codes that stop
// reconnecting. Run with `node --test clients/js/test/` after `cargo build --bin jssocket`, or
// `bash scripts/test.sh`.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  JssocketAdmin, JssocketClient, backoffDelay, defaultShouldReconnect,
} from '../src/index.js';
import {
  PASSWORD, WebSocket, api, next, sleep, startBackend, startServer, until,
} from './helpers.mjs';

let server;
let backend;
const clients = [];

before(async () => {
  server = await startServer();
  backend = startBackend(server, (call) => {
    if (call.method === 'echo') return { data: { echoed: call.data, user: call.user } };
    if (call.method === 'fail') return { error: 'no such file' };
    return undefined; // 'silent': never answered
  });
  assert.equal(await backend.ready(), true, 'the backend joined the pool');
});

after(async () => {
  for (const client of clients) client.close();
  backend.stop();
  await server.stop();
});

function client(options = {}, url = server.ws + '/ws') {
  const c = new JssocketClient(url, { WebSocket, ...options });
  clients.push(c);
  return c;
}

/** An admin connection (the `auth` header), sending only. */
async function admin() {
  const c = client({ auth: PASSWORD });
  const opened = next(c, 'open');
  c.connect();
  await opened;
  return c;
}

test('registers with a token, is acknowledged, receives its notifies', async () => {
  const c = client({ token: 'alice' });
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  const ack = await acknowledged;
  assert.match(ack.target, /^[0-9a-f-]{36}$/);
  assert.equal(c.target, ack.target);
  assert.ok(backend.connects.some((d) => d.token === 'alice' && d.target === ack.target));

  const notified = next(c, 'notify');
  await api(server, 'notify_group', { target: 'u-alice', data: { hello: 'world' } });
  assert.deepEqual((await notified).data, { hello: 'world' });
});

test('a token callback is asked at every connect', async () => {
  let calls = 0;
  const c = client({ token: async () => `t${++calls}` });
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  await acknowledged;
  assert.equal(calls, 1);
  assert.ok(backend.connects.some((d) => d.token === 't1'));
});

test('subscribes, receives publishes of an admin (socket and HTTP), unsubscribes', async () => {
  const c = client({ token: 'bob' });
  c.connect();
  const sub = c.subscribe('orders.plain');
  await next(sub, 'subscribed');
  assert.equal(sub.state, 'subscribed');

  const boss = await admin();
  const viaSocket = next(sub, 'publish');
  assert.equal(boss.publish('orders.plain', { id: 1 }), true);
  const first = await viaSocket;
  assert.deepEqual(first.data, { id: 1 });
  assert.equal(first.channel, 'orders.plain');
  assert.equal(first.offset, null, 'no history on this channel');

  const viaHttp = next(c, 'publish');
  const answer = await new JssocketAdmin(server.base, PASSWORD).publish('orders.plain', { id: 2 });
  assert.equal(answer.delivered, 1);
  assert.deepEqual((await viaHttp).data, { id: 2 });

  const left = next(c, 'unsubscribed');
  sub.unsubscribe();
  await left;
  assert.equal(c.subscriptions.has('orders.plain'), false);
  const answer2 = await new JssocketAdmin(server.base, PASSWORD).publish('orders.plain', { id: 3 });
  assert.equal(answer2.delivered, 0);
});

test('admin notifies over the socket and over HTTP reach the client', async () => {
  const c = client({ token: 'carol' });
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  const { target } = await acknowledged;
  const boss = await admin();
  const http = new JssocketAdmin(server.base, PASSWORD);

  let got = next(c, 'notify');
  boss.notifyClient(target, 'one');
  assert.equal((await got).data, 'one');
  got = next(c, 'notify');
  boss.notifyGroup('u-carol', 'two');
  assert.equal((await got).data, 'two');
  got = next(c, 'notify');
  assert.deepEqual(await http.notifyClient(target, 'three'), { delivered: 1 });
  assert.equal((await got).data, 'three');
  got = next(c, 'notify', (e) => e.data === 'four');
  assert.ok((await http.notifyAll('four')).delivered >= 1);
  await got;

  await assert.rejects(new JssocketAdmin(server.base, 'wrong').notifyAll('x'), (e) => e.status === 401);
});

test('a notify payload that imitates an envelope stays a notify payload', async () => {
  // Labelled (the default), even one imitating a publication of a subscribed channel; without
  // labels only one for a channel the client is not subscribed to can be told apart.
  for (const labels of [true, false]) {
    const c = client({ token: 'dave', labels });
    assert.equal(c.url.endsWith('?labels=1'), labels);
    const acknowledged = next(c, 'acknowledged');
    c.connect();
    const { target } = await acknowledged;
    const sub = c.subscribe('orders.spoofed');
    await next(sub, 'subscribed');
    const channel = labels ? 'orders.spoofed' : 'orders.other';
    const fake = { type: 'publish', data: { name: channel, data: 1, offset: 99, epoch: 'x' } };
    const notified = next(c, 'notify');
    let published = false;
    c.on('publish', () => { published = true; });
    await api(server, 'notify_client', { target, data: fake });
    const event = await notified;
    assert.deepEqual(event.data, fake);
    assert.equal(event.kind, labels ? 'notify_client' : null);
    assert.equal(published, false);
    assert.equal(sub.position, null);
    c.close();
  }
});

test('invoke: a round trip, a backend error, a relay timeout', async () => {
  const c = client({ token: 'erin' });
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  await acknowledged;
  assert.deepEqual(await c.invoke('echo', { n: 1 }), { echoed: { n: 1 }, user: 'u-erin' });
  await assert.rejects(c.invoke('fail'), (e) => e.code === 'error' && e.message === 'no such file');
  await assert.rejects(c.invoke('silent', null, { timeout: 300 }), (e) => e.code === 'timeout');
});

test('invoke without a connection rejects at once; in flight at a close rejects disconnected', async () => {
  const c = client({ token: 'fay' });
  await assert.rejects(c.invoke('echo'), (e) => e.code === 'not_connected');
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  await acknowledged;
  const pending = c.invoke('silent');
  c.close();
  await assert.rejects(pending, (e) => e.code === 'disconnected');
});

test('backoff: full jitter within [0, min(max, min * factor^n)]', () => {
  const backoff = { minDelay: 100, maxDelay: 1000, factor: 2 };
  const caps = [100, 200, 400, 800, 1000, 1000];
  caps.forEach((cap, n) => {
    assert.equal(backoffDelay(n, backoff, () => 0), 0);
    assert.equal(backoffDelay(n, backoff, () => 0.999999), cap - 1);
    for (let i = 0; i < 200; i++) {
      const d = backoffDelay(n, backoff);
      assert.ok(d >= 0 && d < cap, `attempt ${n}: ${d} outside [0, ${cap})`);
    }
  });
});

test('close codes: which reconnect', () => {
  for (const code of [1001, 1005, 1006, 1011, 1012, 1013, 3000]) {
    assert.equal(defaultShouldReconnect(code, ''), true, `${code}`);
  }
  for (const code of [1000, 1002, 1003, 1007, 1009, 4000, 4999]) {
    assert.equal(defaultShouldReconnect(code, ''), false, `${code}`);
  }
  assert.equal(defaultShouldReconnect(1008, 'not an admin'), false);
  assert.equal(defaultShouldReconnect(1008, 'too much bad input'), false);
  assert.equal(defaultShouldReconnect(1008, 'authentication busy, retry'), true);
  assert.equal(defaultShouldReconnect(1008, 'token expired', false), false);
  assert.equal(defaultShouldReconnect(1008, 'token expired', true), true);
});

test('reconnect attempts to a stopped server keep to the backoff bounds', async () => {
  const gone = await startServer();
  const url = gone.ws + '/ws';
  await gone.stop();
  const backoff = { minDelay: 50, maxDelay: 400, factor: 2 };
  // The largest delay each time (random just under 1): the gaps must reach the caps...
  for (const random of [() => 0.999999, Math.random]) {
    const c = client({ ...backoff, random }, url);
    const closes = [];
    const stamps = [];
    c.on('connecting', () => stamps.push(performance.now()));
    c.on('closed', (e) => closes.push({ ...e, at: performance.now() }));
    c.connect();
    await until(() => stamps.length >= 7, '7 connection attempts');
    c.close();
    for (let n = 0; n < 6; n++) {
      const cap = Math.min(backoff.maxDelay, backoff.minDelay * 2 ** n);
      const { delay, at, reconnect } = closes[n];
      assert.equal(reconnect, true);
      assert.ok(delay >= 0 && delay < cap, `attempt ${n}: delay ${delay} outside [0, ${cap})`);
      const waited = stamps[n + 1] - at;
      // ...and never exceed them (timers fire late, never early: 1 ms of rounding, 150 of slack).
      assert.ok(waited >= delay - 1 && waited <= delay + 150, `attempt ${n}: waited ${waited} for ${delay}`);
      if (random !== Math.random) assert.equal(delay, cap - 1);
    }
  }
});

test('a 1008 close (not an admin) stops reconnecting', async () => {
  const c = client({ minDelay: 20, maxDelay: 40 });
  let attempts = 0;
  c.on('connecting', () => attempts++);
  const opened = next(c, 'open');
  c.connect();
  await opened;
  const closed = next(c, 'closed');
  c.send('server_connect', {}); // no password: answered false, closed with 1008
  const event = await closed;
  assert.equal(event.code, 1008);
  assert.equal(event.reason, 'not an admin');
  assert.equal(event.reconnect, false);
  await sleep(500);
  assert.equal(attempts, 1, 'no attempt after the 1008 close');
  assert.equal(c.state, 'idle');
});

test('an admin disconnect (4000-4999) stops reconnecting', async () => {
  const c = client({ token: 'gus', minDelay: 20, maxDelay: 40 });
  let attempts = 0;
  c.on('connecting', () => attempts++);
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  const { target } = await acknowledged;
  const closed = next(c, 'closed');
  assert.equal((await api(server, 'disconnect', { target, code: 4001, reason: 'suspended' })).closed, 1);
  const event = await closed;
  assert.deepEqual([event.code, event.reason, event.reconnect], [4001, 'suspended', false]);
  await sleep(300);
  assert.equal(attempts, 1);
});

test('after a restart the client registers and subscribes again and gets new publishes', async () => {
  const own = await startServer();
  const ownBackend = startBackend(own);
  await ownBackend.ready();
  const c = client({ token: 'hal', minDelay: 50, maxDelay: 200 }, own.ws + '/ws');
  const sub = c.subscribe('news.plain');
  const acks = [];
  c.on('acknowledged', (e) => acks.push(e.target));
  const subscribed = next(sub, 'subscribed');
  const acknowledged = next(c, 'acknowledged');
  c.connect();
  await Promise.all([subscribed, acknowledged]);

  const closed = next(c, 'closed');
  await own.stop();
  const close = await closed;
  assert.equal(close.code, 1001, 'a shutdown closes with 1001');
  assert.equal(close.reconnect, true);
  const again = await startServer([], own.port);
  try {
    const resubscribed = await next(sub, 'subscribed');
    assert.equal(resubscribed.recovered, null, 'no history: nothing to recover');
    await until(() => acks.length === 2, 'a second acknowledgement');
    assert.notEqual(acks[0], acks[1], 'a new connection id');
    const published = next(sub, 'publish');
    assert.equal((await api(again, 'publish', { name: 'news.plain', data: 'after' })).delivered, 1);
    assert.equal((await published).data, 'after');
  } finally {
    c.close();
    ownBackend.stop();
    await again.stop();
  }
});

test('a refused subscribe is reported on the subscription and forgotten', async () => {
  const c = client({ token: 'ida' });
  c.connect();
  const sub = c.subscribe('bad name with spaces');
  const error = await next(sub, 'error');
  assert.equal(error.event, 'subscribe');
  assert.equal(c.subscriptions.has('bad name with spaces'), false);
});
