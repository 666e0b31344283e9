"""The error log: one line per event, nginx-like, to stderr or a file.

    2026/11/25 12:00:00 [warn] 4242#w1: connect() to 127.0.0.1:9000 failed (...)

`role` is `master` or `w<slot>`; USR1 makes every process reopen the file.
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


def _make_handler(target: str) -> logging.Handler:
    if target == 'stderr':
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(target, mode='a', encoding='utf-8', delay=False)
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
