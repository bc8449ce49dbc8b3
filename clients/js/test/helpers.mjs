// Shared by the client's tests: the built jssocket binary (tests/support/server.mjs), a
// backend speaking the relay's protocol over a raw WebSocket, and bounded waits.
//
// Environment: JSSOCKET_BIN (default target/debug/jssocket).

import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { startServer as startBinary } from '../../../tests/support/server.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const BIN = process.env.JSSOCKET_BIN || path.join(ROOT, 'target', 'debug', 'jssocket');
export const PASSWORD = '12345678';
/** Longest wait for something that must happen (the first admin login pays bcrypt). */
export const WAIT = 10_000;
export { WebSocket };

/** Starts the binary on `port` (0: a free one) of the loopback. */
export function startServer(extraArgs = [], port = 0) {
  return startBinary(BIN, extraArgs, WAIT, port);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Resolves with the next event `type` of `emitter` (a client or a subscription) for which
 * `accept` holds; rejects after `wait` ms saying what did not come.
 */
export function next(emitter, type, accept = () => true, wait = WAIT) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${type} event within ${wait} ms`));
    }, wait);
    const off = emitter.on(type, (event) => {
      if (!accept(event)) return;
      clearTimeout(timer);
      off();
      resolve(event);
    });
  });
}

/** Polls `check` until it returns true, at most `wait` ms. */
export async function until(check, what, wait = WAIT) {
  const deadline = Date.now() + wait;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/**
 * A backend: an admin WebSocket that joined the server pool. It acknowledges every
 * `client_connect` (user from the token, `u-<token>`), and answers `invoke` calls with
 * `answer(call)` ({data} or {error}; undefined: no answer). Reconnects itself when the server
 * restarts, so it outlives restarts like the client under test.
 */
export function startBackend(server, answer = () => undefined) {
  let ws = null;
  let stopped = false;
  let ready;
  const connects = [];
  const open = () => new Promise((resolve) => {
    ws = new WebSocket(server.ws + '/ws', { headers: { auth: PASSWORD } });
    ws.on('open', () => ws.send(JSON.stringify({ type: 'server_connect', data: {} })));
    ws.on('message', (text) => {
      const message = JSON.parse(String(text));
      if (message.type === 'server_connect') resolve(message.data);
      if (message.type === 'client_connect') {
        connects.push(message.data);
        const token = message.data.token || 'anonymous';
        ws.send(JSON.stringify({
          type: 'client_connected',
          data: { target: message.data.target, authenticated: true, user: `u-${token}` },
        }));
      }
      if (message.type === 'invoke') {
        const result = answer(message.data);
        if (result !== undefined) {
          ws.send(JSON.stringify({
            type: 'invoke_result',
            data: { target: message.data.target, id: message.data.id, ...result },
          }));
        }
      }
    });
    ws.on('error', () => {});
    ws.on('close', () => {
      if (!stopped) setTimeout(() => { ready = open(); }, 100);
      resolve(false);
    });
  });
  ready = open();
  return {
    connects,
    ready: () => ready,
    stop() {
      stopped = true;
      ws.close();
    },
  };
}

/** POST /api/<event> as the admin; returns the parsed answer. */
export async function api(server, event, body) {
  const response = await fetch(`${server.base}/api/${event}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${PASSWORD}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (response.status !== 200) throw new Error(`POST /api/${event}: ${response.status} ${text}`);
  return JSON.parse(text);
}
