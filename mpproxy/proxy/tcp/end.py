"""One socket of a relay, its client's or its upstream's: read, written and closed by hand.

A relay (relay.py) is one object per connection with two `End`s, one per socket,
each registered once on the worker's poller (io/poller.py), edge-triggered. What
an end reads it writes straight to its `peer`, the other end: no protocol object
between the two sockets, one Python call from an event to the other socket's
send(). Kept flat on purpose for the bench's `keepalive` and `newconn` workloads:
every call or attribute added here is paid per chunk.

Flow control is asyncio's contract, without the protocol layer: when more than
HIGH_WATER bytes wait to be sent on an end, its peer stops reading
(`flow_paused(True)`) until they are down to LOW_WATER; the rest stays in the
kernel, where TCP's window pushes back on the sender. `ThrottledEnd` also stops
reading while it is ahead of its rate (`upload_rate` / `download_rate`).

Edge-triggered reading: an end remembers that its socket is `readable` until a
read returns EAGAIN, or returns less than asked without a pending hang-up (the
kernel then holds nothing more; new bytes raise a new edge). Paused, it reads
again, at once, when resumed.

What an end tells its relay: `opened(end)` (a connect succeeded),
`connect_failed(exc)`, `hold(data)` (client bytes before the upstream is
linked: the preamble's), `on_eof(end)` (the peer's FIN; the end stays open for
writing), `on_lost(end, exc)` (closed: once, from the poller after its batch or
from the loop, never from inside the call that closed).
"""

from __future__ import annotations

import _socket
import errno
import os
import socket

from mpproxy.proxy.io.poller import (EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP,
                                     READ_SIZE)

_INPUT = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_HANGUP = EPOLLRDHUP | EPOLLHUP | EPOLLERR
_WRITABLE = EPOLLOUT | EPOLLERR | EPOLLHUP

HIGH_WATER = 65536        # bytes buffered for sending before the peer pauses (uvloop's default)
LOW_WATER = 16384         # ... and down to this before it reads again
IOV_MAX = 1024            # buffers sendmsg() takes at once (more: EMSGSIZE)
SLACK = 0.001             # seconds: a throttled end ahead by less than this is not paused

_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_CONNECTING = (0, errno.EINPROGRESS)


