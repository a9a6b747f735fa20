#!/usr/bin/env python3
"""Connection-holding clients for bench/soak.sh (Python 3 standard library only).

Two kinds of clients, on one thread with one selector:

- idle: connect, send one keep-alive GET, read the response, then hold the connection without a
  further request until the gateway closes it (server.idle_timeout, 60 s by default), and
  reconnect after a short random pause. The time each connection was held is recorded: it
  should be close to idle_timeout.
- slow: POST with a Content-Length the body never reaches. One byte every --slow-gap seconds
  for --slow-bytes bytes (a slow body that is still moving: the gateway must not cut it), then
  nothing; the gateway should answer 408 once --body-timeout has passed since the last byte.
  Then reconnect. A response during the trickle phase is counted as "early".

Every connection, and the whole run, is bounded in time. Statistics are written as JSON to
--stats once a second (atomically) and at the end. Stops after --duration seconds or on
SIGTERM/SIGINT and exits 0; socket errors are counted, never fatal.
"""

import argparse
import errno
import heapq
import json
import os
import random
import selectors
import signal
import socket
import time

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Conn:
    __slots__ = ("kind", "idx", "sock", "state", "inbuf", "out", "since", "sent", "next_at")

    def __init__(self, kind, idx):
        self.kind = kind
        self.idx = idx
        self.sock = None
        self.state = "down"
        self.inbuf = b""
        self.out = b""
        self.since = 0.0  # when the current state began
        self.sent = 0  # body bytes sent (slow)
        self.next_at = 0.0  # next body byte (slow)


