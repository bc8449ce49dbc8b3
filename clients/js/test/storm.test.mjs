// Recovery (SPEC §13) against the built relay with `--history`: the client's connection is cut
// three times (a TCP proxy between it and the relay drops every connection, as a network or a
// load balancer would) under a steady stream of publications to a history channel, and every
// publication still reaches the application exactly once and in order. A restart of a node
// without a durable store loses its history: the client is told `recovered:false`. With the
// history in Redis (`--redis-url`), the node the client is on is really restarted three times
// (SIGTERM, started again on its port) while a second node on the same Redis keeps publishing,
// and nothing is lost or doubled.
//
// Needs a relay with channel history (SPEC §13, `--history`) and, for the Redis test, a
// `redis-server` on the PATH (the test starts its own on a free port).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import net from 'node:net';
import { JssocketAdmin, JssocketClient } from '../src/index.js';
import { PASSWORD, WebSocket, next, sleep, startServer, until } from './helpers.mjs';

const HISTORY = ['--history', 'storm.*=1000/10m'];

/** A TCP proxy to `port`; `cut()` drops every connection through it (the client sees 1006). */
async function proxy(port) {
  const sockets = new Set();
  const server = net.createServer((inbound) => {
    const outbound = net.connect(port, '127.0.0.1');
    for (const [a, b] of [[inbound, outbound], [outbound, inbound]]) {
      sockets.add(a);
      a.pipe(b);
      a.on('error', () => b.destroy());
      a.on('close', () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    cut() {
      for (const socket of sockets) socket.destroy();
    },
    close: () => new Promise((resolve) => {
      for (const socket of sockets) socket.destroy();
      server.close(resolve);
    }),
  };
}

let server;
before(async () => {
  server = await startServer(HISTORY);
});
after(() => server.stop());

test('three connection drops under a steady publish stream: each publication once, in order', async () => {
  const through = await proxy(server.port);
  const c = new JssocketClient(through.url, { WebSocket, minDelay: 50, maxDelay: 300 });
  const sub = c.subscribe('storm.orders');
  const got = [];
  const recoveries = [];
  sub.on('publish', (e) => got.push(e));
  sub.on('subscribed', (e) => recoveries.push(e.recovered));
  const subscribed = next(sub, 'subscribed');
  c.connect();
  await subscribed;

  // The publisher: one publication every 5 ms over HTTP, numbered, while the drops happen.
  const admin = new JssocketAdmin(server.base, PASSWORD);
  const TOTAL = 400;
  let published = 0;
  const publisher = (async () => {
    while (published < TOTAL) {
      published++;
      await admin.publish('storm.orders', { i: published });
      await sleep(5);
    }
  })();
  for (let drop = 0; drop < 3; drop++) {
    await until(() => published >= (drop + 1) * 90, `${(drop + 1) * 90} publications`);
    through.cut();
  }
  await publisher;
  await until(() => got.length >= TOTAL, `all ${TOTAL} publications (got ${got.length})`, 15_000);
  await sleep(200); // a duplicate would arrive now

  assert.deepEqual(recoveries.slice(1), [true, true, true], 'each resubscribe recovered');
  assert.equal(got.length, TOTAL, 'no publication twice');
  got.forEach((e, n) => {
    assert.equal(e.data.i, n + 1, `publication ${n + 1} in order`);
    assert.equal(e.offset, n + 1);
  });
  assert.equal(new Set(got.map((e) => e.epoch)).size, 1);
  c.close();
  await through.close();
});

test('a restart without a durable store changes the epoch: recovered:false, then live again', async () => {
  const own = await startServer(HISTORY);
  const c = new JssocketClient(own.ws + '/ws', { WebSocket, minDelay: 50, maxDelay: 200 });
  const sub = c.subscribe('storm.restart');
  const subscribed = next(sub, 'subscribed');
  c.connect();
  const first = await subscribed;
  const admin = new JssocketAdmin(own.base, PASSWORD);
  const published = next(sub, 'publish');
  await admin.publish('storm.restart', 'one');
  assert.equal((await published).offset, 1);
  assert.deepEqual(sub.position, { offset: 1, epoch: first.epoch });

  const lost = next(sub, 'subscribed');
  await own.stop();
  const again = await startServer(HISTORY, own.port);
  try {
    const event = await lost;
    assert.equal(event.recovered, false, 'the history went with the old process');
    assert.notEqual(event.epoch, first.epoch);
    const live = next(sub, 'publish');
    await new JssocketAdmin(again.base, PASSWORD).publish('storm.restart', 'two');
    const p = await live;
    assert.deepEqual([p.data, p.offset, p.epoch], ['two', 1, event.epoch]);
  } finally {
    c.close();
    await again.stop();
  }
});

/** A free TCP port of the loopback (free when asked; the caller binds it right away). */
async function freePort() {
  const probe = net.createServer();
  await new Promise((resolve) => probe.listen(0, '127.0.0.1', resolve));
  const { port } = probe.address();
  await new Promise((resolve) => probe.close(resolve));
  return port;
}

/** True when a Redis on `port` answers PING. */
function pong(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    let reply = '';
    socket.setTimeout(500, () => socket.destroy());
    socket.on('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      reply += chunk;
      if (reply.includes('\r\n')) socket.end();
    });
    socket.on('error', () => {});
    socket.on('close', () => resolve(reply.startsWith('+PONG')));
  });
}

