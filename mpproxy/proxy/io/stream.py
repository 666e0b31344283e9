"""The relays' TCP sockets (and UDP session sockets) on the worker's own epoll, not uvloop's.

A uvloop transport costs, per connection, a libuv handle set up and torn down
by hand (ioctl, getsockname x3, getpeername x2, a poll handle re-armed with
epoll_ctl on each pause and resume) and a Task with a coroutine for each
upstream connect. Measured on the bench machine (scripts/bench, one worker
pinned), mpproxy's relay on uvloop transports took about 8,500 new connections
a second per core, and on an edge-triggered epoll of its own about 10,900
(nginx: 12,000-14,000 in the same runs).

So each worker has one `Poller`: an epoll instance whose fd uvloop watches
(`add_reader`), so that it is served between the loop's other callbacks. Each
socket of a relay is a `Stream`, registered once for input, output and peer
hang-up, edge-triggered (as nginx does): no epoll_ctl on pause, resume or
backpressure, and none at close (closing the fd removes it). A `Stream` offers
the subset of `asyncio.Transport` a relay's sides use and calls their
`asyncio.Protocol` methods, with the same contract: `connection_lost` comes
once, from the loop, after the socket is closed; `pause_writing` when more
than HIGH_WATER bytes wait to be sent, `resume_writing` at LOW_WATER; `close()`
sends what is buffered first; `abort()` drops it.

Edge-triggered reading: a stream remembers that its socket is `readable`
until a read returns EAGAIN, or returns less than asked without a pending
hang-up (the kernel then holds nothing more; new bytes raise a new edge).
Paused, it leaves the rest in the kernel, where TCP's window pushes back on
the sender.

File descriptors closed while the poller hands out one batch of events are
closed at its end, so that no fd number is reused within a batch and an event
never reaches the wrong stream.
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket

EPOLLIN, EPOLLOUT, EPOLLRDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
EPOLLERR, EPOLLHUP, EPOLLET = select.EPOLLERR, select.EPOLLHUP, select.EPOLLET
MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
_INPUT = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_HANGUP = EPOLLRDHUP | EPOLLHUP | EPOLLERR

READ_SIZE = 262144        # bytes per recv(), as uvloop reads
HIGH_WATER = 65536        # bytes buffered for sending before pause_writing (uvloop's default)
LOW_WATER = 16384         # ... and down to this before resume_writing
MAX_EVENTS = 1024         # events taken per batch; the rest come on the loop's next turn
IOV_MAX = 1024            # buffers sendmsg() takes at once (more: EMSGSIZE)

_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_CONNECTING = (0, errno.EINPROGRESS)


def prime_allocator() -> None:
    """Make recv(READ_SIZE) cost no mmap() and munmap(): call once in a worker, at boot.

    recv() allocates READ_SIZE bytes and shrinks them to what came. glibc serves
    a block over its mmap threshold (128 KiB at first) with mmap(), and a shrunk
    one stays mapped until freed: each read would cost a mapping, a page fault
    and an unmapping (about 17 µs a read against 4, in a micro-benchmark here).
    Freeing one mapped block raises the threshold to its size (mallopt(3),
    "dynamic mmap threshold"), which a worker's first client to hang up did by
    chance; this does it at boot, so that clients that never hang up are
    served as fast.
    """
    block = bytes(READ_SIZE + 65536)      # zero-filled: calloc(), mapped at this size
    del block


class Poller:
    """One worker's epoll for relay sockets (and UDP session sockets), served from the loop."""

    __slots__ = ('loop', 'epoll', 'handlers', 'dispatching', 'dead', 'lost', 'log')

    def __init__(self, loop, log=None):
        self.loop = loop
        self.epoll = select.epoll()
        self.handlers: dict = {}                  # fd -> handler(events)
        self.dispatching = False
        self.dead: list[socket.socket] = []       # closed in a batch: close at its end
        self.lost: list = []                      # (protocol, exc): connection_lost at its end
        self.log = log
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    def add(self, stream: 'Stream') -> None:
        self.epoll.register(stream.fd, MASK)
        self.handlers[stream.fd] = stream.on_event

    def watch(self, fd: int, handler) -> None:
        """Call `handler(events)` while `fd` is readable (level-triggered: a UDP session
        socket, read one datagram at a time)."""
        self.epoll.register(fd, EPOLLIN)
        self.handlers[fd] = handler

    def unwatch(self, fd: int) -> None:
        """Stop watching `fd`, which stays open (a UDP session handed over)."""
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def close_socket(self, fd: int, sock) -> None:
        """Forget `fd` and close `sock` (at the end of the batch, if in one): closing
        takes it out of the epoll, and no fd number is reused within a batch."""
        self.handlers.pop(fd, None)
        if self.dispatching:
            self.dead.append(sock)
        else:
            sock.close()

    def discard(self, stream: 'Stream') -> None:
        self.close_socket(stream.fd, stream.sock)

    def _dispatch(self) -> None:
        handlers = self.handlers
        self.dispatching = True
        try:
            for fd, events in self.epoll.poll(0, MAX_EVENTS):
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(events)
                except Exception:             # noqa: BLE001 - one relay's bug ends that relay
                    if self.log is not None:
                        self.log.exception('unexpected error on a relay socket; closing it')
                    owner = getattr(handler, '__self__', None)
                    if isinstance(owner, Stream):
                        owner.abort()
        finally:
            self.dispatching = False
            dead = self.dead
            if dead:
                for sock in dead:
                    sock.close()
                dead.clear()
            if self.lost:         # (no longer dispatching: what these close goes to call_soon)
                lost, self.lost = self.lost, []
                for protocol, exc in lost:
                    try:
                        protocol.connection_lost(exc)
                    except Exception:     # noqa: BLE001
                        if self.log is not None:
                            self.log.exception('unexpected error closing a relay')

    def lost_later(self, protocol, exc) -> None:
        """protocol.connection_lost(exc) after this batch, or on the loop's next turn."""
        if self.dispatching:
            self.lost.append((protocol, exc))
        else:
            self.loop.call_soon(protocol.connection_lost, exc)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.epoll.fileno())
        except (OSError, ValueError, RuntimeError):
            pass
        self.epoll.close()


