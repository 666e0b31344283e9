"""The admin endpoint: a tiny HTTP/1.0 server inside the master's `selectors` loop.

No thread, no asyncio: the listening socket and every connection are non-blocking
and registered in the master's selector, whose loop calls back `key.data()`; the
master calls `tick()` at least every 250 ms to close connections past their deadline.
A connection's states::

    READING --head complete (blank line)--> WRITING --all sent--> closed
       |  \\--head over MAX_HEAD: 431, or a bad request line: 400 --^
       +-- EOF, error, or no complete head within READ_TIMEOUT ----------> closed
                                  WRITING past WRITE_TIMEOUT ------------> closed

At most MAX_CONNECTIONS are open at once; past that the listening socket is not
read and new clients wait in its backlog, so a slow or hostile client holds one
slot for at most READ_TIMEOUT and never blocks the master. One request per
connection (`Connection: close`); GET and HEAD pick a handler in `routes` by
path (query string ignored), which returns (status, content type, body) and
runs in the master: it must be quick. PUT and POST go to `writer` (server
control), only with `Authorization: Bearer <token>` matching the token of
`admin.token_file` (compared in constant time): without a token file the
endpoint is read-only (403), a wrong or missing token gets 401; each refusal is
logged. A body is at most MAX_BODY bytes (413) and needs Content-Length (411).
"""

from __future__ import annotations

import errno
import hmac
import os
import selectors
import socket
import time

from mpproxy.config.schema import Address

MAX_CONNECTIONS = 16
MAX_HEAD = 8192            # bytes: request line and headers
MAX_BODY = 4096            # bytes: a PUT or POST body
WRITABLE = '/servers/'     # the paths PUT and POST may change (others: 405)
READ_TIMEOUT = 5.0         # seconds for the whole request head
WRITE_TIMEOUT = 10.0       # seconds for the whole response
ACCEPT_PAUSE = 1.0         # out of files: stop accepting this long
BACKLOG = 64
INHERIT_ENV = 'MPPROXY_INHERIT_ADMIN'     # the admin socket passed to an upgraded master
REASONS = {200: 'OK', 400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden',
           404: 'Not Found', 405: 'Method Not Allowed', 409: 'Conflict', 411: 'Length Required',
           413: 'Content Too Large', 431: 'Request Header Fields Too Large',
           500: 'Internal Server Error', 503: 'Service Unavailable'}


def watch_listener(selector: selectors.BaseSelector, sock, accept, on: bool,
                   watched: bool) -> bool:
    """Have `selector` call `accept` when `sock` is readable (on) or not (off); `watched`:
    whether it does now. Returns the new state. (A listener of the master that takes
    clients only while it has room: this endpoint, the -s reload control socket.)"""
    if on and not watched:
        selector.register(sock, selectors.EVENT_READ, accept)
    elif not on and watched:
        selector.unregister(sock)
    return on


def bind(address: Address) -> socket.socket:
    """A listening, non-blocking TCP socket on `address` (OSError if it cannot be bound)."""
    family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
    except OSError:
        sock.close()
        raise
    return _listening(sock)


def _listening(sock: socket.socket) -> socket.socket:
    """A bound `sock`, listening and non-blocking (closed if it cannot be)."""
    try:
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _Connection:
    __slots__ = ('sock', 'head', 'out', 'deadline', 'writing')

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.head = bytearray()
        self.out = b''
        self.deadline = deadline
        self.writing = False


