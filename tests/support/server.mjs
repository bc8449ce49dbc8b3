// The built jssocket binary for the Node end-to-end tests (tests/console, tests/signalr):
// started on a free loopback port, stopped with SIGTERM. Node built-ins only, so each test
// folder imports it by path whatever its own packages.

import { spawn } from 'node:child_process';
import { access } from 'node:fs/promises';
import { constants } from 'node:fs';

/**
 * Starts `bin` on 127.0.0.1, `port` (0: a free one), with `extraArgs`, and waits (at most
 * `wait` ms) until it logs the address it listens on (text or JSON logs). Returns its `base`
 * and `ws` URLs, its `port` and `stop()`. A test that restarts a server on the same port
 * passes the first one's `port` to the second.
 */
export async function startServer(bin, extraArgs = [], wait = 10_000, port = 0) {
  await access(bin, constants.X_OK).catch(() => {
    throw new Error(`${bin} is missing: build it first (cargo build --bin jssocket)`);
  });
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([key]) => !key.startsWith('SOCKET_')),
  );
  env.RUST_LOG = 'info';
  const child = spawn(bin, ['-h', '127.0.0.1', '-p', String(port), ...extraArgs], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`jssocket did not report its address in time:\n${log}`)),
      wait,
    );
    const onData = (chunk) => {
      log += chunk;
      const plain = log.replace(/\x1b\[[0-9;]*m/g, '');
      const found = /"listening".*?"addr":"(127\.0\.0\.1:\d+)"/.exec(plain) ||
        /listening.*?(127\.0\.0\.1:\d+)/.exec(plain);
      if (found) {
        clearTimeout(timer);
        resolve(found[1]);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`jssocket exited (${code}) before listening:\n${log}`));
    });
  });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  return {
    base: `http://${addr}`,
    ws: `ws://${addr}`,
    port: Number(addr.split(':')[1]),
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(timer);
    },
  };
}
