#!/usr/bin/env python3
"""Redis instructions per check of the batch script, counted by callgrind inside a
private redis-server: exact where timings on a shared VM move by ±30 %.

    scripts/redis-callgrind.py [--rev REV ...] [--batch N ...] [--calls K]

For each script version (the working tree, and each git REV given) and each batch size N
(default 1, 16 and 128 requests of one fixed-window key each, 1 024 distinct users), it
loads src/store/lua/algorithms.lua + batch.lua as the store does, sends K calls once so
every key exists, zeroes callgrind's counters, sends the same K calls again (each
request now a later one in its user's window, as in steady state: `SET ... KEEPTTL`),
dumps the counters and prints instructions per check. Redis's own parsing, the script,
its `redis.call`s and the reply all count; the kernel (socket calls) does not.

Needs valgrind and redis-server. The server listens on a free loopback port (never
6379), runs under `timeout`, and is shut down by this script; nothing else is touched.
"""

import argparse
import glob
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LUA = ("src/store/lua/algorithms.lua", "src/store/lua/batch.lua")


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.buf = b""

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill(len(self.buf) + 1)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            self._fill(n + 2)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError("unexpected reply %r" % line)

    def call(self, *args):
        self.sock.sendall(resp(*args))
        return self.read()

    def pipeline(self, commands, depth=16):
        for i in range(0, len(commands), depth):
            part = commands[i:i + depth]
            self.sock.sendall(b"".join(part))
            for _ in part:
                self.read()


def script_text(rev):
    if rev is None:
        return "".join(open(os.path.join(ROOT, p)).read() for p in LUA)
    return "".join(
        subprocess.run(["git", "-C", ROOT, "show", "%s:%s" % (rev, p)],
                       check=True, capture_output=True, text=True).stdout
        for p in LUA)


def batch(sha, n, first_user):
    """One EVALSHA of `n` one-key fixed-window requests, as batch::encode builds it."""
    keys = [b"rl:fw:u:60:1000000000:{=user-%07d}" % ((first_user + i) % 1024)
            for i in range(n)]
    # Each request's key is its own index (1-based): KEYS holds each key once.
    packed = b"".join(struct.pack("<BBI", 1, 1, 1) + struct.pack("<HId", i + 1, 10**9, 60e6)
                      for i in range(n))
    return resp("EVALSHA", sha, n, *keys, -1, n, packed)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", action="append", default=[],
                    help="also measure the script at this git revision")
    ap.add_argument("--batch", type=int, action="append",
                    help="requests per call (repeatable; default 1, 16, 128)")
    ap.add_argument("--calls", type=int, default=40, help="calls per measurement")
    args = ap.parse_args()
    sizes = args.batch or [1, 16, 128]
    if not all(1 <= n <= 1024 for n in sizes) or not 1 <= args.calls <= 1000:
        sys.exit("redis-callgrind: batches of 1 to 1024 requests, 1 to 1000 calls")
    versions = [("working tree", None)] + [(rev, rev) for rev in args.rev]
    texts = [(name, script_text(rev)) for name, rev in versions]

    port = free_port()
    assert port != 6379
    work = tempfile.mkdtemp(prefix="redis-callgrind.")
    out = os.path.join(work, "callgrind.out")
    server = subprocess.Popen(
        ["timeout", "1800", "valgrind", "--tool=callgrind",
         "--callgrind-out-file=" + out + ".%p",
         "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = None
        for _ in range(300):
            try:
                conn = Conn(port)
                conn.call("PING")
                break
            except OSError:
                time.sleep(0.1)
        if conn is None:
            sys.exit("redis-callgrind: redis-server under valgrind did not start")
        # valgrind's pid is the child of `timeout`; callgrind_control addresses it.
        valgrind = int(open("/proc/%d/task/%d/children" % (server.pid, server.pid))
                       .read().split()[0])
        print("%-14s %8s %18s" % ("script", "batch", "instructions/check"))
        for name, text in texts:
            sha = conn.call("SCRIPT", "LOAD", text).decode()
            for n in sizes:
                conn.call("FLUSHALL")
                calls = [batch(sha, n, j * n) for j in range(args.calls)]
                conn.pipeline(calls)
                subprocess.run(["callgrind_control", "--zero", str(valgrind)],
                               check=True, capture_output=True)
                conn.pipeline(calls)
                for f in glob.glob(out + ".*"):
                    os.remove(f)
                subprocess.run(["callgrind_control", "--dump", str(valgrind)],
                               check=True, capture_output=True)
                total = 0
                for f in glob.glob(out + ".*"):
                    for line in open(f):
                        if line.startswith("summary:"):
                            total += int(line.split()[1])
                print("%-14s %8d %18d" % (name, n, total // (args.calls * n)))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for f in glob.glob(os.path.join(work, "*")):
            os.remove(f)
        os.rmdir(work)


if __name__ == "__main__":
    main()