def parse_response(buf):
    """(status, complete) for an HTTP/1.1 response in buf, or None while the head is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    try:
        status = int(head[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return (0, True)
    length, chunked = None, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip() or 0)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    body = buf[end + 4:]
    if status in (204, 304) or 100 <= status < 200:
        return (status, True)
    if chunked:
        return (status, body.endswith(b"0\r\n\r\n"))
    if length is not None:
        return (status, len(body) >= length)
    return (status, False)  # until close


class Stats:
    def __init__(self):
        self.counters = {}
        self.series = {}  # name -> [n, sum, min, max]

    def inc(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def observe(self, name, value):
        s = self.series.setdefault(name, [0, 0.0, float("inf"), 0.0])
        s[0] += 1
        s[1] += value
        s[2] = min(s[2], value)
        s[3] = max(s[3], value)

    def to_json(self):
        return {
            name: {"n": n, "mean": round(total / n, 2), "min": round(lo, 2), "max": round(hi, 2)}
            for name, (n, total, lo, hi) in self.series.items()
        }


class Clients:
    def __init__(self, args):
        self.args = args
        self.addr = (args.host, args.port)
        self.sel = selectors.DefaultSelector()
        self.stats = Stats()
        self.timers = []  # heap of (time, seq, conn): reconnects
        self.seq = 0
        self.conns = [Conn("idle", i) for i in range(args.idle)]
        self.conns += [Conn("slow", i) for i in range(args.slow)]
        self.get = (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            "Accept: application/json\r\n\r\n"
        ).encode()
        self.post_head = (
            f"POST {args.post_path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {args.slow_bytes + 64}\r\n\r\n"
        ).encode()

    # --- connection life cycle ------------------------------------------------------------
    def schedule(self, conn, at):
        self.seq += 1
        heapq.heappush(self.timers, (at, self.seq, conn))

    def close(self, conn, now, reason, delay):
        if conn.sock is not None:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None
        if reason:
            self.stats.inc(f"{conn.kind}_{reason}")
        conn.state = "down"
        conn.inbuf = b""
        conn.out = b""
        self.schedule(conn, now + delay)

    def connect(self, conn, now):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock, conn.state, conn.since = s, "connecting", now
        conn.inbuf, conn.out, conn.sent = b"", b"", 0
        self.stats.inc(f"{conn.kind}_connects")
        rc = s.connect_ex(self.addr)
        if rc not in (0, errno.EINPROGRESS):
            conn.sock = None
            s.close()
            self.stats.inc(f"{conn.kind}_connect_error")
            self.schedule(conn, now + 1.0)
            return
        self.sel.register(s, WRITE, conn)

    def send(self, conn, data, now):
        conn.out += data
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self.close(conn, now, "send_error", 1.0)
            return False
        conn.out = conn.out[n:]
        self.sel.modify(conn.sock, READ | (WRITE if conn.out else 0), conn)
        return True

    def on_connected(self, conn, now):
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close(conn, now, "connect_error", 1.0)
            return
        conn.since = now
        if conn.kind == "idle":
            conn.state = "reading"
            self.send(conn, self.get, now)
        else:
            conn.state = "trickle"
            conn.next_at = now + self.args.slow_gap
            self.send(conn, self.post_head, now)

    def on_readable(self, conn, now):
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close(conn, now, "reset", 1.0)
            return
        if not data:
            self.on_eof(conn, now)
            return
        if conn.state == "idle":  # nothing was asked
            self.close(conn, now, "unexpected_data", 1.0)
            return
        conn.inbuf += data
        parsed = parse_response(conn.inbuf)
        if parsed is None or not parsed[1]:
            return
        status = parsed[0]
        if conn.kind == "idle":
            self.stats.inc(f"idle_status_{status}")
            conn.state, conn.since, conn.inbuf = "idle", now, b""
            self.sel.modify(conn.sock, READ, conn)
            return
        # slow: the gateway answered before the body was complete
        if conn.state == "trickle":
            self.stats.inc(f"slow_early_status_{status}")
        else:
            self.stats.inc(f"slow_status_{status}")
            if status == 408:
                self.stats.observe("slow_408_after_last_byte_s", now - conn.since)
        self.close(conn, now, None, 0.5 + random.random())

    def on_eof(self, conn, now):
        if conn.kind == "idle" and conn.state == "idle":
            self.stats.inc("idle_closed_by_gateway")
            self.stats.observe("idle_held_s", now - conn.since)
            self.close(conn, now, None, random.uniform(0.05, self.args.reconnect_jitter))
        elif conn.kind == "idle":
            self.close(conn, now, "eof_before_response", 1.0)
        else:
            self.close(conn, now, f"eof_in_{conn.state}", 1.0)

    def on_tick(self, conn, now):
        """Timers of a live connection: the slow body's bytes, and every state's deadline."""
        if conn.kind == "slow" and conn.state == "trickle" and now >= conn.next_at:
            if self.send(conn, b"x", now):
                conn.sent += 1
                conn.since = now
                if conn.sent >= self.args.slow_bytes:
                    conn.state = "stalled"  # since = the last byte
                else:
                    conn.next_at = now + self.args.slow_gap
            return
        limit = {
            "connecting": 10.0,
            "reading": 30.0,
            "idle": self.args.idle_limit,
            "stalled": self.args.body_timeout + 30.0,
        }.get(conn.state)
        if limit is not None and now - conn.since > limit:
            self.close(conn, now, f"timeout_in_{conn.state}", 1.0)

    # --- the loop --------------------------------------------------------------------------
    def write_stats(self, now, start, final=False):
        open_by = {"idle": 0, "slow": 0}
        held_by = {"idle": 0, "slow": 0}
        for c in self.conns:
            if c.sock is not None:
                open_by[c.kind] += 1
                if c.state in ("idle", "trickle", "stalled"):
                    held_by[c.kind] += 1
        doc = {
            "elapsed": round(now - start, 1),
            "final": final,
            "idle_open": open_by["idle"],
            "idle_held": held_by["idle"],
            "slow_open": open_by["slow"],
            "counters": dict(sorted(self.stats.counters.items())),
            "series": self.stats.to_json(),
        }
        tmp = self.args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.args.stats)

    def run(self):
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        start = time.monotonic()
        end = start + self.args.duration
        # Spread the first connections over the ramp (the listen backlog is finite).
        for i, conn in enumerate(self.conns):
            self.schedule(conn, start + i / self.args.ramp)
        next_stats = start
        next_tick = start
        while not stop:
            now = time.monotonic()
            if now >= end:
                break
            wait = min(0.2, max(0.0, (self.timers[0][0] - now) if self.timers else 0.2))
            for key, mask in self.sel.select(wait):
                conn = key.data
                now = time.monotonic()
                if conn.state == "connecting":
                    if mask & WRITE:
                        self.on_connected(conn, now)
                    continue
                if mask & WRITE and conn.out:
                    self.send(conn, b"", now)
                    if conn.sock is None:
                        continue
                if mask & READ:
                    self.on_readable(conn, now)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, conn = heapq.heappop(self.timers)
                if conn.sock is None:
                    self.connect(conn, now)
            if now >= next_tick:
                for conn in self.conns:
                    if conn.sock is not None:
                        self.on_tick(conn, now)
                next_tick = now + 0.25
            if now >= next_stats:
                self.write_stats(now, start)
                next_stats = now + 1.0
        now = time.monotonic()
        for conn in self.conns:
            if conn.sock is not None:
                self.sel.unregister(conn.sock)
                conn.sock.close()
                conn.sock = None
        self.write_stats(now, start, final=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--idle", type=int, default=2000, help="idle keep-alive connections")
    p.add_argument("--slow", type=int, default=20, help="slow-body clients")
    p.add_argument("--duration", type=float, required=True, help="seconds, then stop")
    p.add_argument("--stats", required=True, help="JSON statistics file")
    p.add_argument("--path", default="/api/v1/fresh", help="the idle clients' one GET")
    p.add_argument("--post-path", default="/api/v1/fresh", help="the slow clients' POST")
    p.add_argument("--ramp", type=float, default=400.0, help="new connections per second at start")
    p.add_argument("--slow-gap", type=float, default=5.0, help="seconds between body bytes")
    p.add_argument("--slow-bytes", type=int, default=8, help="body bytes trickled, then a stall")
    p.add_argument("--body-timeout", type=float, default=30.0, help="the gateway's body_timeout")
    p.add_argument("--idle-limit", type=float, default=150.0,
                   help="close an idle connection the gateway kept longer than this (counted)")
    p.add_argument("--reconnect-jitter", type=float, default=2.0)
    args = p.parse_args()
    if args.duration <= 0 or args.ramp <= 0 or args.slow_gap <= 0 or args.slow_bytes < 1:
        p.error("duration, ramp and slow-gap must be positive, slow-bytes at least 1")
    Clients(args).run()


if __name__ == "__main__":
    main()
