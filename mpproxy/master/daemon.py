"""`--daemon`: detach the way init scripts expect.

The calling process forks and waits on a pipe until the daemon writes that it
is serving (or why it is not), so `mpproxy --daemon` exits 0 only once the
pid file is written and the workers are started.
"""

from __future__ import annotations

import os
import sys


def daemonize(keep_stderr: bool) -> int:
    """Detach; returns in the daemon the write end of the readiness pipe.

    stdin and stdout go to /dev/null, and stderr too unless the error log is stderr.

    The original process never returns: it exits 0 when the daemon reports
    ready, 1 (after printing the daemon's error) otherwise.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        chunks = []
        while True:
            data = os.read(r, 4096)
            if not data:
                break
            chunks.append(data)
        message = b''.join(chunks).decode(errors='replace')
        if message == 'ok':
            os._exit(0)
        sys.stderr.write(message or 'mpproxy: the daemon exited before it was ready\n')
        sys.stderr.flush()
        os._exit(1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)               # the session leader goes; the grandchild can never get a tty
    os.chdir('/')
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    if not keep_stderr:
        os.dup2(null, 2)
    os.close(null)
    return w


def report(fd: int | None, message: str) -> None:
    """Tell the waiting parent `ok` or an error text (then the pipe is closed)."""
    if fd is None:
        return
    try:
        os.write(fd, message.encode())
    except OSError:
        pass
    os.close(fd)
