"""sd_notify(3) without libsystemd: the master tells systemd (`Type=notify`) how it is doing.

A message is one datagram of `KEY=value` lines sent to the AF_UNIX socket named in
`$NOTIFY_SOCKET`: a path, or `@name` for the abstract namespace. Without the
variable nothing is sent. A send never blocks (a full socket drops the message)
and never raises into the master; the first failure is logged as a warning.
The variable stays in the environment, so the master that USR2 execs inherits it.

What the arbiter sends, and when:

    first generation serves     READY=1  STATUS=serving: ...  MAINPID=<own pid>
    HUP                         RELOADING=1  MONOTONIC_USEC=<CLOCK_MONOTONIC µs>  STATUS=...
    reload done / failed        READY=1  STATUS=serving: generation N active | reload failed, ...
    QUIT, TERM, INT             STOPPING=1  STATUS=...
    USR2                        STATUS=binary upgrade: new master pid N starting
      the new master, serving   READY=1  STATUS=...  MAINPID=<its pid>   (systemd follows it)
      the old master            nothing more while the new master lives (no STOPPING=1 on
                                QUIT: the service goes on in the new master)
      new master exits          READY=1  STATUS=binary upgrade failed (backed out: exit 0),
                                ...  MAINPID=<own pid>
                                (failed, or QUIT to back out: it sends no STOPPING=1 while
                                the old master, its parent, lives)
"""

from __future__ import annotations

import os
import socket
import time

from mpproxy.observe import log as logmod

log = logmod.log

ENV = 'NOTIFY_SOCKET'
VALUE_MAX = 1024          # systemd reads one datagram of at most a pipe buffer (4 KiB)

_warned = False


def address(value: str | None) -> str | bytes | None:
    """The socket address `value` ($NOTIFY_SOCKET) names, or None (unset, or a kind this
    module does not speak, such as vsock:)."""
    if not value:
        return None
    if value[0] == '@':
        return b'\0' + os.fsencode(value[1:])
    if value[0] == '/':
        return value
    return None


def encode(fields: dict[str, object]) -> bytes:
    """`KEY=value` lines; a value is put on one line and cut to VALUE_MAX characters."""
    lines = []
    for key, value in fields.items():
        text = ' '.join(str(value).splitlines())
        if len(text) > VALUE_MAX:
            text = text[:VALUE_MAX - 3] + '...'
        lines.append(f'{key}={text}\n')
    return ''.join(lines).encode(errors='replace')


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it beside (systemd >= 253)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def send(**fields) -> bool:
    """Send `fields` (in order) to $NOTIFY_SOCKET; False when unset or the send failed."""
    global _warned
    target = address(os.environ.get(ENV))
    if target is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX,
                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(encode(fields), target)
        return True
    except (OSError, ValueError) as exc:
        if not _warned:
            _warned = True
            log.warning('cannot notify systemd through %s=%s: %s', ENV, os.environ.get(ENV),
                        getattr(exc, 'strerror', None) or exc)
        return False
