"""How `mpproxy -s reload` learns the outcome of the reload it asked for.

A signal carries no answer, so the master also listens on a Unix stream socket in the
abstract namespace named after its pid, `@mpproxy/<pid>/control`: no file (a full or
read-only disk does not matter, nothing is left behind), found from the pid file that
`-s` reads anyway. `-s reload` connects and sends `reload`; the master checks who asks
(SO_PEERCRED: root, or the master's own user: whoever may signal it), treats the request
exactly as a HUP, and answers one line once that reload has ended, when systemd would get
its READY=1:

    ok serving: generation N active
    failed reload failed, keeping the running configuration: <cause>

A request that arrives while an earlier reload is still starting supersedes it (as a
second HUP does), and every waiting client gets the outcome of the last one. States of a
client connection:

    READING --"reload\\n"--> WAITING --the reload ended--> answered, closed
       +-- EOF, junk, more than MAX_REQUEST bytes, READ_TIMEOUT, not allowed --> closed

At most MAX_CLIENTS connections are open; past that the socket is not read (clients wait
in its backlog). The master never blocks on a client: the answer is one short line into an
empty socket buffer, sent without waiting, and a client that went away is simply dropped.
When nothing listens (another network namespace, an older master), `-s reload` falls back
to sending HUP (see cli.py).
"""

from __future__ import annotations

import functools
import os
import selectors
import socket
import struct
import time

from mpproxy.observe.admin import watch_listener

READ_TIMEOUT = 5.0
MAX_REQUEST = 64
MAX_CLIENTS = 32


def address(pid: int) -> bytes:
    return b'\0mpproxy/%d/control' % pid


class _Client:
    __slots__ = ('sock', 'data', 'deadline', 'waiting', 'reload')

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.data = b''
        self.deadline = time.monotonic() + READ_TIMEOUT
        self.waiting = False
        self.reload: int | None = None      # which reload answers it, once one started


class ControlEndpoint:
    def __init__(self, selector: selectors.BaseSelector, on_reload, log):
        self.selector = selector
        self.on_reload = on_reload          # called once per accepted `reload` request
        self.log = log
        self.sock: socket.socket | None = None
        self.clients: dict[int, _Client] = {}
        self.accepting = False

    def open(self) -> None:
        """Listen; a failure (no AF_UNIX, the name taken) only leaves `-s reload` to HUP."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(address(os.getpid()))
            sock.listen(MAX_CLIENTS)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.log.warning('control socket: %s; `mpproxy -s reload` will not wait for the '
                             'outcome', exc.strerror or exc)
            return
        self.sock = sock
        self._update()

    def close(self) -> None:
        if self.sock is not None:
            self._set_accepting(False)
            self.sock.close()
            self.sock = None
        for client in list(self.clients.values()):
            self._drop(client)

    def waiting(self) -> int:
        return sum(1 for c in self.clients.values() if c.waiting)

    def starting(self, reload: int) -> None:
        """Reload number `reload` starts: it answers every client still waiting for one."""
        for client in self.clients.values():
            if client.waiting and client.reload is None:
                client.reload = reload

    def supersede(self, old: int, new: int) -> None:
        """Reload `new` replaced `old` before it ended: its outcome answers `old`'s clients."""
        for client in self.clients.values():
            if client.reload == old:
                client.reload = new

    def answer(self, reload: int | None, ok: bool, text: str) -> None:
        """Reload number `reload` ended (None: requests no reload will take, the master
        stops): tell its clients, then close them."""
        line = (('ok ' if ok else 'failed ') + ' '.join(text.splitlines()))[:4000] + '\n'
        for client in [c for c in self.clients.values() if c.waiting and c.reload == reload]:
            try:
                client.sock.send(line.encode(errors='replace'))
            except OSError:
                pass
            self._drop(client)

    def abandon(self, text: str) -> None:
        """The master stops: no reload will end; every waiting client is told so."""
        for reload in {c.reload for c in self.clients.values() if c.waiting}:
            self.answer(reload, False, text)

    def tick(self) -> None:
        now = time.monotonic()
        for client in [c for c in self.clients.values() if not c.waiting and now >= c.deadline]:
            self._drop(client)

    # -- connections ------------------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except OSError:                     # EAGAIN, ECONNABORTED, EMFILE: try next turn
            return
        sock.setblocking(False)
        if not _allowed(sock):
            self.log.warning('control socket: refused a client that may not signal the master')
            sock.close()
            return
        client = _Client(sock)
        self.clients[sock.fileno()] = client
        self.selector.register(sock, selectors.EVENT_READ, functools.partial(self._read, client))
        self._update()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data or client.waiting:      # EOF, or talking after its request: done
            self._drop(client)
            return
        client.data += data
        if b'\n' not in client.data:
            if len(client.data) >= MAX_REQUEST:
                self._drop(client)
            return
        if client.data.split(b'\n', 1)[0].strip() != b'reload':
            self._drop(client)
            return
        client.waiting = True
        self.on_reload()

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.sock.fileno(), None) is None:
            return
        try:
            self.selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        self._update()

    def _set_accepting(self, on: bool) -> None:
        self.accepting = watch_listener(self.selector, self.sock, self._accept, on, self.accepting)

    def _update(self) -> None:
        if self.sock is not None:
            self._set_accepting(len(self.clients) < MAX_CLIENTS)


def _allowed(sock: socket.socket) -> bool:
    """Root, or the user the master runs as: those who may send it signals."""
    try:
        _, uid, _ = struct.unpack('3i', sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize('3i')))
    except OSError:
        return False
    return uid == 0 or uid == os.geteuid()


def request_reload(pid: int, timeout: float) -> tuple[bool, str] | None:
    """For `-s reload`: ask the master at `pid` to reload and wait for the outcome.
    (ok, text); None when nothing listens (the caller sends HUP instead). Raises
    TimeoutError when no answer came within `timeout`, ConnectionError when the master
    closed without one."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(address(pid))
        except OSError:
            return None
        sock.settimeout(timeout)
        sock.sendall(b'reload\n')
        data = b''
        deadline = time.monotonic() + timeout
        while not data.endswith(b'\n'):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(4096)
            except socket.timeout:
                raise TimeoutError from None
            if not chunk:
                raise ConnectionError('the master closed the connection without an answer')
            data += chunk
        status, _, text = data.decode(errors='replace').strip().partition(' ')
        return status == 'ok', text
    finally:
        sock.close()
