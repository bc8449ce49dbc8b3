#!/usr/bin/env python3
"""Bad-input sender for scripts/soak.sh: keeps a few connections that send malformed messages
to a jssocket server until it closes them, then reconnects. Counts what it sent and how the
server answered. Prints one JSON line of figures at the end (SIGTERM/SIGINT or --seconds).

Usage: soak_bad_input.py URL SECONDS [--conns N] [--rate MSGS_PER_SEC] [--max-size BYTES]
"""
import argparse
import asyncio
import json
import random
import signal
import time

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

BAD_TEXT = [
    "not json",
    "",
    "[1,2,3]",
    '"a string"',
    "42",
    "{}",
    '{"data":{}}',
    '{"type":7,"data":{}}',
    '{"type":"notify_client","data":"x"}',
    '{"type":"notify_client","data":{"target":5}}',
    '{"type":"client_connected","data":{}}',
    '{"type":"client_connect","data":[1]}',
    '{"type":"notify_group","data":{"target":[],"data":1}}',
    '{"type":"server_connect","data":{"auth":123}}',
    '{"type":',
    "{" * 200,
    '{"type":"notify_all","data":' + "[" * 300 + "]" * 300 + "}",
    '{"type":"\\ud800","data":{}}',
]
# Not bad input (must stay harmless): unknown type, refused notify from an unacknowledged client.
HARMLESS = [
    '{"type":"no_such_event","data":{}}',
    '{"type":"notify_client","data":{"data":1}}',
]


class Stats:
    def __init__(self):
        self.connects = 0
        self.refused = 0
        self.sent = 0
        self.errors_received = 0
        self.other_received = 0
        self.closes = {}
        self.exceptions = {}

    def close(self, code):
        key = str(code)
        self.closes[key] = self.closes.get(key, 0) + 1

    def exc(self, e):
        key = type(e).__name__
        self.exceptions[key] = self.exceptions.get(key, 0) + 1


async def reader(ws, stats):
    try:
        async for message in ws:
            try:
                value = json.loads(message)
            except ValueError:
                stats.other_received += 1
                continue
            if isinstance(value, dict) and value.get("type") == "error":
                stats.errors_received += 1
            else:
                stats.other_received += 1
    except ConnectionClosed:
        pass


async def one_connection(url, stats, interval, max_size, stop):
    rng = random.Random()
    while not stop.is_set():
        try:
            async with websockets.connect(url, max_size=None, open_timeout=10,
                                          close_timeout=2, ping_interval=None) as ws:
                stats.connects += 1
                task = asyncio.create_task(reader(ws, stats))
                try:
                    while not stop.is_set():
                        r = rng.random()
                        if r < 0.80:
                            await ws.send(rng.choice(BAD_TEXT))
                        elif r < 0.90:
                            await ws.send(rng.choice(HARMLESS))
                        elif r < 0.98:
                            await ws.send(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))))
                        elif r < 0.99:
                            # Oversized: the server closes with 1009.
                            await ws.send("x" * (max_size + 1))
                        else:
                            # Invalid UTF-8 in a text frame: the server closes with 1007.
                            await ws.send(b"\xff\xfe", text=True)
                        stats.sent += 1
                        await asyncio.sleep(interval)
                except ConnectionClosed:
                    pass
                if stop.is_set():
                    await ws.close()
                await asyncio.wait_for(task, 5)
                stats.close(ws.close_code)
        except InvalidStatus:
            stats.refused += 1
            await asyncio.sleep(0.5)
        except Exception as e:  # noqa: BLE001 - a soak records every failure and goes on
            stats.exc(e)
            await asyncio.sleep(0.5)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("seconds", type=float)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--rate", type=float, default=20.0, help="messages per second, all connections")
    p.add_argument("--max-size", type=int, default=65536)
    a = p.parse_args()
    stats = Stats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    interval = a.conns / a.rate
    t0 = time.monotonic()
    tasks = [asyncio.create_task(one_connection(a.url, stats, interval, a.max_size, stop))
             for _ in range(a.conns)]
    try:
        await asyncio.wait_for(stop.wait(), a.seconds)
    except asyncio.TimeoutError:
        stop.set()
    await asyncio.wait(tasks, timeout=10)
    print(json.dumps({
        "scenario": "bad_input",
        "seconds": round(time.monotonic() - t0, 1),
        "connects": stats.connects,
        "refused": stats.refused,
        "bad_messages_sent": stats.sent,
        "error_replies": stats.errors_received,
        "other_replies": stats.other_received,
        "closes_by_code": stats.closes,
        "exceptions": stats.exceptions,
    }), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
