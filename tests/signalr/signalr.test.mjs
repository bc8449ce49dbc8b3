// End-to-end test of jssocket's SignalR endpoint (SPEC §10) with the real @microsoft/signalr
// client: the built jssocket binary, Node 20+. Run with `node --test` from this folder, or
// `bash scripts/test.sh` from the repository root (it builds the binary first).
//
// Environment: JSSOCKET_BIN (default target/debug/jssocket).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer as startBinary } from '../support/server.mjs';
import * as signalR from '@microsoft/signalr';
import WebSocket from 'ws';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = process.env.JSSOCKET_BIN || path.join(ROOT, 'target', 'debug', 'jssocket');
const PASSWORD = '12345678';
/** Longest wait for something that must happen (the first admin request pays bcrypt). */
const WAIT = 10_000;
const RS = '\x1e';

/** Starts the binary on `port` (0: a free one) of the loopback (see ../support/server.mjs). */
function startServer(extraArgs = [], port = 0) {
  return startBinary(BIN, extraArgs, WAIT, port);
}

/** POST /api/<event> as the admin; returns the parsed answer. */
async function api(server, event, body) {
  const response = await fetch(`${server.base}/api/${event}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${PASSWORD}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(response.status, 200, `POST /api/${event}: ${await response.clone().text()}`);
  return response.json();
}

function connection(server, options = {}) {
  return new signalR.HubConnectionBuilder()
    .withUrl(`${server.base}/sockets`, options)
    .configureLogging(signalR.LogLevel.None)
    .build();
}

/** Resolves with the arguments of the next invocation of `method`, or fails after WAIT. */
function next(conn, method) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${method} within ${WAIT} ms`)), WAIT);
    const handler = (...args) => {
      clearTimeout(timer);
      conn.off(method, handler);
      resolve(args);
    };
    conn.on(method, handler);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A raw WebSocket to the SignalR path; collects every text message it gets. */
async function raw(server, query = '') {
  const socket = new WebSocket(`${server.ws}/sockets${query}`);
  const messages = [];
  const closed = new Promise((resolve) =>
    socket.on('close', (code, reason) => resolve({ code, reason: reason.toString() })),
  );
  socket.on('message', (data) => messages.push(data.toString()));
  await new Promise((resolve, reject) => {
    socket.on('open', resolve);
    socket.on('error', reject);
  });
  return { socket, messages, closed };
}

/** Waits until `predicate()` holds, or fails after WAIT. */
async function until(predicate, what) {
  const deadline = Date.now() + WAIT;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.stop();
});

