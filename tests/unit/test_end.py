"""Poller (proxy/io/poller.py) and a relay's End (proxy/tcp/end.py) in-process: a uvloop
loop, real TCP connections over 127.0.0.1.

Each test takes one side of a loopback connection as an End (the accepted side, or an
End.connect to a listening socket) whose relay and peer are a recorder (`Rec`), and drives
the other side, the remote peer, as a plain non-blocking socket from inside the loop.
Every wait has a deadline; every socket, the poller and the loop are closed in teardown; no
exception may reach the loop's exception handler.
"""

from __future__ import annotations

import array
import asyncio
import errno
import fcntl
import logging
import random
import select
import socket
import struct
import subprocess
import sys
import termios
import time

import pytest
import uvloop

from helpers.unit import ListHandler, run_loop_until, serve_env
from mpproxy.proxy.io.poller import Poller
from mpproxy.proxy.tcp import end as end_mod
from mpproxy.proxy.tcp.end import HIGH_WATER, LOW_WATER, End

SMALL_BUF = 4096            # SO_SNDBUF / SO_RCVBUF so that the kernel takes little and we buffer


class Rec:
    """Stands for both an End's relay and its peer, and records every call the End makes:
    what it read (written to its peer), the peer pausing and resuming (backpressure), and
    the relay's callbacks. `on_data(rec, data)` runs as the End writes what it read."""

    lost = False                  # as a peer: never gone

    def __init__(self, eof_closes=False, on_data=None):
        self.end = None
        self.made = 0
        self.failures = []
        self.data = bytearray()
        self.chunks = 0
        self.eofs = 0
        self.ended = []               # on_lost's exc, in order
        self.closed_at_lost = []      # was the socket already closed when on_lost came
        self.paused = self.resumed = 0
        self.buffered_at_resume = None
        self.eof_closes = eof_closes  # on_eof closes the end (as a relay whose peer is done)
        self.on_data = on_data

    # the relay
    def opened(self, end):
        self.made += 1
        self.end = end
        end.peer = self

    def connect_failed(self, exc):
        self.failures.append(exc)

    def hold(self, data):
        raise AssertionError('a linked end holds nothing')

    def on_eof(self, end):
        self.eofs += 1
        if self.eof_closes:
            end.close()

    def on_lost(self, end, exc):
        self.ended.append(exc)
        self.closed_at_lost.append(end.sock.fileno() == -1)

    # the peer
    def write(self, data):
        self.data += data
        self.chunks += 1
        if self.on_data is not None:
            self.on_data(self, data)

    def flow_paused(self, on):
        if on:
            self.paused += 1
        else:
            self.resumed += 1
            self.buffered_at_resume = self.end.buffered


def reading(end) -> bool:
    return end.reading and not end.closing


