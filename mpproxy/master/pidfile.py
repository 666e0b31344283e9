"""The pid file, locked with flock so a second instance refuses to start."""

from __future__ import annotations

import fcntl
import os

from mpproxy.errors import StartupError


class PidFile:
    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors='replace').strip() or '?'
            os.close(fd)
            raise StartupError(f'another mpproxy (pid {other}) is running with pid file '
                               f'{self.path}') from None
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        try:
            self.write(os.getpid())
        except OSError as exc:           # ENOSPC, EDQUOT: no half-made pid file is left
            self.release()
            raise StartupError(f'cannot write pid file {self.path}: {exc.strerror}') from None

    def write(self, pid: int) -> None:
        """Write `pid` over what the file holds, then cut it to length: on a full disk an
        overwrite of the file's page still succeeds, where truncating first would leave
        the file empty once the write fails."""
        data = f'{pid}\n'.encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def read_pid(path: str) -> int:
    """The pid in `path`, for `-s`; raises StartupError with a clear message."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as exc:
        raise StartupError(f'cannot read pid file {path}: {exc.strerror}') from None
    if not text.isdigit():
        raise StartupError(f'invalid pid {text!r} in {path}')
    return int(text)