test('negotiate gives a UUID v4 connection id and the connection starts', async () => {
  const conn = connection(server);
  await conn.start();
  try {
    assert.equal(conn.state, signalR.HubConnectionState.Connected);
    assert.match(conn.connectionId, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  } finally {
    await conn.stop();
  }
});

test('skipNegotiation connects over WebSockets', async () => {
  const conn = connection(server, {
    skipNegotiation: true,
    transport: signalR.HttpTransportType.WebSockets,
  });
  await conn.start();
  try {
    assert.equal(conn.state, signalR.HubConnectionState.Connected);
    // Registered: it receives notify_all.
    const got = next(conn, 'notify');
    await api(server, 'notify_all', { hello: 'all' });
    assert.deepEqual(JSON.parse((await got)[0]), { hello: 'all' });
  } finally {
    await conn.stop();
  }
});

test('on() receives an unfiltered publish as one JSON string argument, no subscription', async () => {
  const conn = connection(server);
  await conn.start();
  try {
    const got = next(conn, 'foo.bar');
    const answer = await api(server, 'publish', { name: 'foo.bar', data: { n: 1, s: 'x' } });
    assert.ok(answer.delivered >= 1, `delivered: ${JSON.stringify(answer)}`);
    const args = await got;
    assert.equal(args.length, 1);
    assert.equal(typeof args[0], 'string');
    assert.deepEqual(JSON.parse(args[0]), { n: 1, s: 'x' });
  } finally {
    await conn.stop();
  }
});

test('an anonymous connection gets no publish filtered by roles', async () => {
  const conn = connection(server);
  await conn.start();
  try {
    const seen = [];
    conn.on('private', (arg) => seen.push(arg));
    const got = next(conn, 'marker');
    await api(server, 'publish', { name: 'private', data: 1, roles: ['admin'] });
    await api(server, 'publish', { name: 'marker', data: 2 });
    await got;
    assert.deepEqual(seen, []);
  } finally {
    await conn.stop();
  }
});

test('notify_client to the connectionId arrives as the notify method', async () => {
  const conn = connection(server);
  await conn.start();
  try {
    const got = next(conn, 'notify');
    const answer = await api(server, 'notify_client', {
      target: conn.connectionId,
      data: { for: 'you' },
    });
    assert.equal(answer.delivered, 1);
    assert.deepEqual(JSON.parse((await got)[0]), { for: 'you' });
  } finally {
    await conn.stop();
  }
});

test('invoke with no backend server connected rejects with no_server', async () => {
  const conn = connection(server);
  await conn.start();
  try {
    await assert.rejects(conn.invoke('doesNotExist', 1), /no_server/);
    // The connection stays usable.
    assert.equal(conn.state, signalR.HubConnectionState.Connected);
  } finally {
    await conn.stop();
  }
});

/**
 * A backend on its own server: joins the pool and answers every `invoke` with `answer(call)`
 * (`{data}` or `{error}`); the calls it got are in `calls`.
 */
async function backendServer(answer) {
  const own = await startServer();
  const socket = new WebSocket(`${own.ws}/ws`, { headers: { auth: PASSWORD } });
  const calls = [];
  let joined;
  const ready = new Promise((resolve) => { joined = resolve; });
  socket.on('message', (text) => {
    const message = JSON.parse(text.toString());
    if (message.type === 'server_connect') joined(message.data);
    if (message.type !== 'invoke') return;
    calls.push(message.data);
    const { target, id } = message.data;
    socket.send(JSON.stringify({ type: 'invoke_result', data: { target, id, ...answer(message.data) } }));
  });
  await new Promise((resolve, reject) => {
    socket.on('open', resolve);
    socket.on('error', reject);
  });
  socket.send(JSON.stringify({ type: 'server_connect', data: {} }));
  assert.equal(await ready, true);
  return {
    own,
    calls,
    async stop() {
      socket.close();
      await own.stop();
    },
  };
}

test('invoke resolves with the backend server\'s data and rejects with its error', async () => {
  const backend = await backendServer(({ method, data }) => {
    switch (method) {
      case 'add': return { data: data[0] + data[1] };
      case 'echo': return { data };
      case 'fail': return { error: 'no such file' };
      default: return { error: { code: 'unknown', method } };
    }
  });
  const conn = connection(backend.own);
  await conn.start();
  try {
    assert.equal(await conn.invoke('add', 2, 3), 5);
    assert.deepEqual(await conn.invoke('echo', 'f.hl', { n: [1, null] }), ['f.hl', { n: [1, null] }]);
    await assert.rejects(conn.invoke('fail'), /no such file/);
    await assert.rejects(conn.invoke('other', 1), /"method":"other"/);
    // What the backend got: the method, the arguments array, the caller's connection id.
    assert.equal(backend.calls.length, 4);
    for (const call of backend.calls) {
      assert.equal(call.target, conn.connectionId);
      assert.equal(typeof call.id, 'string');
      assert.equal(call.user, null);
    }
    assert.deepEqual(backend.calls[0].data, [2, 3]);
    // send: forwarded, no completion awaited.
    await conn.send('echo', 'fire');
    await until(() => backend.calls.length === 5, 'the send to reach the backend');
    assert.equal(backend.calls[4].id, null);
    assert.equal(conn.state, signalR.HubConnectionState.Connected);
  } finally {
    await conn.stop();
    await backend.stop();
  }
});

test('a MessagePack handshake is refused with an error, then closed', async () => {
  const { socket, messages, closed } = await raw(server);
  socket.send(`{"protocol":"messagepack","version":1}${RS}`);
  await closed;
  assert.equal(messages.length, 1, JSON.stringify(messages));
  assert.ok(messages[0].endsWith(RS));
  const answer = JSON.parse(messages[0].slice(0, -1));
  assert.match(answer.error, /messagepack/);
});

test('an unknown connection token is refused', async () => {
  const socket = new WebSocket(`${server.ws}/sockets?id=nope`);
  const status = await new Promise((resolve) => {
    socket.on('unexpected-response', (_req, res) => resolve(res.statusCode));
    socket.on('open', () => resolve('open'));
    socket.on('error', () => {});
  });
  assert.equal(status, 404);
});

test('keep-alive: server pings, a quiet client is closed, an active one stays', async () => {
  const quick = await startServer([
    '--signalr-keepalive', '1', '--signalr-client-timeout', '2',
  ]);
  try {
    const conn = new signalR.HubConnectionBuilder()
      .withUrl(`${quick.base}/sockets`)
      .configureLogging(signalR.LogLevel.None)
      .build();
    conn.keepAliveIntervalInMilliseconds = 500;
    conn.serverTimeoutInMilliseconds = 3000;
    await conn.start();
    // A raw client that sends nothing after its handshake.
    const silent = await raw(quick);
    silent.socket.send(`{"protocol":"json","version":1}${RS}`);
    await sleep(3500);
    assert.equal(conn.state, signalR.HubConnectionState.Connected, 'the active client stays');
    const { code } = await silent.closed;
    assert.equal(silent.messages[0], `{}${RS}`);
    assert.ok(silent.messages.includes(`{"type":6}${RS}`), JSON.stringify(silent.messages));
    assert.ok(code === 1001 || code === 1006, `close code ${code}`);
    await conn.stop();
  } finally {
    await quick.stop();
  }
});

test('shutdown sends a close message allowing reconnection', async () => {
  const own = await startServer();
  const { socket, messages, closed } = await raw(own);
  socket.send(`{"protocol":"json","version":1}${RS}`);
  await until(() => messages.length >= 1, 'the handshake answer');
  await own.stop();
  const { code } = await closed;
  assert.deepEqual(messages, [`{}${RS}`, `{"type":7,"allowReconnect":true}${RS}`]);
  assert.equal(code, 1001);
});

test('withAutomaticReconnect reconnects after the server restarts on the same port', async () => {
  let own = await startServer();
  const { port } = own;
  const conn = new signalR.HubConnectionBuilder()
    .withUrl(`${own.base}/sockets`)
    .withAutomaticReconnect([0, 100, 200, 300, 500, 500, 500, 500, 500, 500, 1000, 1000, 1000])
    .configureLogging(signalR.LogLevel.None)
    .build();
  let closedForGood = false;
  conn.onclose(() => { closedForGood = true; });
  const reconnecting = new Promise((resolve) => conn.onreconnecting(resolve));
  const reconnected = new Promise((resolve) => conn.onreconnected(resolve));
  try {
    await conn.start();
    const before = conn.connectionId;
    // SIGTERM: the server says `allowReconnect` and closes with 1001.
    await own.stop();
    await reconnecting;
    own = await startServer([], port);
    const id = await Promise.race([
      reconnected,
      sleep(WAIT).then(() => { throw new Error(`no onreconnected within ${WAIT} ms`); }),
    ]);
    assert.equal(closedForGood, false, 'the client gave up instead of reconnecting');
    assert.equal(conn.state, signalR.HubConnectionState.Connected);
    assert.notEqual(id, before, 'a new server hands out a new connection id');
    const got = next(conn, 'after.restart');
    const answer = await api(own, 'publish', { name: 'after.restart', data: { back: true } });
    assert.equal(answer.delivered, 1);
    assert.deepEqual(JSON.parse((await got)[0]), { back: true });
  } finally {
    await conn.stop();
    await own.stop();
  }
});

test('one /api/publish reaches a jssocket subscriber and a SignalR connection', async () => {
  const conn = connection(server);
  await conn.start();
  const js = new WebSocket(`${server.ws}/ws`);
  const frames = [];
  const arrived = () => frames.map((f) => JSON.parse(f));
  js.on('message', (data) => frames.push(data.toString()));
  try {
    await new Promise((resolve, reject) => {
      js.on('open', resolve);
      js.on('error', reject);
    });
    // Registered (its connect waits for a server meanwhile), then subscribed.
    js.send(JSON.stringify({ type: 'client_connect', data: {} }));
    js.send(JSON.stringify({ type: 'subscribe', data: { name: 'both.wires' } }));
    await until(() => arrived().some((f) => f.type === 'subscribed'), 'subscribed');
    const got = next(conn, 'both.wires');
    const answer = await api(server, 'publish', { name: 'both.wires', data: { n: 42 } });
    assert.equal(answer.delivered, 2, JSON.stringify(answer));
    assert.deepEqual(JSON.parse((await got)[0]), { n: 42 });
    await until(() => arrived().some((f) => f.type === 'publish'), 'the jssocket publish');
    assert.deepEqual(
      arrived().find((f) => f.type === 'publish'),
      { type: 'publish', data: { name: 'both.wires', data: { n: 42 } } },
    );
  } finally {
    js.close();
    await conn.stop();
  }
});

// ---------------------------------------------------------------- tokens (SPEC §11)

const JWT_SECRET = 'signalr-test-secret';

/** An HS256 JWT with these claims, made here with node:crypto. */
async function jwt(claims, secret = JWT_SECRET) {
  const { createHmac } = await import('node:crypto');
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64(claims)}`;
  const signature = createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${signature}`;
}