/**
 * A throwaway `redis-server` on a free port, nothing saved to disk; `stop()` kills it. Fails
 * saying what to install when there is no `redis-server`.
 */
async function startRedis() {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1',
    '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  let failure = null;
  child.on('error', (error) => {
    failure = error.code === 'ENOENT'
      ? new Error('redis-server is missing: install redis-server (apt-get install redis-server)')
      : error;
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null && !failure) {
      child.kill('SIGKILL');
      await exited;
    }
  };
  const deadline = Date.now() + 5_000;
  for (;;) {
    if (failure) throw failure;
    if (child.exitCode !== null) throw new Error(`redis-server exited (${child.exitCode})`);
    if (await pong(port)) break;
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`redis-server did not answer PING on ${port} within 5 s`);
    }
    await sleep(50);
  }
  return { url: `redis://127.0.0.1:${port}`, stop };
}

test('three real restarts of the client\'s node, history in Redis: each publication once, in order', async () => {
  const redis = await startRedis();
  const args = ['--redis-url', redis.url, '--history', 'storm.*=10000/10m'];
  // The publisher's node stays up: publications go on while the client's node is down.
  let publisherNode = null;
  let clientNode = null;
  let c = null;
  try {
    publisherNode = await startServer(args);
    const port = await freePort();
    clientNode = await startServer(args, port);
    c = new JssocketClient(`ws://127.0.0.1:${port}/ws`, { WebSocket, minDelay: 50, maxDelay: 300 });
    const sub = c.subscribe('storm.redis');
    const got = [];
    const recoveries = [];
    const epochs = [];
    sub.on('publish', (e) => got.push(e));
    sub.on('subscribed', (e) => {
      recoveries.push(e.recovered);
      epochs.push(e.epoch);
    });
    const subscribed = next(sub, 'subscribed');
    c.connect();
    await subscribed;

    // One publication every 5 ms through the other node, each acknowledged (it never goes down).
    const admin = new JssocketAdmin(publisherNode.base, PASSWORD);
    const TOTAL = 400;
    let published = 0;
    const publisher = (async () => {
      while (published < TOTAL) {
        await admin.publish('storm.redis', { i: published + 1 });
        published++;
        await sleep(5);
      }
    })();
    for (let restart = 0; restart < 3; restart++) {
      await until(() => published >= (restart + 1) * 90, `${(restart + 1) * 90} publications`);
      await clientNode.stop();
      await sleep(300); // down for a while: publications the client misses meanwhile
      clientNode = await startServer(args, port);
      await until(() => recoveries.length === restart + 2, `resubscribe after restart ${restart + 1}`);
    }
    await publisher;
    await until(() => got.length >= TOTAL, `all ${TOTAL} publications (got ${got.length})`, 15_000);
    await sleep(200); // a duplicate would arrive now

    assert.deepEqual(recoveries, [null, true, true, true], 'each resubscribe recovered');
    assert.equal(got.length, TOTAL, 'no publication twice');
    got.forEach((e, n) => {
      assert.equal(e.data.i, n + 1, `publication ${n + 1} in order`);
      assert.equal(e.offset, n + 1);
    });
    // The epoch is made by the channel's first publication and lives in Redis: no restart of
    // a node changes it (the first `subscribed`, before any publication, has none yet).
    const epoch = got[0].epoch;
    assert.ok(epoch, 'publications carry an epoch');
    assert.deepEqual(new Set(got.map((e) => e.epoch)), new Set([epoch]));
    assert.deepEqual(epochs.slice(1), [epoch, epoch, epoch], 'each restart kept the epoch');
  } finally {
    if (c) c.close();
    if (clientNode) await clientNode.stop();
    if (publisherNode) await publisherNode.stop();
    await redis.stop();
  }
});
