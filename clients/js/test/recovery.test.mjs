// The client's side of recovery (SPEC §13) against a scripted relay that speaks §13's wire
// format: positions from `subscribed` replies and publications, `since` on resubscribe, an
// overlapping replay delivered once, `recovered:false` surfaced with the position reset.
//
// A stand-in on purpose: it can replay overlapping publications and change its epoch at will,
// which the real relay does not do on demand. The same guarantees against the built relay
// (a history channel across restarts of the built binary) come with the server's history.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

const { Server } = WebSocket;
import { JssocketClient } from '../src/index.js';
import { next, until } from './helpers.mjs';

/** A §13 relay for one history channel: `publish(data)` appends and sends to subscribers. */
function scriptedRelay() {
  const relay = {
    epoch: 'e1',
    log: [], // {offset, data}
    sockets: new Set(),
    subscribes: [], // every subscribe's data, as received
    overlap: 0, // replay this many already-delivered publications before the missed ones
    busy: 0, // answer this many subscribes `rate_limited` (a relay whose store is slow)
  };
  const server = new Server({ port: 0, host: '127.0.0.1' });
  const latest = () => (relay.log.length ? relay.log[relay.log.length - 1].offset : 0);
  const frame = (entry) => JSON.stringify({
    type: 'publish',
    data: { name: 'h.orders', data: entry.data, offset: entry.offset, epoch: relay.epoch },
  });
  server.on('connection', (ws) => {
    ws.on('message', (text) => {
      const { type, data } = JSON.parse(String(text));
      if (type === 'client_connect') {
        ws.send(JSON.stringify({ type: 'client_connected', data: { target: 't', authenticated: true } }));
      } else if (type === 'subscribe') {
        relay.subscribes.push(data);
        if (relay.busy > 0) {
          relay.busy -= 1;
          const error = { code: 'rate_limited', message: 'busy; retry', event: 'subscribe' };
          ws.send(JSON.stringify({ type: 'error', data: error }));
          return;
        }
        const reply = { name: data.name, epoch: relay.epoch, offset: latest() };
        let replay = [];
        if (data.since) {
          reply.recovered = data.since.epoch === relay.epoch;
          if (reply.recovered) {
            replay = relay.log.filter((e) => e.offset > data.since.offset - relay.overlap);
          }
        }
        ws.send(JSON.stringify({ type: 'subscribed', data: reply }));
        for (const entry of replay) ws.send(frame(entry));
        relay.sockets.add(ws);
      }
    });
    ws.on('close', () => relay.sockets.delete(ws));
  });
  relay.ready = new Promise((resolve) => server.on('listening', resolve));
  relay.url = () => `ws://127.0.0.1:${server.address().port}/ws`;
  // `lost`: kept in the history but not delivered live (a publication lost on the way).
  relay.publish = (data, lost = false) => {
    const entry = { offset: latest() + 1, data };
    relay.log.push(entry);
    if (!lost) for (const ws of relay.sockets) ws.send(frame(entry));
  };
  // Drops every connection without a close frame (1006: the network went away).
  relay.drop = () => {
    for (const ws of relay.sockets) ws.terminate();
    relay.sockets.clear();
  };
  relay.close = () => new Promise((resolve) => server.close(resolve));
  return relay;
}

let relay;
before(async () => {
  relay = scriptedRelay();
  await relay.ready;
});
after(() => relay.close());

test('resubscribes with since, delivers the missed publications once and in order', async () => {
  relay.publish('before'); // offset 1: before the subscribe, not delivered
  const c = new JssocketClient(relay.url(), { WebSocket, token: 'x', minDelay: 50, maxDelay: 100 });
  const sub = c.subscribe('h.orders');
  const got = [];
  sub.on('publish', (e) => got.push(e));
  const first = next(sub, 'subscribed');
  c.connect();
  const s1 = await first;
  assert.deepEqual([s1.recovered, s1.epoch, s1.offset], [null, 'e1', 1]);
  assert.deepEqual(sub.position, { offset: 1, epoch: 'e1' }, 'the reply gives the position');
  for (let i = 2; i <= 4; i++) relay.publish(i);
  await until(() => got.length === 3, 'three live publications');

  relay.overlap = 2; // the replay repeats offsets 3 and 4, which the client must drop
  const again = next(sub, 'subscribed');
  relay.drop();
  for (let i = 5; i <= 7; i++) relay.publish(i); // missed while away
  const s2 = await again;
  assert.equal(s2.recovered, true);
  assert.deepEqual(relay.subscribes.at(-1), { name: 'h.orders', since: { offset: 4, epoch: 'e1' } });
  relay.publish(8);
  await until(() => got.length === 7, 'seven publications');
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.deepEqual(got.map((e) => e.offset), [2, 3, 4, 5, 6, 7, 8], 'each once, in order');
  assert.deepEqual(got.map((e) => e.data), [2, 3, 4, 5, 6, 7, 8]);
  assert.deepEqual(sub.position, { offset: 8, epoch: 'e1' });
  c.close();
});