def pending(sock) -> int:
    """Bytes the kernel holds unread on `sock`."""
    buf = array.array('i', [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, seed: int = 2):
    """`data` cut in pieces of varying size (1 byte .. 40 kB)."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 40000)
        yield data[pos:pos + n]
        pos += n


class Env:
    """One uvloop loop, one Poller, a listening socket, and everything to clean up."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.loop_errors = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.handler = ListHandler()
        self.log = logging.getLogger('test.stream.%d' % id(self))
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)
        self.log.addHandler(self.handler)
        self.poller = Poller(self.loop, self.log)
        self.socks = []
        self.streams = []
        self.listener = self.track(socket.create_server(('127.0.0.1', 0)))

    def track(self, sock):
        self.socks.append(sock)
        return sock

    def pair(self, rec, small=False):
        """A loopback TCP connection: (the accepted side as an End, linked to `rec` and
        reading, the remote peer)."""
        peer = self.track(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        if small:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUF)
        peer.connect(self.listener.getsockname())
        peer.setblocking(False)
        sock, _ = self.listener.accept()
        self.track(sock)
        sock.setblocking(False)
        if small:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUF)
        stream = End.accepted(rec, self.poller, sock)
        rec.opened(stream)
        stream.resume_reading()
        self.streams.append(stream)
        return stream, peer

    def connect(self, addr, rec):
        stream = End.connect(rec, self.poller, socket.AF_INET, addr)
        self.streams.append(stream)
        self.track(stream.sock)
        return stream

    def run_until(self, cond, timeout=5.0, what='condition'):
        run_loop_until(self.loop, cond, timeout, what)

    def turns(self, n=10):
        """Let the loop go round `n` times (before asserting that something did not happen)."""
        async def spin():
            for _ in range(n):
                await asyncio.sleep(0)
        self.loop.run_until_complete(spin())

    def read_peer(self, peer, n=None, timeout=5.0):
        """Read from `peer` until it has `n` bytes, or (n=None) until EOF: (data, eof)."""
        buf = bytearray()
        eof = []

        def more():
            while True:
                try:
                    chunk = peer.recv(1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    eof.append(True)
                    return True
                buf.extend(chunk)
            return n is not None and len(buf) >= n
        self.run_until(more, timeout, 'the peer to read %s' % ('EOF' if n is None else n))
        return bytes(buf), bool(eof)

    def close(self):
        for stream in self.streams:
            if not stream.closed:
                stream.abort()
        self.turns(3)
        self.poller.close()
        for sock in self.socks:
            sock.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.log.removeHandler(self.handler)


@pytest.fixture
def env():
    yield from serve_env(Env())


def assert_closed(env, stream):
    assert stream.closed and stream.closing
    assert stream.sock.fileno() == -1
    assert stream.fd not in env.poller.handlers


# -- connection -----------------------------------------------------------------------------

def test_accepted_end_reads_to_its_peer_and_writes_to_the_socket(env):
    rec = Rec()
    stream, peer = env.pair(rec)
    assert rec.made == 1 and rec.end is stream and stream.peer is rec
    assert reading(stream) and not stream.closing

    peer.sendall(b'hello')
    env.run_until(lambda: rec.data == b'hello', what='the data')
    stream.write(b'world')
    assert env.read_peer(peer, 5) == (b'world', False)

    env.turns()
    assert rec.made == 1 and rec.ended == [] and rec.eofs == 0


def test_connect_calls_opened_once_connected(env):
    rec = Rec()
    stream = env.connect(env.listener.getsockname(), rec)
    assert rec.made == 0            # the connect is in progress: nothing yet
    env.run_until(lambda: rec.made, what='opened')
    assert rec.end is stream
    server, _ = env.listener.accept()
    env.track(server)

    server.sendall(b'ping')
    env.run_until(lambda: rec.data == b'ping', what='the data')
    stream.write(b'pong')
    server.settimeout(5)
    assert server.recv(10) == b'pong'

    env.turns()
    assert rec.made == 1 and rec.failures == [] and rec.ended == []


def test_connect_refused_calls_connect_failed_only(env):
    closed = env.track(socket.socket())
    closed.bind(('127.0.0.1', 0))     # bound, not listening: the SYN gets a RST
    rec = Rec()
    stream = env.connect(closed.getsockname(), rec)
    env.run_until(lambda: rec.failures, what='the failed callback')

    assert len(rec.failures) == 1
    assert isinstance(rec.failures[0], OSError) and rec.failures[0].errno == errno.ECONNREFUSED
    assert_closed(env, stream)
    env.turns()
    assert len(rec.failures) == 1 and rec.made == 0 and rec.ended == []


def test_an_accepted_end_reads_nothing_until_resumed_and_holds_what_it_reads_unlinked(env):
    """As a relay's client end during its preamble: accepted paused, and what it reads
    before the upstream is linked goes to relay.hold(), not to a peer."""
    held = []

    class Holding(Rec):
        def hold(self, data):
            held.append(data)
    rec = Holding()
    remote = env.track(socket.create_connection(env.listener.getsockname()))
    sock, _ = env.listener.accept()
    env.track(sock)
    sock.setblocking(False)
    end = End.accepted(rec, env.poller, sock)
    env.streams.append(end)
    assert end.peer is None and not reading(end) and end.made

    remote.sendall(b'preamble')
    env.run_until(lambda: end.readable, what='the input event')
    env.turns()
    assert held == [] and pending(sock) == 8          # paused: left in the kernel
    end.resume_reading()
    assert held == [b'preamble'] and end.received == 8 and rec.data == b''


# -- reading --------------------------------------------------------------------------------

def test_pause_reading_leaves_bytes_in_kernel_and_resume_reads_them(env):
    rec = Rec()
    stream, peer = env.pair(rec)
    stream.pause_reading()
    assert not reading(stream)

    peer.sendall(b'held' * 250)
    env.run_until(lambda: stream.readable, what='the input event')   # the event came ...
    env.turns()
    assert rec.data == b'' and pending(stream.sock) == 1000        # ... and nothing was read

    stream.resume_reading()           # edge-triggered: no new event will come; read now
    assert rec.data == b'held' * 250 and pending(stream.sock) == 0
    assert reading(stream)

    peer.sendall(b'more')             # and reading goes on with the next edge
    env.run_until(lambda: rec.data.endswith(b'more'), what='more data')


def test_pause_inside_data_received_then_resume_reads_the_rest_without_an_event(env, monkeypatch):
    monkeypatch.setattr(end_mod, 'READ_SIZE', 1000)
    rec = Rec(on_data=lambda p, data: p.end.pause_reading())
    stream, peer = env.pair(rec)
    data = payload(5000)
    peer.sendall(data)

    env.run_until(lambda: rec.chunks, what='the first chunk')
    env.turns()
    assert bytes(rec.data) == data[:1000] and pending(stream.sock) == 4000
    for i in range(2, 6):
        stream.resume_reading()       # one more chunk before this returns, then paused again
        assert bytes(rec.data) == data[:1000 * i]
        assert not reading(stream)
    assert pending(stream.sock) == 0

    stream.resume_reading()           # nothing left: reads EAGAIN, stays reading
    assert rec.chunks == 5 and reading(stream)
    peer.sendall(b'next')
    env.run_until(lambda: rec.data.endswith(b'next'), what='the next data')


# -- writing --------------------------------------------------------------------------------

def test_backpressure_pauses_and_resumes_writing_and_keeps_every_byte_in_order(env):
    rec = Rec()
    stream, peer = env.pair(rec, small=True)
    data = payload(16 * HIGH_WATER)
    for chunk in chunked(data):
        stream.write(chunk)
    assert stream.buffered > HIGH_WATER
    assert rec.paused == 1 and rec.resumed == 0

    got, eof = env.read_peer(peer, len(data))
    assert not eof and got == data
    env.run_until(lambda: stream.buffered == 0, what='the buffer to drain')
    assert rec.paused == 1 and rec.resumed == 1
    assert rec.buffered_at_resume <= LOW_WATER
    assert rec.ended == []


def test_many_small_buffered_writes_are_all_sent(env):
    """More buffered pieces than sendmsg() takes at once (IOV_MAX, 1024), under HIGH_WATER:
    as a relay to a slow reader buffers keystroke-sized writes."""
    rec = Rec()
    stream, peer = env.pair(rec, small=True)
    sent = bytearray()
    for _ in range(100000):           # fill the kernel: the next writes are buffered
        if stream.buffered:
            break
        piece = b'k%07d\n' % len(sent)
        stream.write(piece)
        sent += piece
    assert stream.buffered
    for i in range(3000):
        piece = b'%09d\n' % i
        stream.write(piece)
        sent += piece
    assert rec.paused == 0          # under HIGH_WATER: nothing asks the writer to stop

    got, _ = env.read_peer(peer, len(sent))
    assert rec.ended == [] and not stream.closing
    assert got == bytes(sent)


def test_write_eof_sends_fin_after_the_buffered_bytes(env):
    rec = Rec()
    stream, peer = env.pair(rec, small=True)
    data = payload(4 * HIGH_WATER)
    stream.write(data)
    assert stream.buffered > 0
    stream.write_eof()
    assert not stream.closing

    got, eof = env.read_peer(peer)
    assert eof and got == data        # every byte, then the FIN

    peer.sendall(b'still open')       # only the write direction is done
    env.run_until(lambda: rec.data == b'still open', what='data after write_eof')
    assert rec.ended == []


def test_write_eof_with_nothing_buffered_sends_fin_at_once(env):
    rec = Rec()
    stream, peer = env.pair(rec)
    stream.write(b'all')
    stream.write_eof()
    assert env.read_peer(peer) == (b'all', True)
    env.turns()
    assert rec.ended == [] and not stream.closing


# -- closing --------------------------------------------------------------------------------

def test_close_sends_the_buffered_bytes_then_closes(env):
    rec = Rec()
    stream, peer = env.pair(rec, small=True)
    data = payload(4 * HIGH_WATER)
    stream.write(data)
    assert stream.buffered > 0
    stream.close()
    assert stream.closing and not reading(stream)
    assert rec.ended == []
    stream.write(b'after close: dropped')

    got, eof = env.read_peer(peer)
    assert eof and got == data
    env.run_until(lambda: rec.ended, what='on_lost')
    env.turns()
    assert rec.ended == [None] and rec.closed_at_lost == [True]
    assert_closed(env, stream)


def test_close_with_nothing_buffered_calls_on_lost_once_from_the_loop(env):
    rec = Rec()
    stream, peer = env.pair(rec)
    stream.close()
    assert rec.ended == []           # not from inside close()
    assert_closed(env, stream)        # outside a batch the socket is closed at once
    env.run_until(lambda: rec.ended, what='on_lost')
    stream.close()
    stream.abort()
    env.turns()
    assert rec.ended == [None] and rec.closed_at_lost == [True]
    assert env.read_peer(peer) == (b'', True)


def test_close_from_a_callback_calls_on_lost_after_the_callback(env):
    seen = []

    def close_now(rec, data):
        rec.end.close()
        seen.append(list(rec.ended))
    rec = Rec(on_data=close_now)
    stream, peer = env.pair(rec)
    peer.sendall(b'bye')
    env.run_until(lambda: rec.ended, what='on_lost')
    env.turns()
    assert seen == [[]]               # close() itself did not call connection_lost
    assert rec.ended == [None] and rec.closed_at_lost == [True]
    assert rec.data == b'bye'
    assert_closed(env, stream)


def test_abort_drops_the_buffered_bytes(env):
    rec = Rec()
    stream, peer = env.pair(rec, small=True)
    data = payload(4 * HIGH_WATER)
    stream.write(data)
    assert stream.buffered > 0
    stream.abort()
    assert stream.closing and stream.buffered == 0
    assert rec.ended == []
    assert_closed(env, stream)

    got, eof = env.read_peer(peer)
    assert eof and len(got) < len(data) and data.startswith(got)
    env.run_until(lambda: rec.ended, what='on_lost')
    env.turns()
    assert rec.ended == [None]


# -- the peer closing -----------------------------------------------------------------------

def test_peer_half_close_calls_on_eof_and_keeps_the_write_direction(env):
    rec = Rec()
    stream, peer = env.pair(rec)
    peer.sendall(b'last words')
    peer.shutdown(socket.SHUT_WR)
    env.run_until(lambda: rec.eofs, what='on_eof')
    assert rec.data == b'last words'
    assert not stream.closing and rec.ended == []

    stream.write(b'reply')
    assert env.read_peer(peer, 5) == (b'reply', False)
    env.turns()
    assert rec.eofs == 1 and rec.ended == []

    stream.close()
    assert env.read_peer(peer) == (b'', True)
    env.run_until(lambda: rec.ended, what='on_lost')
    assert rec.ended == [None]


def test_peer_half_close_then_close_from_on_eof(env):
    rec = Rec(eof_closes=True)
    stream, peer = env.pair(rec)
    peer.shutdown(socket.SHUT_WR)
    env.run_until(lambda: rec.ended, what='on_lost')
    env.turns()
    assert rec.eofs == 1 and rec.ended == [None] and rec.closed_at_lost == [True]
    assert_closed(env, stream)
    assert env.read_peer(peer) == (b'', True)


def reset(peer):
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    peer.close()


def test_peer_reset_calls_on_lost_once_with_the_error(env):
    rec = Rec()
    stream, peer = env.pair(rec)
    reset(peer)
    env.run_until(lambda: rec.ended, what='on_lost')
    env.turns()
    assert len(rec.ended) == 1 and isinstance(rec.ended[0], ConnectionResetError)
    assert rec.closed_at_lost == [True] and rec.eofs == 0
    assert_closed(env, stream)


def test_peer_reset_while_writing_calls_on_lost_with_the_error(env):
    rec = Rec()
    stream, peer = env.pair(rec, small=True)
    stream.write(payload(4 * HIGH_WATER))
    assert stream.buffered > 0
    reset(peer)
    env.run_until(lambda: rec.ended, what='on_lost')
    env.turns()
    assert len(rec.ended) == 1 and isinstance(rec.ended[0], OSError)
    assert rec.ended[0].errno in (errno.ECONNRESET, errno.EPIPE)
    assert stream.buffered == 0
    assert_closed(env, stream)


# -- the poller -----------------------------------------------------------------------------

def test_an_exception_while_relaying_aborts_that_end_only(env):
    def boom(rec, data):
        raise RuntimeError('boom')
    bad, good = Rec(on_data=boom), Rec()
    bad_stream, bad_peer = env.pair(bad)
    good_stream, good_peer = env.pair(good)
    bad_peer.sendall(b'x')            # both in the same batch, most likely
    good_peer.sendall(b'y')
    env.run_until(lambda: bad.ended and good.data == b'y', what='both streams served')

    assert bad.ended == [None]
    assert_closed(env, bad_stream)
    assert [r.exc_info[0] for r in env.handler.records if r.exc_info] == [RuntimeError]
    assert env.read_peer(bad_peer) == (b'', True)

    good_peer.sendall(b'z')           # the poller goes on serving the other stream
    env.run_until(lambda: good.data == b'yz', what='more data on the good stream')
    good_stream.write(b'ok')
    assert env.read_peer(good_peer, 2) == (b'ok', False)
    assert good.ended == [] and not good_stream.closing


def test_sockets_closed_in_a_batch_are_closed_at_its_end(env):
    """A callback closes another stream whose event is in the same batch: that socket stays
    open (its fd number is not reused) until the batch ends, its event is not delivered,
    and both sockets are closed and both connection_lost calls made when _dispatch returns."""
    seen = {}
    streams = {}

    def close_both(rec, data):
        other = streams['b'] if rec is a else streams['a']
        seen['first'] = rec
        other.close()
        seen['other_open'] = other.sock.fileno() != -1
        seen['other_dead'] = other.sock in env.poller.dead
        probe = socket.socket()
        seen['fd_reused'] = probe.fileno() == other.fd
        probe.close()
        rec.end.close()
        seen['own_open'] = rec.end.sock.fileno() != -1
        seen['lost_in_batch'] = (list(a.ended), list(b.ended))
    a, b = Rec(on_data=close_both), Rec(on_data=close_both)
    streams['a'], peer_a = env.pair(a)
    streams['b'], peer_b = env.pair(b)
    peer_a.sendall(b'a')
    peer_b.sendall(b'b')
    deadline = time.monotonic() + 5   # both bytes arrived and the epoll has the events
    while not (pending(streams['a'].sock) and pending(streams['b'].sock)):
        assert time.monotonic() < deadline, 'the data did not arrive'
        time.sleep(0.001)
    assert select.select([env.poller.epoll.fileno()], [], [], 5)[0]

    env.poller._dispatch()            # one batch, by hand: the loop does not run

    assert seen['other_open'] and seen['other_dead'] and seen['own_open']
    assert not seen['fd_reused']
    assert seen['lost_in_batch'] == ([], [])
    first = seen['first']
    other = b if first is a else a
    assert first.data in (b'a', b'b') and other.data == b'' and other.chunks == 0
    for stream in streams.values():
        assert_closed(env, stream)
    assert env.poller.dead == [] and env.poller.lost == []
    assert a.ended == [None] and b.ended == [None]
    assert a.closed_at_lost == [True] and b.closed_at_lost == [True]


# -- prime_allocator ------------------------------------------------------------------------
_MAPPED_READS = '''
import ctypes, socket, sys
from mpproxy.proxy.io.poller import READ_SIZE, prime_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks',
        'fordblks', 'keepcost')]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == 'primed':
    prime_allocator()
a, b = socket.socketpair()
before = libc.mallinfo2().hblks
held = []
for _ in range(8):                  # small reads, kept (as a relay's write buffer would)
    a.send(b'x' * 100)
    held.append(b.recv(READ_SIZE))
print(libc.mallinfo2().hblks - before)
'''


def _mapped_blocks_after_reads(mode: str) -> int:
    out = subprocess.run([sys.executable, '-c', _MAPPED_READS, mode], capture_output=True,
                         text=True, timeout=30, check=True)
    return int(out.stdout)


def test_prime_allocator_keeps_reads_off_mmap():
    """Every recv(READ_SIZE) of a fresh process is an mmap()ed block (glibc: over its first
    mmap threshold); after prime_allocator() none is."""
    try:
        unprimed = _mapped_blocks_after_reads('unprimed')
    except subprocess.CalledProcessError as exc:
        if 'mallinfo2' not in exc.stderr:
            raise
        pytest.skip('no glibc mallinfo2() here')
    if unprimed == 0:
        pytest.skip('this allocator does not map READ_SIZE blocks: nothing to prime')
    assert unprimed == 8
    assert _mapped_blocks_after_reads('primed') == 0
