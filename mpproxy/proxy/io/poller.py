"""The relays' TCP sockets (and UDP session sockets) on the worker's own epoll, not uvloop's.

A uvloop transport costs, per connection, a libuv handle set up and torn down
by hand (ioctl, getsockname x3, getpeername x2, a poll handle re-armed with
epoll_ctl on each pause and resume) and a Task with a coroutine for each
upstream connect. Measured on the bench machine (scripts/bench, one worker
pinned), mpproxy's relay on uvloop transports took about 8,500 new connections
a second per core, and on an edge-triggered epoll of its own about 10,900
(nginx: 12,000-14,000 in the same runs).

So each worker has one `Poller`: an epoll instance whose fd uvloop watches
(`add_reader`), so that it is served between the loop's other callbacks. A
relay's socket (`tcp/end.py`) is registered once for input, output and peer
hang-up, edge-triggered (as nginx does): no epoll_ctl on pause, resume or
backpressure, and none at close (closing the fd removes it). A UDP session's
socket is watched level-triggered (`watch`).

File descriptors closed while the poller hands out one batch of events are
closed at its end, so that no fd number is reused within a batch and an event
never reaches the wrong socket's handler; `connection_lost` calls asked for
during a batch are made at its end, never from inside the call that closed.
"""

from __future__ import annotations

import select
import socket

EPOLLIN, EPOLLOUT, EPOLLRDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
EPOLLERR, EPOLLHUP, EPOLLET = select.EPOLLERR, select.EPOLLHUP, select.EPOLLET
MASK = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET

READ_SIZE = 262144        # bytes per recv() of a relay socket, as uvloop reads
MAX_EVENTS = 1024         # events taken per batch; the rest come on the loop's next turn


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
        self.lost: list = []                      # (owner, exc): connection_lost at its end
        self.log = log
        loop.add_reader(self.epoll.fileno(), self._dispatch)

    def add(self, fd: int, handler) -> None:
        """Call `handler(events)` on every edge of `fd` (input, output, hang-up)."""
        self.epoll.register(fd, MASK)
        self.handlers[fd] = handler

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
                    abort = getattr(getattr(handler, '__self__', None), 'abort', None)
                    if abort is not None:
                        abort()
        finally:
            self.dispatching = False
            dead = self.dead
            if dead:
                for sock in dead:
                    sock.close()
                dead.clear()
            if self.lost:         # (no longer dispatching: what these close goes to call_soon)
                lost, self.lost = self.lost, []
                for owner, exc in lost:
                    try:
                        owner.connection_lost(exc)
                    except Exception:     # noqa: BLE001
                        if self.log is not None:
                            self.log.exception('unexpected error closing a relay')

    def lost_later(self, owner, exc) -> None:
        """owner.connection_lost(exc) after this batch, or on the loop's next turn."""
        if self.dispatching:
            self.lost.append((owner, exc))
        else:
            self.loop.call_soon(owner.connection_lost, exc)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.epoll.fileno())
        except (OSError, ValueError, RuntimeError):
            pass
        self.epoll.close()