test('an epoch change is surfaced as recovered:false and the position restarts', async () => {
  relay.overlap = 0;
  const c = new JssocketClient(relay.url(), { WebSocket, minDelay: 50, maxDelay: 100 });
  const sub = c.subscribe('h.orders');
  const first = next(sub, 'subscribed');
  c.connect();
  await first;
  const lost = next(c, 'subscribed');
  relay.epoch = 'e2'; // history lost (a restart without a durable store)
  relay.log = [];
  relay.drop();
  const event = await lost;
  assert.deepEqual([event.channel, event.recovered, event.epoch, event.offset], ['h.orders', false, 'e2', 0]);
  assert.deepEqual(sub.position, { offset: 0, epoch: 'e2' });
  const published = next(sub, 'publish');
  relay.publish('fresh');
  const p = await published;
  assert.deepEqual([p.offset, p.epoch, p.data], [1, 'e2', 'fresh']);
  c.close();
});

test('a gap in live publications reconnects and recovers the missing one, in order', async () => {
  relay.overlap = 0;
  relay.epoch = 'e3';
  relay.log = [];
  const c = new JssocketClient(relay.url(), { WebSocket, minDelay: 50, maxDelay: 100 });
  const sub = c.subscribe('h.orders');
  const got = [];
  sub.on('publish', (e) => got.push(e.offset));
  const closes = [];
  c.on('closed', (e) => closes.push(e));
  const first = next(sub, 'subscribed');
  c.connect();
  await first;
  relay.publish('a');
  relay.publish('b', true); // lost on the way
  const recovered = next(sub, 'subscribed');
  relay.publish('c'); // the gap shows here
  const event = await recovered;
  assert.equal(event.recovered, true);
  assert.deepEqual(relay.subscribes.at(-1).since, { offset: 1, epoch: 'e3' });
  assert.match(closes[0].reason, /publication 2 of h.orders missing/);
  assert.equal(closes[0].reconnect, true);
  relay.publish('d');
  await until(() => got.length === 4, 'four publications');
  assert.deepEqual(got, [1, 2, 3, 4]);
  c.close();
});

test('a subscribe refused as busy is asked again with the same since, then recovers', async () => {
  const c = new JssocketClient(relay.url(), { WebSocket, token: 'x', minDelay: 20, maxDelay: 60 });
  try {
    const sub = c.subscribe('h.orders');
    const first = next(sub, 'subscribed');
    c.connect();
    await first;
    const start = relay.log.length ? relay.log[relay.log.length - 1].offset : 0;
    relay.publish('seen');
    await until(() => sub.position && sub.position.offset === start + 1, 'the live publication');
    relay.drop();
    relay.publish('missed');
    relay.busy = 2;
    const before = relay.subscribes.length;
    const errors = [];
    sub.on('error', (e) => errors.push(e));
    const got = next(sub, 'publish');
    const again = await next(sub, 'subscribed');
    assert.equal(again.recovered, true);
    assert.equal((await got).data, 'missed');
    // Two refusals, each retried with the position it had: three subscribes with since.
    const asked = relay.subscribes.slice(before);
    assert.equal(asked.length, 3, JSON.stringify(asked));
    for (const data of asked) assert.deepEqual(data.since, { offset: start + 1, epoch: relay.epoch });
    assert.deepEqual(errors.map((e) => [e.code, e.retrying]), [['rate_limited', true], ['rate_limited', true]]);
  } finally {
    c.close();
  }
});
