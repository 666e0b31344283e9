"""The access log: one line per TCP connection and per UDP session, written when it ends.

Fields, in this order (README "Access log" shows both formats):

    time        when it ended, UTC: json `2026-11-25T12:00:00.123Z`, text `[25/Nov/2026:12:00:00 +0000]`
    listener    the listener's name (default: its listen address)
    protocol    tcp | udp
    client      the real client, ip:port ([v6]:port): with proxy_protocol.accept, the header's source
    upstream    the server connected to (ip:port); when none could be, the last one tried;
                none (json null, text -) when none was tried
    status      ok | upstream_refused | timeout | idle_timeout | denied | limit | bad_header | no_route
    bytes_in    bytes read from the client (a PROXY header it sent included)
    bytes_out   bytes read from the upstream for the client
    datagrams_in, datagrams_out   UDP: datagrams from the client / replies from the upstream
                (json: UDP lines only; text: - on TCP lines)
    connect_time  seconds from the first connect try to the upstream connection (TCP);
                none when no connection was made, and always for UDP (connect() is local)
    duration    seconds from accept (TCP) / the session's first datagram (UDP) to the end

One `AccessLog` per worker, opened by path after the fork (the master has
created the file and given it to the workers' user before: `prepare`). Lines
are kept in memory and written with one `os.write` when BUFFER bytes are
pending, every FLUSH_INTERVAL, at a reopen and at exit. The file is opened
with O_APPEND (every worker appends whole lines) and O_NONBLOCK: for a pipe or
a FIFO (`/dev/stdout` in a container) a reader that does not keep up never
blocks the loop; the lines wait, and past MAX_PENDING new ones are dropped and
counted. To a pipe, writes are cut at line ends into PIPE_BUF pieces, which
the kernel keeps whole, so the workers' lines never interleave. A failed write
(disk full) drops the lines it held; drops are logged to the error log through
the caller's rate-limited log, never raised.

Owns no knowledge of relays or sessions: the data path passes plain values.
"""

from __future__ import annotations

import json
import os
import select
import stat
import time

from mpproxy.config.values import format_sockaddr

BUFFER = 64 * 1024        # bytes pending that trigger a write
FLUSH_INTERVAL = 1.0      # seconds: pending lines are written at least this often
MAX_PENDING = 1 << 20     # bytes; past this (writes blocked) new lines are dropped
EXIT_WAIT = 1.0           # seconds a worker may wait at exit for a full pipe to drain
STATUSES = ('ok', 'upstream_refused', 'timeout', 'idle_timeout', 'denied', 'limit',
            'bad_header', 'no_route')
_MONTHS = ('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec')
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK


def prepare(path: str, uid: int | None) -> None:
    """The master, before it forks or signals a reopen: create the file if it is missing and
    give it to `uid` (the workers' user), so that workers that dropped privileges can open it
    by path (nginx does the same on USR1). Raises OSError. Not a regular file (a FIFO,
    /dev/stdout): left alone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        return
    fd = os.open(path, _FLAGS, 0o644)
    try:
        st = os.fstat(fd)
        if uid is not None and st.st_uid != uid:
            os.fchown(fd, uid, -1)
        if st.st_mode & 0o600 != 0o600:      # the owner must be able to write it
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o600)
    finally:
        os.close(fd)


def _open(path: str) -> tuple[int, int | None]:
    """(fd, piece size): None for a regular file, PIPE_BUF for a pipe, FIFO or tty."""
    fd = os.open(path, _FLAGS, 0o644)
    return fd, None if stat.S_ISREG(os.fstat(fd).st_mode) else select.PIPE_BUF


class AccessLog:
    """One worker's access log writer. `errors` is a RateLimitedLog (proxy/io/ratelog.py)."""

    __slots__ = ('path', 'format', 'loop', 'errors', 'fd', 'piece', 'lines', 'size', 'carry',
                 'timer', 'blocked', 'dropped', '_names', '_sec', '_iso', '_clf', '_entry')

    def __init__(self, path: str, log_format: str, loop, errors):
        self.path = path
        self.format = log_format
        self.loop = loop
        self.errors = errors
        self.fd, self.piece = _open(path)             # OSError: the caller's boot fails
        self.lines: list[str] = []                    # formatted, not yet encoded
        self.size = 0                                 # characters in `lines`
        self.carry = b''                              # encoded, not yet written (pipe full)
        self.timer = None
        self.blocked = False                          # a full pipe: waiting until writable
        self.dropped = 0                              # lines lost, in all
        self._names: dict[str, str] = {}              # listener name -> as written
        self._sec = -1
        self._iso = self._clf = ''
        self._entry = self._json if log_format == 'json' else self._text

    # -- lines ----------------------------------------------------------------------------
    def write(self, listener: str, protocol: str, client, upstream, status: str,
              bytes_in: int, bytes_out: int, connect_time: float | None, duration: float,
              datagrams: tuple[int, int] | None = None) -> None:
        """One line. `client`, `upstream`: (host, port, ...) or None; `datagrams`: UDP's
        (in, out)."""
        now = time.time()
        sec = int(now)
        if sec != self._sec:
            self._stamp(sec)
        name = self._names.get(listener)
        if name is None:
            name = self._names[listener] = self._name(listener)
        line = self._entry(int((now - sec) * 1000), name, protocol, format_sockaddr(client),
                           format_sockaddr(upstream) if upstream else None, status, bytes_in,
                           bytes_out, connect_time, duration, datagrams)
        self._add(line)

    def refused(self, listener: str, protocol: str, client, status: str) -> None:
        """A client refused before any relay existed (allow/deny, a limit, untrusted)."""
        self.write(listener, protocol, client, None, status, 0, 0, None, 0.0)

    def _stamp(self, sec: int) -> None:
        tm = time.gmtime(sec)
        self._sec = sec
        self._iso = '%04d-%02d-%02dT%02d:%02d:%02d' % tm[:6]
        self._clf = '%02d/%s/%04d:%02d:%02d:%02d +0000' % (
            tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec)

    def _name(self, listener: str) -> str:
        return _json_str(listener) if self.format == 'json' else _text_field(listener)

    def _json(self, ms, name, protocol, client, upstream, status, bytes_in, bytes_out,
              connect_time, duration, datagrams) -> str:
        up = 'null' if upstream is None else _json_str(upstream)
        ct = 'null' if connect_time is None else '%.3f' % connect_time
        dg = '' if datagrams is None else ',"datagrams_in":%d,"datagrams_out":%d' % datagrams
        return (f'{{"time":"{self._iso}.{ms:03d}Z","listener":{name},"protocol":"{protocol}",'
                f'"client":{_json_str(client)},"upstream":{up},"status":"{status}",'
                f'"bytes_in":{bytes_in},"bytes_out":{bytes_out}{dg},"connect_time":{ct},'
                f'"duration":{duration:.3f}}}\n')

    def _text(self, ms, name, protocol, client, upstream, status, bytes_in, bytes_out,
              connect_time, duration, datagrams) -> str:
        up = '-' if upstream is None else _text_field(upstream)
        ct = '-' if connect_time is None else '%.3f' % connect_time
        dg = '- -' if datagrams is None else '%d %d' % datagrams
        return (f'{_text_field(client)} [{self._clf}] {protocol} {name} {up} {status} '
                f'{bytes_in} {bytes_out} {ct} {duration:.3f} {dg}\n')

    # -- the buffer -----------------------------------------------------------------------
    def _add(self, line: str) -> None:
        if self.size + len(self.carry) + len(line) > MAX_PENDING:
            self._drop(1, 'the file takes no more (a full pipe?)')
            return
        self.lines.append(line)
        self.size += len(line)
        if self.blocked:
            return                # written when the pipe can take more
        if self.size >= BUFFER:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.timer = None
        self.flush()

    def _writable(self) -> None:
        self._unblock()
        self.flush()

    def _unblock(self) -> None:
        if self.blocked:
            self.blocked = False
            try:
                self.loop.remove_writer(self.fd)
            except Exception:     # noqa: BLE001 - the loop is closing
                pass

    def flush(self) -> None:
        """Write what is pending: all of it, or what a full pipe takes (the rest is written
        when the pipe can take more)."""
        if self.blocked:
            return
        if self.lines:
            data = self.carry + ''.join(self.lines).encode('utf-8', 'backslashreplace')
            self.lines.clear()
            self.size = 0
        else:
            data = self.carry
        self.carry = self._write(data) if data else b''
        if self.carry and self.loop is not None:
            try:
                self.loop.add_writer(self.fd, self._writable)
                self.blocked = True
            except Exception:     # noqa: BLE001 - not pollable: retry on the timer
                if self.timer is None:
                    self.timer = self.loop.call_later(FLUSH_INTERVAL, self._tick)

    def _write(self, data: bytes) -> bytes:
        """Write `data`; returns what a full pipe left over (lines lost to errors are dropped)."""
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            stop = end
            if self.piece is not None and end - pos > self.piece:    # whole lines, atomically
                newline = data.rfind(b'\n', pos, pos + self.piece)
                if newline >= 0:
                    stop = newline + 1
            try:
                pos += os.write(self.fd, view[pos:stop])
            except BlockingIOError:
                return data[pos:]
            except InterruptedError:
                continue
            except OSError as exc:
                self._drop(data.count(b'\n', pos) or 1, exc.strerror or str(exc))
                return b''
        return b''

    def _drop(self, lines: int, why: str) -> None:
        self.dropped += lines
        self.errors.error(('access log', why), 'access log %s: %s; %d line(s) dropped '
                          '(%d in all)', self.path, why, lines, self.dropped)

    # -- reopen, exit -----------------------------------------------------------------------
    def reopen(self) -> None:
        """USR1: write what is pending to the old file, then open the path anew. A failure
        keeps the old file and is logged."""
        self._unblock()
        self.flush()
        self._unblock()           # what a full pipe did not take goes to the new file
        try:
            fd, piece = _open(self.path)
        except OSError as exc:
            self.errors.logger.error('cannot reopen access log %s: %s', self.path,
                                     exc.strerror or exc)
            self.flush()
            return
        old, self.fd, self.piece = self.fd, fd, piece
        os.close(old)
        if self.carry:
            self.flush()

    def close(self) -> None:
        """At exit: write everything (waiting at most EXIT_WAIT for a full pipe), close."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._unblock()
        self.loop = None
        self.flush()
        deadline = time.monotonic() + EXIT_WAIT
        while self.carry and time.monotonic() < deadline:
            select.select([], [self.fd], [], max(0.0, deadline - time.monotonic()))
            self.carry = self._write(self.carry)
        if self.carry:
            self._drop(self.carry.count(b'\n') or 1, 'the file took no more before exit')
            self.carry = b''
        os.close(self.fd)
        self.fd = -1
        self.errors.flush()


def _plain(s: str) -> bool:
    """True when `s` needs no escaping in either format."""
    return s.isascii() and s.isprintable() and ' ' not in s and '"' not in s and '\\' not in s


def _json_str(s: str) -> str:
    if _plain(s):
        return f'"{s}"'
    return json.dumps(s)


def _text_field(s: str) -> str:
    """A text field: '-' when empty; space, quote, backslash, control and non-ASCII bytes as
    \\xHH (nginx's escaping)."""
    if not s:
        return '-'
    if _plain(s):
        return s
    return ''.join(c if c.isascii() and c.isprintable() and c not in ' "\\'
                   else ''.join('\\x%02X' % b for b in c.encode('utf-8')) for c in s)