test('a valid token acknowledges the connection: role-filtered publishes reach it, a bad token is refused', async () => {
  const secured = await startServer(['--jwt-secret', JWT_SECRET]);
  try {
    const exp = Math.floor(Date.now() / 1000) + 3600;
    const token = await jwt({ sub: 'alice', roles: ['admin'], exp });
    const conn = connection(secured, { accessTokenFactory: () => token });
    await conn.start();
    try {
      const got = next(conn, 'private');
      const other = [];
      conn.on('others', (arg) => other.push(arg));
      await api(secured, 'publish', { name: 'others', data: 0, roles: ['nobody'] });
      await api(secured, 'publish', { name: 'private', data: { to: 'admins' }, roles: ['admin'] });
      assert.deepEqual(JSON.parse((await got)[0]), { to: 'admins' });
      const byUser = next(conn, 'mine');
      await api(secured, 'publish', { name: 'mine', data: 'u', users: ['alice'] });
      assert.deepEqual(JSON.parse((await byUser)[0]), 'u');
      assert.deepEqual(other, []);
    } finally {
      await conn.stop();
    }
    for (const bad of [
      await jwt({ sub: 'alice', exp }, 'another-secret'),
      await jwt({ sub: 'alice', exp: Math.floor(Date.now() / 1000) - 3600 }),
      'not.a.token',
    ]) {
      const refused = connection(secured, { accessTokenFactory: () => bad });
      await assert.rejects(refused.start(), /401|Unauthorized/);
    }
  } finally {
    await secured.stop();
  }
});