class Stream:
    """A non-blocking TCP socket with the transport API of a relay side."""

    __slots__ = ('poller', 'sock', 'fd', 'protocol', 'buffer', 'buffered', 'reading',
                 'readable', 'hangup', 'closing', 'closed', 'made', 'write_paused',
                 'eof_pending', 'connecting', 'in_read')

    def __init__(self, poller: Poller, sock: socket.socket, protocol):
        self.poller = poller
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.buffer: list = []        # bytes waiting for the socket to take them
        self.buffered = 0
        self.reading = True           # not paused by the protocol
        self.readable = False         # the kernel may hold bytes (or a FIN) for us
        self.hangup = False           # the peer's FIN, or an error, is pending
        self.closing = False          # close() or abort() was called
        self.closed = False           # the socket is closed
        self.made = False             # connection_made was called
        self.write_paused = False
        self.eof_pending = False      # write_eof() once the buffer is sent
        self.connecting = None        # connect in progress: called with an OSError on failure
        self.in_read = False          # in _read: resume_reading needs no read of its own

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def accepted(cls, poller: Poller, sock: socket.socket, protocol) -> 'Stream':
        """Take an accepted (non-blocking) socket; calls protocol.connection_made now."""
        stream = cls(poller, sock, protocol)
        poller.add(stream)
        stream.made = True
        protocol.connection_made(stream)
        return stream

    @classmethod
    def connect(cls, poller: Poller, family: int, sockaddr: tuple, protocol,
                failed) -> 'Stream':
        """Start a connect to `sockaddr`. `protocol.connection_made` is called once it is
        established; `failed(exc)` if it is not. Raises OSError when the socket cannot even
        be made (EMFILE, ...) or the connect fails at once."""
        sock = _socket.socket(family, _STREAM)    # the C type: no Python-level init and close
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
            if err not in _CONNECTING:
                raise OSError(err, os.strerror(err))
            stream = cls(poller, sock, protocol)
            stream.connecting = failed
            poller.add(stream)
        except BaseException:
            sock.close()
            raise
        return stream

    # -- events -------------------------------------------------------------------------
    def on_event(self, events: int) -> None:
        if self.closed:
            return
        if self.connecting is not None:
            if not events & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                return
            if not self._connected(events):
                return
        elif events & (EPOLLOUT | EPOLLERR | EPOLLHUP) and self.buffer:
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
        failed, self.connecting = self.connecting, None
        err = 0
        if events & (EPOLLERR | EPOLLHUP):
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
        if err:
            self._close_now(None)
            failed(OSError(err, os.strerror(err)))
            return False
        self.made = True
        self.protocol.connection_made(self)
        return not self.closed

    def _read(self) -> None:
        recv = self.sock.recv
        protocol = self.protocol
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
                    if not protocol.eof_received():
                        self.close()
                    return
                protocol.data_received(data)
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
            self.protocol.resume_writing()
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
        self.poller.discard(self)
        protocol, self.protocol = self.protocol, None     # no stream <-> protocol cycle left
        if self.made:
            self.poller.lost_later(protocol, exc)

    # -- the transport API --------------------------------------------------------------
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
            self.protocol.pause_writing()

    def write_eof(self) -> None:
        if self.closing or self.eof_pending:
            return
        if self.buffer:
            self.eof_pending = True
        else:
            self._shutdown()

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        """Read on; what the kernel already holds is read now, before this returns
        (unless this stream is reading already: its loop goes on)."""
        if self.reading or self.closing:
            return
        self.reading = True
        if self.readable and not self.in_read and self.connecting is None:
            self._read()

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        """Send what is buffered, then close."""
        if self.closing:
            return
        self.closing = True
        self.reading = False
        if not self.buffer or self.connecting is not None:
            self._close_now(None)

    def abort(self) -> None:
        """Close now; what is buffered is dropped."""
        self.buffer.clear()
        self.buffered = 0
        self.closing = True
        self._close_now(None)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default=None):
        try:
            if name == 'socket':
                return self.sock
            if name == 'sockname':
                return self.sock.getsockname()
            if name == 'peername':
                return self.sock.getpeername()
        except OSError:
            return default
        return default