class AdminServer:
    """Serves `routes` ({path: handler() -> (status, content type, body)}) on one address."""

    def __init__(self, selector: selectors.BaseSelector, routes: dict, log, writer=None):
        self.selector = selector
        self.routes = routes
        self.writer = writer          # writer(method, path, body) -> (status, type, body)
        self.token: bytes | None = None   # the bearer token writes need; None: read-only
        self.trusted = False          # a Unix socket: its file mode decides, no token asked
        self.log = log
        self.address: Address | None = None
        self.sock: socket.socket | None = None
        self.conns: dict[int, _Connection] = {}
        self.accepting = False
        self.paused_until = 0.0

    # -- the listening socket --------------------------------------------------------------
    def serve(self, address: Address | None, sock: socket.socket | None) -> None:
        """Listen on `sock` (bound to `address`) from now on; None: stop listening.
        Connections already open are served to their end."""
        if sock is self.sock:
            return
        self._close_listener()
        self.address, self.sock = (address, sock) if sock is not None else (None, None)
        self._update()

    def _close_listener(self) -> None:
        if self.sock is not None:
            self._set_accepting(False)
            self.sock.close()
            self.sock = self.address = None

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._close_listener()
        for conn in list(self.conns.values()):
            self._drop(conn)

    def export(self) -> tuple[dict, list[int]]:
        """For a binary upgrade: the environment naming the listening socket, and its fd."""
        if self.sock is None:
            return {}, []
        fd = self.sock.fileno()
        return {INHERIT_ENV: f'{fd} {self.address}'}, [fd]

    @staticmethod
    def adopt(address: Address | None) -> socket.socket | None:
        """The socket an upgrading master passed for `address`, if it did (others are closed)."""
        value = os.environ.pop(INHERIT_ENV, None)
        if not value:
            return None
        fd_text, _, where = value.partition(' ')
        try:
            sock = socket.socket(fileno=int(fd_text))
        except (ValueError, OSError):
            return None
        if address is None or where != str(address):
            sock.close()
            return None
        os.set_inheritable(sock.fileno(), False)
        sock.setblocking(False)
        return sock

    def _set_accepting(self, on: bool) -> None:
        self.accepting = watch_listener(self.selector, self.sock, self._accept, on, self.accepting)

    def _update(self) -> None:
        if self.sock is not None:
            self._set_accepting(len(self.conns) < MAX_CONNECTIONS
                                and time.monotonic() >= self.paused_until)

    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.error('admin %s: accept() failed: %s; not accepting for %gs',
                               self.address, exc.strerror, ACCEPT_PAUSE)
                self.paused_until = time.monotonic() + ACCEPT_PAUSE
                self._update()
            return
        sock.setblocking(False)
        conn = _Connection(sock, time.monotonic() + READ_TIMEOUT)
        self.conns[sock.fileno()] = conn
        self.selector.register(sock, selectors.EVENT_READ, lambda: self._on_event(conn))
        self._update()

    # -- connections -----------------------------------------------------------------------
    def tick(self) -> None:
        """Close connections past their deadline; resume accepting after a pause."""
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if now >= c.deadline]:
            self._drop(conn)
        self._update()

    def _on_event(self, conn: _Connection) -> None:
        if conn.writing:
            self._write(conn)
        else:
            self._read(conn)

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            self._drop(conn)
            return
        conn.head += data
        end, gap = conn.head.find(b'\r\n\r\n'), 4
        if end < 0:
            end, gap = conn.head.find(b'\n\n'), 2
        if 0 <= end <= MAX_HEAD:
            head = bytes(conn.head[:end])
            length = _content_length(head)
            if length is not None and 0 <= length <= MAX_BODY \
                    and len(conn.head) < end + gap + length:
                return                # the body is not all here yet
            self._handle(conn, head, bytes(conn.head[end + gap:end + gap + max(0, length or 0)]),
                         length)
        elif len(conn.head) > MAX_HEAD:
            self._respond(conn, 'GET', 431, 'text/plain', b'request head too large\n')

    def _handle(self, conn: _Connection, head: bytes, body: bytes = b'',
                length: int | None = None) -> None:
        line = head.split(b'\n', 1)[0].rstrip(b'\r').decode('latin-1')
        parts = line.split(' ')
        if len(parts) != 3 or not parts[2].startswith('HTTP/') or not parts[1].startswith('/'):
            self._respond(conn, 'GET', 400, 'text/plain', b'bad request\n')
            return
        method, target = parts[0], parts[1]
        if method in ('PUT', 'POST') and self.writer is not None \
                and target.startswith(WRITABLE):
            self._write_request(conn, head, method, target.split('?', 1)[0], body, length)
            return
        if method not in ('GET', 'HEAD'):
            self._respond(conn, 'GET', 405, 'text/plain', b'only GET and HEAD here\n',
                          extra='Allow: GET, HEAD\r\n')
            return
        handler = self.routes.get(target.split('?', 1)[0])
        if handler is None:
            self._respond(conn, method, 404, 'text/plain', b'not found; try /metrics or /status\n')
            return
        try:
            status, content_type, body = handler()
        except Exception as exc:  # noqa: BLE001 - a bug in a page must never stop the master
            self.log.critical('unexpected error in the admin page %s: %s: %s; answered 500',
                              target.split('?', 1)[0], type(exc).__name__, exc, exc_info=True)
            status, content_type, body = 500, 'text/plain', b'internal error\n'
        self._respond(conn, method, status, content_type, body)

    def _write_request(self, conn: _Connection, head: bytes, method: str, path: str,
                       body: bytes, length: int | None) -> None:
        """A PUT or POST: authorized, bounded, then `writer`."""
        if not self.trusted:          # a Unix socket: its file mode decided already
            peer = _peer(conn.sock)
            if self.token is None:
                self.log.warning('admin %s: %s %s from %s refused: read-only (no '
                                 'admin.token_file)', self.address, method, path, peer)
                self._respond(conn, method, 403, 'text/plain',
                              b'read-only: set admin.token_file to allow changes\n')
                return
            given = _bearer(head)
            if given is None or not hmac.compare_digest(given, self.token):
                self.log.warning('admin %s: %s %s from %s refused: %s bearer token',
                                 self.address, method, path, peer,
                                 'no' if given is None else 'a wrong')
                self._respond(conn, method, 401, 'text/plain',
                              b'a valid bearer token is needed\n',
                              extra='WWW-Authenticate: Bearer\r\n')
                return
        if length is None:
            self._respond(conn, method, 411, 'text/plain', b'Content-Length is needed\n')
            return
        if not 0 <= length <= MAX_BODY:
            self._respond(conn, method, 413, 'text/plain',
                          f'a body is at most {MAX_BODY} bytes\n'.encode())
            return
        try:
            status, content_type, out = self.writer(method, path, body)
        except Exception as exc:  # noqa: BLE001 - a bug in a handler must never stop the master
            self.log.critical('unexpected error in the admin write %s: %s: %s; answered 500',
                              path, type(exc).__name__, exc, exc_info=True)
            status, content_type, out = 500, 'text/plain', b'internal error\n'
        self._respond(conn, method, status, content_type, out)

    def _respond(self, conn: _Connection, method: str, status: int, content_type: str,
                 body: bytes, extra: str = '') -> None:
        head = (f'HTTP/1.0 {status} {REASONS.get(status, "")}\r\nContent-Type: {content_type}\r\n'
                f'Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n')
        conn.out = memoryview(head.encode('latin-1') + (b'' if method == 'HEAD' else body))
        conn.writing = True
        conn.deadline = time.monotonic() + WRITE_TIMEOUT
        key = self.selector.get_key(conn.sock)
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, key.data)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        fd = conn.sock.fileno()
        if self.conns.pop(fd, None) is None:
            return
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self._update()


def read_token(path: str) -> bytes:
    """The bearer token in `path` (admin.token_file), stripped; b'' when the file is empty
    (OSError when it cannot be read). The master and `mpproxy server` read it the same way."""
    with open(path, 'rb') as f:
        return f.read().strip()


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b'\n')[1:]:
        name, sep, value = line.decode('latin-1').partition(':')
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _content_length(head: bytes) -> int | None:
    value = _headers(head).get('content-length')
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return -1


def _bearer(head: bytes) -> bytes | None:
    scheme, _, token = _headers(head).get('authorization', '').partition(' ')
    return token.strip().encode() if scheme.lower() == 'bearer' and token.strip() else None


def _peer(sock) -> str:
    try:
        name = sock.getpeername()
    except OSError:
        return '?'
    return '%s:%s' % name[:2] if isinstance(name, tuple) else 'unix socket'


def bind_unix(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 (only the master's user may connect, as
    HAProxy's `stats socket ... mode 600 level admin`); a stale file there is replaced."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    except OSError:
        sock.close()
        raise
    return _listening(sock)