test('a SignalR connection closes when its token expires: type 7 without reconnect, then 1008', async () => {
  const secured = await startServer(['--jwt-secret', JWT_SECRET]);
  try {
    // Valid for about two more seconds: `exp` is 28 s ago, within the 30 s leeway.
    const short = await jwt({ sub: 'alice', exp: Math.floor(Date.now() / 1000) - 28 });
    const started = Date.now();
    const { socket, messages, closed } = await raw(secured, `?access_token=${short}`);
    socket.send(`{"protocol":"json","version":1}${RS}`);
    const { code, reason } = await Promise.race([
      closed,
      sleep(WAIT).then(() => { throw new Error(`not closed within ${WAIT} ms`); }),
    ]);
    const elapsed = Date.now() - started;
    assert.ok(elapsed > 500, `closed after ${elapsed} ms, before the token expired`);
    assert.deepEqual(messages, [
      `{}${RS}`,
      `{"type":7,"error":"token expired","allowReconnect":false}${RS}`,
    ]);
    assert.equal(code, 1008);
    assert.equal(reason, 'token expired');

    // The real client: onclose with the server's error, and no reconnection attempt.
    const conn = connection(secured, { accessTokenFactory: () => short });
    const reconnecting = [];
    conn.onreconnecting(() => reconnecting.push(1));
    const onclose = new Promise((resolve) => conn.onclose(resolve));
    // The token may expire while the client starts: the close then comes with the handshake's
    // answer and start() itself rejects with the server's error (seen under Node 18).
    const startError = await conn.start().then(() => null, (e) => e);
    const error = startError ?? await Promise.race([
      onclose,
      sleep(WAIT).then(() => { throw new Error(`no onclose within ${WAIT} ms`); }),
    ]);
    assert.match(String(error), /token expired/);
    assert.deepEqual(reconnecting, []);
  } finally {
    await secured.stop();
  }
});

test('every publish filter, matching and not, and the clients filter reach the right connections', async () => {
  const secured = await startServer(['--jwt-secret', JWT_SECRET]);
  const exp = Math.floor(Date.now() / 1000) + 3600;
  const people = {
    alice: { sub: 'alice', roles: ['admin'], groups: ['red'], exp },
    bob: { sub: 'bob', roles: 'user', groups: 'blue', exp },
  };
  const conns = {};
  const got = { alice: [], bob: [] };
  try {
    for (const [name, claims] of Object.entries(people)) {
      const token = await jwt(claims);
      conns[name] = connection(secured, { accessTokenFactory: () => token });
      conns[name].on('f', (arg) => got[name].push(JSON.parse(arg)));
      await conns[name].start();
    }
    const cases = [
      [{ roles: ['admin'] }, ['alice']],
      [{ roles: ['user', 'admin'] }, ['alice', 'bob']],
      [{ roles: ['root'] }, []],
      [{ groups: ['blue'] }, ['bob']],
      [{ groups: ['green'] }, []],
      [{ users: ['bob'] }, ['bob']],
      [{ users: ['carol'] }, []],
      [{ clients: [conns.alice.connectionId] }, ['alice']],
      [{ clients: [conns.bob.connectionId, conns.alice.connectionId] }, ['alice', 'bob']],
      [{ clients: ['00000000-0000-4000-8000-000000000000'] }, []],
    ];
    for (const [round, [filter, admitted]] of cases.entries()) {
      await api(secured, 'publish', { name: 'f', data: { round }, ...filter });
      await api(secured, 'publish', { name: 'f', data: { round, marker: true } });
      for (const name of Object.keys(people)) {
        await until(() => got[name].some((m) => m.round === round && m.marker), `${name}'s marker ${round}`);
        const expected = admitted.includes(name)
          ? [{ round }, { round, marker: true }]
          : [{ round, marker: true }];
        assert.deepEqual(got[name], expected, `${JSON.stringify(filter)} for ${name}`);
        got[name].length = 0;
      }
    }
  } finally {
    for (const conn of Object.values(conns)) await conn.stop();
    await secured.stop();
  }
});
