#!/usr/bin/env python3
"""Load generator and echo backend for mpproxy's load tests and `scripts/soak`.

It runs in its own process on uvloop (a test starts it with `subprocess`, so it never
competes with pytest for the GIL), talks only to loopback addresses, is bounded in time
(`--duration` plus a grace period, and a watchdog past that), and prints one JSON summary
line on stdout when it ends::

    python tests/loadgen.py --duration 30 \\
        --tcp-rate 500 --tcp-target 127.0.0.1:8000 \\
        --streams 20 --stream-target 127.0.0.1:8000 \\
        --udp-clients 10 --udp-target 127.0.0.1:8001 --udp-interval 10ms \\
        --status-file /tmp/load.json
    python tests/loadgen.py --echo-backend 127.0.0.1:9000 --echo-backend 127.0.0.1:9001 \\
        --status-file /tmp/backend.json

Load modes (any combination in one process):

- TCP rate: N new connections per second, paced in 10 ms ticks. Each sends 16-4096
  random bytes (with `--tcp-hold`, half of them, a random 0..HOLD pause, the rest: more
  connections are open at any moment, each one mid-request), half-closes, reads to EOF
  and compares. Outcomes: ok, connect_refused,
  connect_timeout, connect_error, reset, broken_pipe, empty (EOF before any byte: the
  proxy closed an accepted connection), truncated, corrupt, timeout (`--tcp-timeout` for
  the whole exchange). Concurrency is capped; a connection due while at the cap is
  `skipped` (the generator could not keep the rate).
- Streams: K long-lived connections, each sending a deterministic pseudo-random byte
  stream in chunks (paced by `--stream-rate`, at most `--stream-window` bytes unechoed)
  and checking every echoed byte in order. At the end each stream half-closes and must
  get EOF after all its bytes. Per stream: outcome (clean, reset, eof_early = closed by
  the peer before all bytes came back, corrupt, timeout = no EOF within the grace period,
  connect_failed, error), bytes sent and received, when it ended, the longest gap
  between two reads while running.
- UDP: M clients (one connected socket each) each sending a sequence-numbered datagram
  every `--udp-interval`; a reply is matched by sequence number; no reply within
  `--udp-timeout` is lost (a reply after that is late). If replies are 2 bytes longer
  than requests, those 2 bytes are the source port the backend saw (this file's echo
  backend does that): the distinct ports per client tell whether a client's upstream
  session (its source port towards the backend) changed.

Echo backend (`--echo-backend HOST:PORT`, repeatable): TCP echo with flow control that
answers FIN with FIN, and a UDP echo on the same address that prefixes each reply with
the client's source port (2 bytes, network order). It runs until SIGTERM/SIGINT (or
`--duration` if given), keeps per-address counters in `--status-file` (rewritten
atomically every 0.25 s) and prints them as its summary.

SIGTERM/SIGINT end a load run early, gracefully (as at the end of `--duration`); a second
one prints the summary so far and exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import time

import uvloop

TICK = 0.01                      # pacing period of the TCP rate and of status checks
STATUS_INTERVAL = 0.25
PATTERN_LEN = (1 << 20) + 7      # period of the streams' byte pattern (not a chunk multiple)
READ_SIZE = 65536
UDP_MAGIC = b'LG'
UDP_HEADER = struct.Struct('!2sIQ')   # magic, client id, sequence number
UDP_PORT = struct.Struct('!H')
MAX_ERROR_SAMPLES = 20
WATCHDOG_SLACK = 15.0            # past duration + grace + this, exit whatever happens


# -- arguments ---------------------------------------------------------------------------

def duration(text: str) -> float:
    """'10ms', '1.5s', '2m' or a number of seconds."""
    t = str(text).strip()
    for suffix, scale in (('ms', 0.001), ('s', 1.0), ('m', 60.0)):
        if t.endswith(suffix):
            t, mult = t[:-len(suffix)], scale
            break
    else:
        mult = 1.0
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a duration: {text!r}') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'negative duration: {text!r}')
    return value


def loopback(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' with a loopback IP: this tool never leaves the host."""
    host, sep, port = text.rpartition(':')
    if not sep:
        raise argparse.ArgumentTypeError(f'not host:port: {text!r}')
    host = host.strip('[]') or '127.0.0.1'
    try:
        ip = ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not an IP address and port: {text!r}') from None
    if not ip.is_loopback:
        raise argparse.ArgumentTypeError(f'only loopback addresses are allowed: {text!r}')
    if not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f'port must be 1-65535: {text!r}')
    return host, number


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--duration', type=duration, default=None,
                   help='run this long (load: default 10s; backend: until a signal)')
    p.add_argument('--grace', type=duration, default=10.0,
                   help='after the duration, how long streams may take to end cleanly')
    p.add_argument('--status-file', default=None, help='JSON counters, rewritten every 0.25 s')
    p.add_argument('--seed', type=int, default=None)
    g = p.add_argument_group('TCP connection rate')
    g.add_argument('--tcp-rate', type=float, default=0.0, help='new connections per second')
    g.add_argument('--tcp-target', type=loopback)
    g.add_argument('--tcp-min', type=int, default=16, help='smallest request, bytes')
    g.add_argument('--tcp-max', type=int, default=4096, help='largest request, bytes')
    g.add_argument('--tcp-timeout', type=duration, default=5.0, help='per connection, all of it')
    g.add_argument('--tcp-hold', type=duration, default=0.0,
                   help='pause a random 0..HOLD in the middle of each request')
    g.add_argument('--tcp-concurrency', type=int, default=512)
    g = p.add_argument_group('long-lived TCP streams')
    g.add_argument('--streams', type=int, default=0)
    g.add_argument('--stream-target', type=loopback)
    g.add_argument('--stream-chunk', type=int, default=16384)
    g.add_argument('--stream-rate', type=float, default=128 * 1024,
                   help='bytes per second per stream (0 = as fast as the window allows)')
    g.add_argument('--stream-window', type=int, default=256 * 1024,
                   help='at most this many bytes sent and not yet echoed')
    g = p.add_argument_group('UDP clients')
    g.add_argument('--udp-clients', type=int, default=0)
    g.add_argument('--udp-target', type=loopback)
    g.add_argument('--udp-interval', type=duration, default=0.01)
    g.add_argument('--udp-timeout', type=duration, default=1.0, help='a reply later than this is lost')
    g.add_argument('--udp-size', type=int, default=64, help='datagram size, >= 14 bytes')
    g = p.add_argument_group('echo backend')
    g.add_argument('--echo-backend', type=loopback, action='append', default=[],
                   help='serve TCP and UDP echo on HOST:PORT (repeatable)')
    args = p.parse_args(argv)
    if args.echo_backend:
        if args.tcp_rate or args.streams or args.udp_clients:
            p.error('--echo-backend runs alone')
        return args
    for mode, target in (('tcp_rate', 'tcp_target'), ('streams', 'stream_target'),
                         ('udp_clients', 'udp_target')):
        if getattr(args, mode) and getattr(args, target) is None:
            p.error(f'--{mode.replace("_", "-")} needs --{target.replace("_", "-")}')
    if not (args.tcp_rate or args.streams or args.udp_clients):
        p.error('nothing to do: give --tcp-rate, --streams, --udp-clients or --echo-backend')
    if not 1 <= args.tcp_min <= args.tcp_max:
        p.error('need 1 <= --tcp-min <= --tcp-max')
    if not 0 < args.stream_chunk <= READ_SIZE or args.stream_window < args.stream_chunk:
        p.error(f'need 0 < --stream-chunk <= {READ_SIZE} and --stream-window >= --stream-chunk')
    if args.udp_size < UDP_HEADER.size:
        p.error(f'--udp-size must be >= {UDP_HEADER.size}')
    if args.udp_clients and args.udp_interval <= 0:
        p.error('--udp-interval must be > 0')
    if args.duration is None:
        args.duration = 10.0
    return args


