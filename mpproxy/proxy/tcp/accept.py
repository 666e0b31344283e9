"""Accepting TCP connections on a shared listening socket, without libuv's server.

uvloop's `create_server` hands accepting to libuv, which on EMFILE closes a
reserve descriptor, accepts every pending connection and closes it at once:
clients queued in the backlog are reset instead of waiting for a free file.
An `Acceptor` reads the listening socket itself (`loop.add_reader`) and hands
each accepted descriptor to its owner, who hands it to a relay (relay.py, end.py)::

    READING --EMFILE/ENFILE/ENOBUFS/ENOMEM--> PAUSED --back-off or a freed fd--> READING
       |                                        |
       +------ hold(reason, True) / stop() -----+--> HELD (until every reason is released) / STOPPED

While PAUSED or HELD the connections wait in the kernel's backlog, as with
HAProxy when it reaches its file limit or `maxconn`. An owner with a limit
shared by every worker (`max_connections`) passes `room()`: asked before each
accept; while it says no the acceptor is HELD and asks again every FULL_POLL
(the other workers' connections end without telling this one) or when one
of this worker's connections ends. The pause doubles from
PAUSE_MIN to PAUSE_MAX while accepting keeps failing, and `freed()` (a
connection of this worker closed) resumes at once. Out-of-files lines go
through the owner's `RateLimitedLog`, one a second.

Each readable event accepts at most `batch` connections: BATCH when the
worker has the socket to itself (one worker, or `reuseport`), BATCH_SHARED when
every worker polls the same socket, so that a worker taking every pending
connection at once does not leave its siblings idle (nginx's `multi_accept`
trade-off). One accept per event would cost a loop turn per connection: about
a third of the new-connection rate. A client gone before accept() returned
(ECONNABORTED, EPROTO, EPERM from a firewall) costs nothing but the call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket

BATCH = 8
BATCH_SHARED = 4
PAUSE_MIN = 0.05          # seconds
PAUSE_MAX = 1.0
FULL_POLL = 0.05          # seconds between two room() checks while full

# accept() failures that mean "this process or host is out of something": retrying at once
# would spin on a readable socket.
EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_AGAIN = (BlockingIOError, InterruptedError)


def _libc_accept4():
    """libc's accept4(), for accepting without the peer's address, non-blocking at once."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).accept4
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


_accept4 = _libc_accept4()
_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC


class Acceptor:
    """Accepts on `sock` and calls `handle(fd, address)` for each connection."""

    __slots__ = ('loop', 'sock', 'fd', 'handle', 'ratelog', 'name', 'reading', 'paused',
                 'holds', 'stopped', 'pause', 'timer', 'exhausted', 'room', 'full_timer', 'full',
                 'batch', 'anonymous')

    def __init__(self, loop, sock: socket.socket, handle, ratelog, name: str, room=None,
                 batch: int = BATCH, anonymous: bool = False):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.handle = handle
        self.ratelog = ratelog
        self.name = name
        self.reading = False
        self.paused = False       # out of files: waiting for the back-off or a freed fd
        self.holds: set = set()   # the owner's reasons not to accept (e.g. 'max_connections')
        self.stopped = False
        self.pause = PAUSE_MIN
        self.timer = None
        self.exhausted = 0        # accept() failures for lack of files or memory
        self.room = room          # None, or () -> bool: may one more connection be accepted?
        self.full_timer = None
        self.full = 0             # times accepting was held because room() said no
        self.batch = batch        # connections accepted per readable event, at most
        # anonymous: the owner does not need the peer's address at once: accept4() without
        # it, non-blocking (saves the address tuple and an ioctl); handle(fd, None)
        self.anonymous = anonymous and _accept4 is not None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._update()

    def stop(self) -> None:
        """For good (drain): stop reading; the socket itself is the owner's."""
        self.stopped = True
        for timer in (self.timer, self.full_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.full_timer = None
        self._update()

    def hold(self, reason: str, on: bool) -> None:
        """Stop (True) or go on (False) accepting for `reason`; reading resumes when no
        reason is left."""
        if on:
            self.holds.add(reason)
        else:
            self.holds.discard(reason)
        self._update()

    def freed(self) -> None:
        """A connection closed: a file is free, so a pause for EMFILE can end now, and
        there may be room under the owner's limit."""
        if self.paused:
            self._resume()
        if self.full_timer is not None:
            self.full_timer.cancel()
            self._check_room()

    # -- internals ------------------------------------------------------------------------
    def _update(self) -> None:
        want = not (self.stopped or self.paused or self.holds)
        if want and not self.reading:
            self.loop.add_reader(self.fd, self._on_readable)
            self.reading = True
        elif not want and self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    def _on_readable(self) -> None:
        if self.anonymous:
            self._accept_anonymous()
            return
        accept = self.sock._accept            # (fd, address): no socket object per connection
        handle, room = self.handle, self.room
        for _ in range(self.batch):
            if room is not None and not room():
                self._hold_while_full()
                return
            try:
                fd, address = accept()
            except _AGAIN:
                break
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    self.out_of_files('accept()', exc)
                    return
                continue          # the client went away before accept() (ECONNABORTED, ...)
            handle(fd, address)
            if not self.reading:  # the handler held or stopped us
                return
        self.pause = PAUSE_MIN

    def _accept_anonymous(self) -> None:
        """`_on_readable` with libc's accept4(): non-blocking fds, no addresses."""
        lfd, handle, room = self.fd, self.handle, self.room
        for _ in range(self.batch):
            if room is not None and not room():
                self._hold_while_full()
                return
            fd = _accept4(lfd, None, None, _FLAGS)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                if err in EXHAUSTED:
                    self.out_of_files('accept()', OSError(err, os.strerror(err)))
                    return
                continue          # EINTR, or the client went away before accept()
            handle(fd, None)
            if not self.reading:
                return
        self.pause = PAUSE_MIN

    def out_of_files(self, what: str, exc: OSError) -> None:
        """`what` failed for lack of files or memory: pause accepting (and log, rate-limited)."""
        self.exhausted += 1
        self.ratelog.error(('exhausted', what, exc.errno),
                           'tcp %s: %s failed: %s; not accepting for %gs '
                           '(new connections wait in the backlog)',
                           self.name, what, exc.strerror, self.pause)
        if self.paused or self.stopped:
            return
        self.paused = True
        self._update()
        self.timer = self.loop.call_later(self.pause, self._resume)
        self.pause = min(self.pause * 2, PAUSE_MAX)

    def _hold_while_full(self) -> None:
        self.full += 1
        self.ratelog.warning('full', 'tcp %s: max_connections reached; new connections wait '
                             'in the backlog', self.name)
        self.hold('full', True)
        self.full_timer = self.loop.call_later(FULL_POLL, self._check_room)

    def _check_room(self) -> None:
        self.full_timer = None
        if self.stopped:
            return
        if self.room():
            self.hold('full', False)
        else:
            self.full_timer = self.loop.call_later(FULL_POLL, self._check_room)

    def _resume(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.paused = False
        self._update()
