// Recovery (SPEC §13) against the built relay with `--history`: the client's connection is cut
// three times (a TCP proxy between it and the relay drops every connection, as a network or a
// load balancer would) under a steady stream of publications to a history channel, and every
// publication still reaches the application exactly once and in order. A restart of a node
// without a durable store loses its history: the client is told `recovered:false`.
//
// Needs a relay with channel history (SPEC §13, `--history`).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
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
