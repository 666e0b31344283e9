"""The QUIC ends of scripts/bench's QUIC workloads: an aioquic server, and two load clients.

    quicpeer.py server NAME PORT
        an aioquic server on 127.0.0.1:PORT with a self-signed certificate for NAME (made at
        start); each request stream carries a byte count N and is answered with N bytes
        (b'NAME|' then zeros); prints "ready" once it listens
    quicpeer.py handshakes NAME=PORT[,NAME=PORT..] SECONDS MAX CONCURRENCY HOLD
        CONCURRENCY loops, each: a new UDP socket (a new source port), a full QUIC handshake
        to the port of the next name (names taken in turn) with that name as SNI, the server's
        certificate checked to be NAME's, then CONNECTION_CLOSE (no closing period waited
        for). Stops after SECONDS or MAX handshakes begun. Each socket stays open, unread,
        for HOLD seconds after, so that its port is not used again while a proxy may still
        have a session for it (a new connection from that address would go where the old
        one went); so the client also waits HOLD seconds before it exits
    quicpeer.py steady NAME PORT SECONDS STREAMS SIZE
        one QUIC connection; STREAMS loops on it, each: a new stream asking for SIZE bytes,
        read to the end and checked (length, and b'NAME|' first); stops after SECONDS

The clients print one JSON line: {"ok", "wrong", "failed", "bytes", "elapsed", "error"}:
"ok" counts handshakes (or responses), "wrong" those that reached a server of another name or
got an answer of the wrong size, "failed" those that timed out or were refused, "error" the
first failure's text. Traffic goes to 127.0.0.1 only; every loop is bounded by SECONDS (and
MAX), every wait by TIMEOUT. Needs aioquic (the `bench` extra of pyproject.toml).
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import sys
import time
from pathlib import Path

from aioquic.asyncio import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from helpers.quic import self_signed        # noqa: E402 - the tests' certificate maker

ALPN = 'mpx-bench'
TIMEOUT = 3.0                 # seconds one handshake or one response may take


async def server(name: str, port: int) -> None:
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.certificate, config.private_key = self_signed(name)
    prefix = name.encode() + b'|'
    zeros: dict[int, bytes] = {}

    async def answer(reader, writer):
        try:
            size = min(int(await asyncio.wait_for(reader.read(32), TIMEOUT)), 1 << 24)
        except (ValueError, asyncio.TimeoutError):
            writer.write_eof()
            return
        if size not in zeros:
            zeros.clear()
            zeros[size] = prefix + bytes(max(0, size - len(prefix)))
        writer.write(zeros[size][:size])
        writer.write_eof()

    def on_stream(reader, writer):
        asyncio.ensure_future(answer(reader, writer))

    await serve('127.0.0.1', port, configuration=config, stream_handler=on_stream)
    print('ready', flush=True)
    await asyncio.Event().wait()          # until stopped (SIGTERM)


def client_config(name: str) -> QuicConfiguration:
    return QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=name,
                             verify_mode=ssl.CERT_NONE, idle_timeout=TIMEOUT + 2)


class Client(QuicConnectionProtocol):
    """aioquic's protocol with a future of its own for the handshake: its wait_connected()
    misses a handshake that completes before it is called (wait_for starts it a turn late)."""

    def __init__(self, quic: QuicConnection):
        super().__init__(quic)
        self.ready = self._loop.create_future()
        self.gone = False

    def quic_event_received(self, event) -> None:
        if not self.ready.done():
            if isinstance(event, HandshakeCompleted):
                self.ready.set_result(None)
            elif isinstance(event, ConnectionTerminated):
                self.ready.set_exception(ConnectionError(event.reason_phrase or 'closed'))
        super().quic_event_received(event)

    def peer_name(self) -> str | None:
        """The common name of the certificate the server showed (aioquic keeps it privately)."""
        cert = getattr(getattr(self._quic, 'tls', None), '_peer_certificate', None)
        if cert is None:
            return None
        return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value

    def datagram_received(self, data, addr) -> None:
        if not self.gone:
            super().datagram_received(data, addr)

    def abandon(self) -> None:
        """CONNECTION_CLOSE now, without waiting for the closing period: aioquic's timers are
        cancelled and what comes after is ignored. The socket stays open until `release()`."""
        try:
            self.close()
        except Exception:                 # noqa: BLE001 -- closing a broken connection
            pass
        self.gone = True
        for handle in (self._timer, self._transmit_task):
            if handle is not None:
                handle.cancel()
        self._timer = self._transmit_task = None

    def release(self) -> None:
        if not self.gone:
            self.abandon()
        if self._transport is not None:
            self._transport.close()


async def start(name: str, port: int) -> Client:
    """A client to 127.0.0.1:port from a new socket (a new source port) as `name`, its
    handshake begun; `ready` is done when it completes."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_datagram_endpoint(
        lambda: Client(QuicConnection(configuration=client_config(name))),
        local_addr=('127.0.0.1', 0))
    proto.connect(('127.0.0.1', port))
    return proto