def write_status(path: str | None, status: dict) -> None:
    if not path:
        return
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(status, f, separators=(',', ':'))
    os.replace(tmp, path)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {'p50': None, 'p99': None, 'max': None}
    values = sorted(values)
    pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))], 2)  # noqa: E731
    return {'p50': pick(0.5), 'p99': pick(0.99), 'max': round(values[-1], 2)}


# -- TCP: a paced rate of short connections ----------------------------------------------

class TcpRate:
    OUTCOMES = ('ok', 'connect_refused', 'connect_timeout', 'connect_error', 'reset',
                'broken_pipe', 'empty', 'truncated', 'corrupt', 'timeout')

    def __init__(self, args, rng: random.Random):
        self.host, self.port = args.tcp_target
        self.rate = args.tcp_rate
        self.min, self.max = args.tcp_min, args.tcp_max
        self.timeout = args.tcp_timeout
        self.hold = args.tcp_hold
        self.cap = args.tcp_concurrency
        self.rng = rng
        self.counts = dict.fromkeys(self.OUTCOMES, 0)
        self.started = 0
        self.skipped = 0
        self.max_inflight = 0
        self.inflight: set[asyncio.Task] = set()
        self.latencies: list[float] = []       # ms, ok connections only
        self.errors: list[str] = []
        self.began = self.ended = None

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self.began = loop.time()
        while not stop.is_set():
            due = int((loop.time() - self.began) * self.rate) - self.started - self.skipped
            for _ in range(max(0, due)):
                if len(self.inflight) >= self.cap:
                    self.skipped += 1
                    continue
                task = loop.create_task(self._one())
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
                self.started += 1
            self.max_inflight = max(self.max_inflight, len(self.inflight))
            await asyncio.sleep(TICK)
        self.ended = loop.time()
        if self.inflight:                      # each one is bounded by its own timeout
            await asyncio.wait(set(self.inflight))

    def _note(self, outcome: str, detail: str | None = None, port: int | None = None) -> None:
        self.counts[outcome] += 1
        if outcome != 'ok' and len(self.errors) < MAX_ERROR_SAMPLES:
            where = f' (local port {port})' if port else ''
            self.errors.append(f'{outcome}: {detail}{where}' if detail else f'{outcome}{where}')

    async def _one(self) -> None:
        size = self.rng.randint(self.min, self.max)
        payload = self.rng.randbytes(size)
        t0 = time.monotonic()       # loop.time() has a 1 ms resolution on uvloop
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
        except ConnectionRefusedError:
            return self._note('connect_refused')
        except TimeoutError:
            return self._note('connect_timeout')
        except OSError as exc:
            return self._note('connect_error', repr(exc))
        outcome, detail = 'ok', None
        local_port = writer.get_extra_info('sockname')[1]
        got = bytearray()
        try:
            async with asyncio.timeout(max(0.001, self.timeout - (time.monotonic() - t0))):
                if self.hold:             # half the request, a pause, the rest
                    writer.write(payload[:size // 2])
                    await asyncio.sleep(self.rng.uniform(0, self.hold))
                    writer.write(payload[size // 2:])
                else:
                    writer.write(payload)
                writer.write_eof()
                while len(got) <= size:
                    chunk = await reader.read(READ_SIZE)
                    if not chunk:
                        break
                    got += chunk
            if got == payload:
                self.latencies.append((time.monotonic() - t0) * 1000)
            elif not got:
                outcome = 'empty'
            elif len(got) < size and payload.startswith(got):
                outcome, detail = 'truncated', f'{len(got)} of {size} bytes'
            else:
                outcome, detail = 'corrupt', f'{len(got)} bytes for {size}'
        except TimeoutError:
            outcome, detail = 'timeout', f'{len(got)} of {size} bytes'
        except ConnectionResetError:
            outcome, detail = 'reset', f'after {len(got)} of {size} bytes'
        except BrokenPipeError:
            outcome = 'broken_pipe'
        except OSError as exc:
            outcome, detail = 'reset', repr(exc)
        finally:
            if outcome == 'ok':
                writer.close()
            else:
                writer.transport.abort()
        self._note(outcome, detail, local_port)

    def failures(self) -> int:
        return sum(n for k, n in self.counts.items() if k != 'ok')

    def summary(self) -> dict:
        span = ((self.ended or asyncio.get_running_loop().time()) - self.began) if self.began else 0
        return {'target': f'{self.host}:{self.port}', 'rate': self.rate, 'started': self.started,
                **self.counts, 'failed': self.failures(), 'skipped': self.skipped,
                'rate_achieved': round(self.started / span, 1) if span > 0 else 0.0,
                'max_inflight': self.max_inflight, 'latency_ms': percentiles(self.latencies),
                'errors': self.errors}


# -- TCP: long-lived streams -------------------------------------------------------------

class Stream:
    """One long-lived connection sending a pattern and checking its echo in order.

    ::

        connecting ──▶ running ──stop: FIN sent──▶ ending ──EOF after every byte──▶ clean
            │             │                          │
            ▼             └──── RST / early EOF / wrong byte / no EOF in grace ─────▶ reset,
        connect_failed                                                               eof_early,
                                                                                     corrupt, timeout
    """

    def __init__(self, index: int, args, pattern: bytes):
        self.index = index
        self.host, self.port = args.stream_target
        self.chunk = args.stream_chunk
        self.rate = args.stream_rate
        self.window = args.stream_window
        self.pattern = pattern
        self.offset = (index * 104729) % PATTERN_LEN
        self.state = 'connecting'
        self.outcome: str | None = None
        self.detail: str | None = None
        self.local_port: int | None = None
        self.sent = 0
        self.received = 0
        self.eof_sent = False
        self.max_gap = 0.0
        self.ended_at: float | None = None     # wall clock, to compare with a test's events
        self.progress = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None

    def expected(self, pos: int, n: int) -> bytes:
        start = (self.offset + pos) % PATTERN_LEN
        return self.pattern[start:start + n]

    def _end(self, outcome: str, detail: str | None = None) -> None:
        if self.outcome is None:
            self.outcome, self.detail = outcome, detail
            self.state = outcome
            self.ended_at = time.time()
        self.progress.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), 5.0)
        except (OSError, TimeoutError) as exc:
            return self._end('connect_failed', repr(exc))
        self.writer = writer
        self.local_port = writer.get_extra_info('sockname')[1]
        self.state = 'running'
        receiver = asyncio.ensure_future(self._receive(reader))
        sender = asyncio.ensure_future(self._send(writer, stop))
        try:
            await receiver
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            if self.outcome is None:
                self._end('timeout', f'no EOF: {self.received} of {self.sent} bytes back')
            if self.outcome == 'clean':
                writer.close()
            else:
                writer.transport.abort()

    async def _send(self, writer: asyncio.StreamWriter, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            while not stop.is_set() and self.outcome is None:
                if self.sent - self.received + self.chunk > self.window:
                    self.progress.clear()
                    await self.progress.wait()
                    continue
                writer.write(self.expected(self.sent, self.chunk))
                self.sent += self.chunk
                await writer.drain()
                if self.rate > 0:
                    delay = t0 + self.sent / self.rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
            if self.outcome is None:
                writer.write_eof()
                self.eof_sent = True
                self.state = 'ending'
        except OSError:
            pass                  # the receiver sees the same RST or EOF and names the outcome

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        try:
            while self.outcome is None:
                data = await reader.read(READ_SIZE)
                now = loop.time()
                if not data:
                    if self.eof_sent and self.received == self.sent:
                        self._end('clean')
                    else:
                        self._end('eof_early', f'EOF after {self.received} of {self.sent} bytes'
                                               f'{" (our FIN sent)" if self.eof_sent else ""}')
                    return
                if self.received + len(data) > self.sent or data != self.expected(self.received, len(data)):
                    self._end('corrupt', f'wrong bytes at offset {self.received}')
                    return
                if self.state == 'running':
                    self.max_gap = max(self.max_gap, now - last)
                last = now
                self.received += len(data)
                self.progress.set()
        except ConnectionResetError:
            self._end('reset', f'after {self.received} of {self.sent} bytes')
        except OSError as exc:
            self._end('error', repr(exc))

    def result(self) -> dict:
        return {'id': self.index, 'local_port': self.local_port, 'state': self.state,
                'outcome': self.outcome, 'detail': self.detail, 'sent': self.sent,
                'received': self.received, 'ended_at': self.ended_at,
                'max_gap': round(self.max_gap, 3)}


class Streams:
    def __init__(self, args, rng: random.Random):
        pattern = rng.randbytes(PATTERN_LEN)
        pattern += pattern[:READ_SIZE]         # a slice never wraps
        self.grace = args.grace
        self.streams = [Stream(i, args, pattern) for i in range(args.streams)]
        self.tasks: list[asyncio.Task] = []

    def start(self, stop: asyncio.Event) -> None:
        self.tasks = [asyncio.ensure_future(s.run(stop)) for s in self.streams]

    def connected(self) -> int:
        return sum(1 for s in self.streams if s.local_port is not None)

    def wake(self) -> None:
        for s in self.streams:
            s.progress.set()

    async def finish(self) -> None:
        """After stop: give the streams `grace` to get their EOF, then end the rest."""
        self.wake()
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=self.grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    def summary(self) -> dict:
        results = [s.result() for s in self.streams]
        outcomes: dict[str, int] = {}
        for r in results:
            key = r['outcome'] or r['state']
            outcomes[key] = outcomes.get(key, 0) + 1
        return {'count': len(results), 'connected': self.connected(),
                'intact': outcomes.get('clean', 0), 'outcomes': outcomes,
                'bytes_sent': sum(r['sent'] for r in results),
                'bytes_received': sum(r['received'] for r in results),
                'results': results}


# -- UDP clients -------------------------------------------------------------------------

class UdpClient(asyncio.DatagramProtocol):
    def __init__(self, owner: 'UdpLoad', cid: int):
        self.owner = owner
        self.cid = cid
        self.transport = None
        self.next_seq = 0
        self.pending: dict[int, float] = {}    # seq -> time.monotonic() when sent
        self.lost: set[int] = set()
        self.ports: list[int] = []             # distinct upstream source ports, in order seen
        self.last_port: int | None = None
        self.port_changes = 0
        self.counts = dict.fromkeys(('sent', 'answered', 'lost', 'late', 'duplicate', 'corrupt',
                                     'icmp_errors', 'send_errors'), 0)

    def connection_made(self, transport):
        self.transport = transport

    def send(self) -> None:
        seq = self.next_seq
        self.next_seq += 1
        data = UDP_HEADER.pack(UDP_MAGIC, self.cid, seq) + self.owner.padding
        try:
            self.transport.sendto(data)
        except OSError:
            self.counts['send_errors'] += 1
            return
        self.pending[seq] = time.monotonic()
        self.counts['sent'] += 1

    def datagram_received(self, data, addr):
        size = self.owner.size
        port = None
        if len(data) == size + UDP_PORT.size:
            port = UDP_PORT.unpack_from(data)[0]
            data = data[UDP_PORT.size:]
        if len(data) != size or data[UDP_HEADER.size:] != self.owner.padding:
            self.counts['corrupt'] += 1
            return
        magic, cid, seq = UDP_HEADER.unpack_from(data)
        if magic != UDP_MAGIC or cid != self.cid:
            self.counts['corrupt'] += 1
            return
        sent = self.pending.pop(seq, None)
        if sent is None:
            if seq in self.lost:
                self.lost.discard(seq)
                self.counts['late'] += 1
            else:
                self.counts['duplicate'] += 1
            return
        self.counts['answered'] += 1
        self.owner.rtts.append((time.monotonic() - sent) * 1000)
        if port is not None:
            if port not in self.ports:
                self.ports.append(port)
            if self.last_port is not None and port != self.last_port:
                self.port_changes += 1
            self.last_port = port

    def error_received(self, exc):
        self.counts['icmp_errors'] += 1

    def expire(self, now: float, timeout: float) -> None:
        for seq, sent in list(self.pending.items()):
            if now - sent < timeout:
                break                          # dicts keep insertion (= send) order
            del self.pending[seq]
            self.lost.add(seq)
            self.counts['lost'] += 1


class UdpLoad:
    def __init__(self, args):
        self.target = args.udp_target
        self.interval = args.udp_interval
        self.timeout = args.udp_timeout
        self.size = args.udp_size
        self.padding = bytes(range(256)) * (self.size // 256 + 1)
        self.padding = self.padding[:self.size - UDP_HEADER.size]
        self.clients = [UdpClient(self, i) for i in range(args.udp_clients)]
        self.rtts: list[float] = []
        self.ticks_skipped = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ':' in self.target[0] else socket.AF_INET
        for client in self.clients:
            await loop.create_datagram_endpoint(lambda c=client: c, remote_addr=self.target,
                                                family=family)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tick = 0
        while not stop.is_set():
            now = loop.time()
            behind = int((now - t0) / self.interval) - tick
            if behind > 5:                     # the loop stalled: do not burst to catch up
                self.ticks_skipped += behind - 1
                tick += behind - 1
            clock = time.monotonic()
            for client in self.clients:
                client.send()
                client.expire(clock, self.timeout)
            tick += 1
            await asyncio.sleep(max(0.0, t0 + tick * self.interval - loop.time()))

    async def finish(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while loop.time() < deadline and any(c.pending for c in self.clients):
            await asyncio.sleep(TICK)
        for client in self.clients:
            client.expire(time.monotonic() + self.timeout, self.timeout)
            if client.transport is not None:
                client.transport.close()

    def summary(self) -> dict:
        total = dict.fromkeys(self.clients[0].counts if self.clients else (), 0)
        for client in self.clients:
            for k, v in client.counts.items():
                total[k] += v
        return {'clients': len(self.clients), 'target': f'{self.target[0]}:{self.target[1]}',
                **total, 'in_flight_at_end': sum(len(c.pending) for c in self.clients),
                'ticks_skipped': self.ticks_skipped,
                'port_changes': sum(c.port_changes for c in self.clients),
                'distinct_ports': sum(len(c.ports) for c in self.clients),
                'ports_per_client': [c.ports for c in self.clients],
                'rtt_ms': percentiles(self.rtts)}


# -- the load run ------------------------------------------------------------------------

class Load:
    def __init__(self, args):
        self.args = args
        rng = random.Random(args.seed)
        self.tcp = TcpRate(args, rng) if args.tcp_rate else None
        self.streams = Streams(args, rng) if args.streams else None
        self.udp = UdpLoad(args) if args.udp_clients else None
        self.stop = asyncio.Event()
        self.phase = 'starting'
        self.began = time.time()
        self.signals = 0
        self.udp_ready = False

    def on_signal(self) -> None:
        self.signals += 1
        if self.signals > 1:
            self.emit(partial=True)
            os._exit(1)
        self.stop.set()

    def summary(self) -> dict:
        out = {'phase': self.phase, 'pid': os.getpid(), 'began': self.began,
               'elapsed': round(time.time() - self.began, 3)}
        if self.tcp:
            out['tcp'] = self.tcp.summary()
        if self.streams:
            out['streams'] = self.streams.summary()
        if self.udp:
            out['udp'] = self.udp.summary()
        out['ready'] = ((not self.streams or self.streams.connected() == len(self.streams.streams))
                        and (not self.udp or self.udp_ready))
        return out

    def emit(self, partial: bool = False) -> None:
        summary = self.summary()
        if partial:
            summary['partial'] = True
        write_status(self.args.status_file, summary)
        sys.stdout.write(json.dumps(summary, separators=(',', ':')) + '\n')
        sys.stdout.flush()

    async def _status_loop(self) -> None:
        while True:
            write_status(self.args.status_file, self.summary())
            await asyncio.sleep(STATUS_INTERVAL)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal)
        watchdog = self.args.duration + self.args.grace + max(self.args.tcp_timeout,
                                                               self.args.udp_timeout) + WATCHDOG_SLACK
        loop.call_later(watchdog, self._watchdog)
        status = asyncio.ensure_future(self._status_loop())
        tasks = []
        if self.udp:
            await self.udp.start()
            self.udp_ready = True
            tasks.append(asyncio.ensure_future(self.udp.run(self.stop)))
        if self.streams:
            self.streams.start(self.stop)
        if self.tcp:
            tasks.append(asyncio.ensure_future(self.tcp.run(self.stop)))
        self.phase = 'running'
        try:
            await asyncio.wait_for(self.stop.wait(), self.args.duration)
        except TimeoutError:
            pass
        self.stop.set()
        self.phase = 'ending'
        ends = list(tasks)
        if self.streams:
            ends.append(asyncio.ensure_future(self.streams.finish()))
        if self.udp:
            ends.append(asyncio.ensure_future(self.udp.finish()))
        await asyncio.gather(*ends)
        self.phase = 'done'
        status.cancel()
        self.emit()

    def _watchdog(self) -> None:
        self.phase = 'watchdog'
        self.emit(partial=True)
        os._exit(3)


# -- the echo backend --------------------------------------------------------------------

class EchoCounters:
    def __init__(self, host: str, port: int):
        self.address = f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
        self.tcp_accepted = 0
        self.tcp_active = 0
        self.tcp_bytes = 0
        self.tcp_errors = 0
        self.udp_datagrams = 0
        self.udp_sources: set[tuple] = set()

    def as_dict(self) -> dict:
        return {'tcp_accepted': self.tcp_accepted, 'tcp_active': self.tcp_active,
                'tcp_bytes': self.tcp_bytes, 'tcp_errors': self.tcp_errors,
                'udp_datagrams': self.udp_datagrams, 'udp_sources': len(self.udp_sources)}


class TcpEcho(asyncio.Protocol):
    __slots__ = ('counters', 'transport')

    def __init__(self, counters: EchoCounters):
        self.counters = counters
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.counters.tcp_accepted += 1
        self.counters.tcp_active += 1

    def data_received(self, data):
        self.counters.tcp_bytes += len(data)
        self.transport.write(data)

    def pause_writing(self):
        self.transport.pause_reading()         # the client reads slowly: stop reading it

    def resume_writing(self):
        self.transport.resume_reading()

    def eof_received(self):
        return False                           # close after the echo is flushed: FIN for FIN

    def connection_lost(self, exc):
        self.counters.tcp_active -= 1
        if exc is not None:
            self.counters.tcp_errors += 1


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, counters: EchoCounters):
        self.counters = counters
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.counters.udp_datagrams += 1
        self.counters.udp_sources.add(addr[:2])
        self.transport.sendto(UDP_PORT.pack(addr[1]) + data, addr)


async def echo_backend(args) -> dict:
    loop = asyncio.get_running_loop()
    counters = [EchoCounters(host, port) for host, port in args.echo_backend]
    servers = []
    for c, (host, port) in zip(counters, args.echo_backend):
        servers.append(await loop.create_server(lambda c=c: TcpEcho(c), host, port,
                                                reuse_address=True, backlog=4096))
        transport, _ = await loop.create_datagram_endpoint(lambda c=c: UdpEcho(c),
                                                           local_addr=(host, port))
        servers.append(transport)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    began = time.time()

    def status(phase: str) -> dict:
        return {'phase': phase, 'pid': os.getpid(), 'began': began,
                'backends': {c.address: c.as_dict() for c in counters}}

    async def status_loop():
        while True:
            write_status(args.status_file, status('serving'))
            await asyncio.sleep(STATUS_INTERVAL)

    writer = asyncio.ensure_future(status_loop())
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except TimeoutError:
        pass
    writer.cancel()
    for server in servers:
        server.close()
    final = status('done')
    write_status(args.status_file, final)
    return final


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.echo_backend:
        summary = uvloop.run(echo_backend(args))
        print(json.dumps(summary, separators=(',', ':')), flush=True)
        return 0

    async def run():
        load = Load(args)
        await load.run()

    uvloop.run(run())
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
