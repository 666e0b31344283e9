"""In-process UDP unit tests' shared parts: `Env` (one uvloop loop plus everything to clean
up), `EchoUpstream` (a UDP upstream in that loop), `CountingLimit` (a per-IP limit that
records its calls), and the address families V4 / V6."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import uvloop

from helpers.unit import ListHandler, run_loop_until

V4, V6 = socket.AF_INET, socket.AF_INET6


class Env:
    """One loop plus everything to clean up."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.loop_errors = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.socks = []
        self.readers = []
        self.services = []
        self.handler = ListHandler()
        self.log = logging.getLogger('test.udp.%d' % id(self))
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self.handler)

    def udp(self, family, addr, reuseport=False, v6only=True):
        s = socket.socket(family, socket.SOCK_DGRAM)
        self.socks.append(s)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == V6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 1 << 20)
        s.setblocking(False)
        s.bind(addr)
        return s

    def add_reader(self, sock, cb):
        self.loop.add_reader(sock.fileno(), cb)
        self.readers.append(sock.fileno())

    def run_until(self, cond, timeout=5.0, what='condition'):
        run_loop_until(self.loop, cond, timeout, what, step=0.005)

    def run_for(self, seconds):
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def recv(self, client, timeout=5.0):
        """The next datagram on a client socket (data, from), within `timeout`."""
        box = []

        def ready():
            try:
                box.append(client.recvfrom(70000))
            except BlockingIOError:
                return False
            return True
        self.run_until(ready, timeout, 'a reply')
        return box[0]

    def nothing(self, client, seconds=0.2):
        """Assert no datagram reaches `client` for `seconds`."""
        self.run_for(seconds)
        with pytest.raises(BlockingIOError):
            client.recvfrom(70000)

    def close(self):
        for svc in self.services:
            svc.close()
        for fd in self.readers:
            self.loop.remove_reader(fd)
        for s in self.socks:
            s.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.log.removeHandler(self.handler)


class EchoUpstream:
    """Answers each datagram `copies` times; copies=0 only records. Datagrams that start with
    b'mute' are only recorded (a client whose session never gets a reply)."""

    def __init__(self, env, family=V4, host='127.0.0.1', port=0, copies=1):
        self.sock = env.udp(family, (host, port))
        self.addr = self.sock.getsockname()
        self.got = []                   # (data, source address)
        self.copies = copies
        env.add_reader(self.sock, self._read)

    def _read(self):
        for _ in range(64):
            try:
                data, src = self.sock.recvfrom(70000)
            except BlockingIOError:
                return
            self.got.append((data, src))
            if not data.startswith(b'mute'):
                self.answer(data, src)

    def answer(self, data: bytes, src) -> None:
        """What it sends back to `src` for `data` (a subclass may answer otherwise)."""
        for _ in range(self.copies):
            self.sock.sendto(data, src)

    def source_of(self, data):
        """The upstream-side source address (the session) the last `data` came from."""
        return [src for d, src in self.got if d == data][-1]

    def sources(self):
        return [src for _, src in self.got]


class CountingLimit:
    """A PerIpLimit in one process: at most `limit` sessions per IP; records every call."""

    def __init__(self, limit):
        self.limit = limit
        self.held = {}
        self.calls = []

    def acquire(self, ip):
        ok = self.held.get(ip, 0) < self.limit
        self.calls.append(('acquire', ip, ok))
        if ok:
            self.held[ip] = self.held.get(ip, 0) + 1
        return ok

    def adopt(self, ip):
        self.calls.append(('adopt', ip))
        self.held[ip] = self.held.get(ip, 0) + 1

    def release(self, ip):
        self.calls.append(('release', ip))
        assert self.held.get(ip, 0) > 0, 'release without acquire'
        self.held[ip] -= 1


class Clock:
    """A clock a test moves by hand, for a service's idle and talking decisions (its sweep
    timer still runs on the loop, so a sweep comes within one period of real time)."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