class Tally:
    def __init__(self):
        self.ok = self.wrong = self.failed = self.bytes = 0
        self.error = ''

    def fail(self, what: str, exc: BaseException) -> None:
        self.failed += 1
        self.error = self.error or f'{what}: {type(exc).__name__} {exc}'.strip()

    def line(self, elapsed: float) -> str:
        return json.dumps({'ok': self.ok, 'wrong': self.wrong, 'failed': self.failed,
                           'bytes': self.bytes, 'elapsed': round(elapsed, 4),
                           'error': self.error})


async def handshakes(targets: list[tuple[str, int]], seconds: float, most: int,
                     concurrency: int, hold: float) -> str:
    tally, begun = Tally(), 0
    held: collections.deque = collections.deque()     # (closed at, Client): ports kept
    start_at = time.monotonic()
    deadline = start_at + seconds

    async def loop():
        nonlocal begun
        while time.monotonic() < deadline and begun < most:
            name, port = targets[begun % len(targets)]
            begun += 1
            try:
                proto = await start(name, port)
            except OSError as exc:
                tally.fail(f'{name} via {port}', exc)
                continue
            try:
                await asyncio.wait_for(proto.ready, TIMEOUT)
            except (ConnectionError, asyncio.TimeoutError) as exc:
                tally.fail(f'{name} via {port}', exc)
            else:
                got = proto.peer_name()
                if got == name:
                    tally.ok += 1
                else:
                    tally.wrong += 1
                    tally.error = tally.error or f'{name} via {port}: reached {got!r}'
            proto.abandon()
            now = time.monotonic()
            held.append((now, proto))
            while held[0][0] < now - hold:
                held.popleft()[1].release()

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - start_at
    if held:                              # no port given back while a proxy may hold it
        await asyncio.sleep(max(0.0, held[-1][0] + hold - time.monotonic()))
    for _, proto in held:
        proto.release()
    return tally.line(elapsed)


async def steady(name: str, port: int, seconds: float, streams: int, size: int) -> str:
    tally = Tally()
    start_at = time.monotonic()
    proto = None
    try:
        proto = await start(name, port)
        await asyncio.wait_for(proto.ready, TIMEOUT)
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        tally.fail('handshake', exc)
        if proto is not None:
            proto.release()
        return tally.line(time.monotonic() - start_at)
    deadline = start_at + seconds
    prefix = name.encode() + b'|'
    request = str(size).encode()

    async def loop():
        while time.monotonic() < deadline and not tally.failed:
            try:
                reader, writer = await proto.create_stream()
                writer.write(request)
                writer.write_eof()
                data = await asyncio.wait_for(reader.read(), TIMEOUT)
            except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
                tally.fail('stream', exc)
                return
            if len(data) == size and data.startswith(prefix):
                tally.ok += 1
                tally.bytes += size
            else:
                tally.wrong += 1
                tally.error = tally.error or f'answer of {len(data)} bytes, {data[:20]!r}'

    try:
        await asyncio.gather(*(loop() for _ in range(streams)))
    finally:
        elapsed = time.monotonic() - start_at
        proto.release()
    return tally.line(elapsed)


def run(coro):
    """On uvloop when it is there (it is in the project's venv), as mpproxy runs."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ('', [])
    if cmd == 'server':
        run(server(args[0], int(args[1])))
    elif cmd == 'handshakes':
        targets = [(n, int(p)) for n, p in (t.split('=') for t in args[0].split(','))]
        print(run(handshakes(targets, float(args[1]), int(args[2]), int(args[3]),
                             float(args[4]))))
    elif cmd == 'steady':
        print(run(steady(args[0], int(args[1]), float(args[2]), int(args[3]), int(args[4]))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
