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
        self.write(os.getpid())

    def write(self, pid: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f'{pid}\n'.encode(), 0)

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