class End:
    """One non-blocking TCP socket of a relay."""

    __slots__ = ('relay', 'peer', 'poller', 'sock', 'fd', 'buffer', 'buffered', 'reading',
                 'readable', 'hangup', 'closing', 'closed', 'made', 'write_paused',
                 'eof_pending', 'connecting', 'in_read', 'eof', 'lost', 'received')

    rate = 0              # bytes a second it is read at most (ThrottledEnd); 0: no limit

    def __init__(self, relay, poller, sock: socket.socket):
        self.relay = relay
        self.peer = None              # the other End (or relay._DISCARD); None: not linked yet
        self.poller = poller
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer: list = []        # bytes waiting for the socket to take them
        self.buffered = 0
        self.reading = True           # not paused (by the relay, the peer's backpressure, a rate)
        self.readable = False         # the kernel may hold bytes (or a FIN) for us
        self.hangup = False           # the peer's FIN, or an error, is pending
        self.closing = False          # close() or abort() was called
        self.closed = False           # the socket is closed
        self.made = False             # accepted, or connected: on_lost will come
        self.write_paused = False     # over HIGH_WATER: the peer is paused
        self.eof_pending = False      # write_eof() once the buffer is sent
        self.connecting = False       # connect in progress
        self.in_read = False          # in _read: resume_reading needs no read of its own
        self.eof = False              # the peer sent FIN
        self.lost = False             # on_lost was called
        self.received = 0             # bytes read

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def accepted(cls, relay, poller, sock: socket.socket) -> 'End':
        """Take an accepted (non-blocking) socket, not reading until `resume_reading()`."""
        end = cls(relay, poller, sock)
        end.reading = False
        end.made = True
        poller.add(end.fd, end.on_event)
        return end

    @classmethod
    def connect(cls, relay, poller, family: int, sockaddr: tuple) -> 'End':
        """Start a connect to `sockaddr`: `relay.opened(end)` once it is established,
        `relay.connect_failed(exc)` if it is not. Raises OSError when the socket cannot
        even be made (EMFILE, ...) or the connect fails at once."""
        sock = _socket.socket(family, _STREAM)    # the C type: no Python-level init and close
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
            if err not in _CONNECTING:
                raise OSError(err, os.strerror(err))
            end = cls(relay, poller, sock)
            end.connecting = True
            poller.add(end.fd, end.on_event)
        except BaseException:
            sock.close()
            raise
        return end

    # -- events -------------------------------------------------------------------------
    def on_event(self, events: int) -> None:
        if self.closed:
            return
        if self.connecting:
            if not events & _WRITABLE or not self._connected(events):
                return
        elif events & _WRITABLE and self.buffer:
            self._flush()
            if self.closed:
                return
        if events & _INPUT:
            self.readable = True
            if events & _HANGUP:
                self.hangup = True
            if self.reading and not self.closing:
                self._read()

    def _connected(self, events: int) -> bool:
        """The connect ended: writable alone means it succeeded (a failed one raises
        EPOLLERR/EPOLLHUP), so SO_ERROR is asked only then."""
        self.connecting = False
        err = 0
        if events & (EPOLLERR | EPOLLHUP):
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
        if err:
            self._close_now(None)
            self.relay.connect_failed(OSError(err, os.strerror(err)))
            return False
        self.made = True
        self.relay.opened(self)
        return not self.closed

    def _read(self) -> None:
        recv = self.sock.recv
        self.in_read = True
        try:
            while self.reading and not self.closing:
                try:
                    data = recv(READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    self.readable = False
                    return
                except OSError as exc:
                    self._fatal(exc)
                    return
                if not data:
                    self.readable = self.reading = False
                    self.eof = True
                    self.relay.on_eof(self)
                    return
                self.received += len(data)
                peer = self.peer
                if peer is not None:
                    peer.write(data)
                else:
                    self.relay.hold(data)
                if self.rate:
                    self._throttle(len(data))
                if len(data) < READ_SIZE and not self.hangup:
                    self.readable = False
                    return
        finally:
            self.in_read = False

    def _flush(self) -> None:
        buffer = self.buffer
        if len(buffer) > IOV_MAX:     # many small writes: one piece, or sendmsg fails
            buffer[:] = [b''.join(buffer)]
        try:
            if len(buffer) == 1:
                sent = self.sock.send(buffer[0])
            else:
                sent = self.sock.sendmsg(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        self.buffered -= sent
        while sent:
            first = buffer[0]
            if sent >= len(first):
                sent -= len(first)
                del buffer[0]
            else:
                buffer[0] = first[sent:]
                sent = 0
        if self.write_paused and self.buffered <= LOW_WATER:
            self.write_paused = False
            peer = self.peer
            if peer is not None and not peer.lost:
                peer.flow_paused(False)
        if buffer or self.closed:
            return
        if self.eof_pending:
            self.eof_pending = False
            self._shutdown()
        if self.closing:
            self._close_now(None)

    def _shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass          # the peer is gone: its RST or FIN comes as an event

    def _fatal(self, exc: OSError) -> None:
        self.buffer.clear()
        self.buffered = 0
        self.closing = True
        self._close_now(exc)

    def _close_now(self, exc) -> None:
        if self.closed:
            return
        self.closed = self.closing = True
        self.reading = False
        self.poller.close_socket(self.fd, self.sock)
        if self.made:
            self.poller.lost_later(self, exc)

    def connection_lost(self, exc) -> None:
        """From the poller, once, after the socket was closed."""
        self.lost = True
        relay = self.relay
        if relay is not None:
            relay.on_lost(self, exc)

    # -- what the relay (and the peer) call ---------------------------------------------
    def write(self, data) -> None:
        if self.closing:
            return
        if not self.buffer:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.buffer.append(data)
        self.buffered += len(data)
        if not self.write_paused and self.buffered > HIGH_WATER:
            self.write_paused = True
            peer = self.peer
            if peer is not None and not peer.lost:
                peer.flow_paused(True)

    def write_eof(self) -> None:
        """FIN once what is buffered is sent; reading goes on."""
        if self.closing or self.eof_pending:
            return
        if self.buffer:
            self.eof_pending = True
        else:
            self._shutdown()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        """Read on; what the kernel already holds is read now, before this returns
        (unless this end is reading already: its loop goes on)."""
        if self.reading or self.closing:
            return
        self.reading = True
        if self.readable and not self.in_read and not self.connecting:
            self._read()

    def flow_paused(self, on: bool) -> None:
        """The peer cannot take more (on) or can again (off): stop or go on reading."""
        if on:
            self.reading = False
        else:
            self.resume_reading()

    def stop(self) -> None:
        """The relay is closing: cancel what this end scheduled (ThrottledEnd)."""

    def close(self) -> None:
        """Send what is buffered, then close."""
        if self.closing:
            return
        self.closing = True
        self.reading = False
        if not self.buffer or self.connecting:
            self._close_now(None)

    def abort(self) -> None:
        """Close now; what is buffered is dropped."""
        self.buffer.clear()
        self.buffered = 0
        self.closing = True
        self._close_now(None)

    def peername(self):
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    def sockname(self):
        try:
            return self.sock.getsockname()
        except OSError:
            return None


class ThrottledEnd(End):
    """An end read at most `rate` bytes a second on average (nginx's `proxy_upload_rate`,
    per connection): after each read it works out when those bytes are due at the rate
    and, when that is later than now, stops reading until then. Reading resumes only when
    neither the rate nor the peer's backpressure holds it."""

    __slots__ = ('rate', 'loop', 'due', 'flow', 'held', 'timer')

    def __init__(self, relay, poller, sock: socket.socket):
        super().__init__(relay, poller, sock)
        self.rate = 0.0           # not throttled until throttle()
        self.loop = None
        self.due = 0.0            # loop time when the bytes read so far are due at the rate
        self.flow = False         # the peer's backpressure holds reading
        self.held = False         # the rate holds reading
        self.timer = None

    def throttle(self, loop, rate: int) -> 'ThrottledEnd':
        self.loop = loop
        self.rate = float(rate)
        return self

    def _throttle(self, n: int) -> None:
        now = self.loop.time()
        due = self.due = max(self.due, now) + n / self.rate
        if due - now > SLACK and not self.held and not self.closing:
            self.held = True
            self.reading = False
            self.timer = self.loop.call_later(due - now, self._due)

    def _due(self) -> None:
        self.timer = None
        self.held = False
        if not self.flow and not self.closing:
            self.resume_reading()

    def flow_paused(self, on: bool) -> None:
        self.flow = on
        if on:
            self.reading = False
        elif not self.held:
            self.resume_reading()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
