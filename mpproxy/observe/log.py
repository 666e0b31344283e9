"""The error log: one line per event, nginx-like, to stderr or a file.

    2026/11/25 12:00:00 [warn] 4242#w1: connect() to 127.0.0.1:9000 failed (...)

`role` is `master` or `w<slot>`; USR1 makes every process reopen the file.

A file is written one line per write(2) on an O_APPEND descriptor, so lines of the
master and the workers never interleave inside a line. A line that cannot be written (a
full disk: ENOSPC, EDQUOT, EIO) is dropped and counted, never raised into the caller
and never turned into a traceback on stderr; the first line written after that says
`N error log line(s) lost: <reason>`.
"""

from __future__ import annotations

import logging
import os
import sys

NOTICE = 25
LEVELS = {'debug': logging.DEBUG, 'info': logging.INFO, 'notice': NOTICE,
          'warn': logging.WARNING, 'error': logging.ERROR, 'crit': logging.CRITICAL}
_NAMES = {logging.DEBUG: 'debug', logging.INFO: 'info', NOTICE: 'notice',
          logging.WARNING: 'warn', logging.ERROR: 'error', logging.CRITICAL: 'crit'}

logging.addLevelName(NOTICE, 'NOTICE')
log = logging.getLogger('mpproxy')


class _Formatter(logging.Formatter):
    role = 'master'

    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, '%Y/%m/%d %H:%M:%S')
        level = _NAMES.get(record.levelno, record.levelname.lower())
        text = record.getMessage()
        if record.exc_info:
            text += '\n' + self.formatException(record.exc_info)
        return f'{when} [{level}] {record.process}#{self.role}: {text}'


_formatter = _Formatter()
_handler: logging.Handler | None = None
_target = 'stderr'


class _LogFile(logging.Handler):
    """The error log file: one write(2) per line; lines that cannot be written are counted."""

    def __init__(self, path: str):
        super().__init__()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.lost = 0                 # lines dropped since the last one written
        self.reason = ''
        self.torn = False             # the last write was cut short: the line is unfinished

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + '\n').encode('utf-8', 'replace')
        except Exception:             # noqa: BLE001 - a bad log call must not raise
            self.handleError(record)
            return
        if self.lost:
            note = logging.LogRecord(log.name, logging.WARNING, __file__, 0,
                                     '%d error log line(s) lost: %s', (self.lost, self.reason),
                                     None)
            if not self._write((self.format(note) + '\n').encode()):
                self.lost += 1
                return
            self.lost = 0
        if not self._write(data):
            self.lost += 1

    def _write(self, data: bytes) -> bool:
        if self.torn:
            data = b'\n' + data
        try:
            written = os.write(self.fd, data)
        except OSError as exc:
            self.reason = exc.strerror or str(exc)
            return False
        self.torn = written < len(data)
        if self.torn:
            self.reason = 'No space left on device'
        return not self.torn

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        super().close()


def _make_handler(target: str) -> logging.Handler:
    if target == 'stderr':
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = _LogFile(target)
    handler.setFormatter(_formatter)
    return handler


def setup(target: str = 'stderr', level: str = 'info') -> None:
    """(Re)configure the error log; raises OSError if the file cannot be opened."""
    global _handler, _target
    new = _make_handler(target)
    if _handler is not None:
        log.removeHandler(_handler)
        _handler.close()
    _handler, _target = new, target
    log.addHandler(new)
    log.setLevel(LEVELS[level])
    log.propagate = False


def fds() -> list[int]:
    """The file descriptors the error log writes to (a forked worker keeps them open)."""
    out = []
    for handler in log.handlers:
        fd = getattr(handler, 'fd', None)
        if fd is None:
            stream = getattr(handler, 'stream', None)
            try:
                fd = stream.fileno() if stream is not None else None
            except (OSError, ValueError):
                fd = None
        if fd is not None and fd >= 0:
            out.append(fd)
    return out


def set_role(role: str) -> None:
    _formatter.role = role


def reopen() -> None:
    """Reopen the log file (logrotate); a failure keeps the old file and is logged."""
    if _target == 'stderr':
        return
    try:
        setup(_target, _level_name())
    except OSError as exc:
        log.error('cannot reopen error log %s: %s', _target, exc.strerror)


def chown(uid: int) -> None:
    """Give the log file to `uid` (the workers' user) so that they can reopen it, as nginx
    does on USR1; the file's group and mode are left alone."""
    if _target == 'stderr':
        return
    try:
        os.chown(_target, uid, -1)
    except OSError as exc:
        log.error('cannot give error log %s to uid %d: %s', _target, uid, exc.strerror)


def _level_name() -> str:
    return _NAMES.get(log.level, 'info')
