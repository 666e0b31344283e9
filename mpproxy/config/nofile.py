"""Open files: how many one worker may need, and the limit workers will have.

`files_needed` and `nofile_target` are pure (unit-tested); `startup_warnings`
reads this process's limits and euid and gives the lines `-t` prints and the
master logs when a config is applied.

The estimate for one worker: its listening sockets (one per listener: the
shared TCP socket or its slot's), two sockets per TCP connection up to
`max_connections` (a whole-listener cap, so one worker may hold all of them;
not counted when 0, there is no knowing), one upstream socket per UDP session
up to `udp.max_sessions` (a per-worker cap), one per health-checked server
(worker 0 checks), and BASE_FILES for the rest.
"""

from __future__ import annotations

import os
import resource
import sys

from mpproxy.config import accounts
from mpproxy.config.schema import Config

# stdio, the error log, the control and handoff sockets, epoll, uvloop's signal and
# wake-up pipes, DNS lookups in flight; an idle worker holds about 12 of these.
BASE_FILES = 32
NR_OPEN_FALLBACK = 1 << 20            # the kernel's default fs.nr_open
CAP_SYS_RESOURCE = 24


def files_needed(config: Config) -> tuple[int, list[str]]:
    """(open files one worker may need, the caps that make up most of them, as text)."""
    caps = []
    for i, listener in enumerate(config.listeners):
        if listener.protocol == 'udp':
            caps.append((f'listeners[{i}].udp.max_sessions', listener.udp.max_sessions))
        elif listener.max_connections:
            caps.append((f'2 × listeners[{i}].max_connections', 2 * listener.max_connections))
    checked = sum(len(u.servers) for u in config.upstreams.values() if u.health_check)
    rest = BASE_FILES + len(config.listeners) + checked
    total = rest + sum(n for _, n in caps)
    return total, [f'{what} {n}' for what, n in caps] + [f'listening sockets and the rest {rest}']


def nofile_target(want: int | None, soft: int, hard: int, privileged: bool,
                  nr_open: int) -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE a worker sets for `worker_rlimit_nofile: want`.

    Privileged (CAP_SYS_RESOURCE, as root has), the hard limit is raised too, up to the kernel's fs.nr_open;
    otherwise the soft limit goes at most to the hard one.
    """
    if want is None:
        return soft, hard
    if privileged:
        target = min(want, nr_open)
        return target, max(target, hard) if hard != resource.RLIM_INFINITY else hard
    return (want if hard == resource.RLIM_INFINITY else min(want, hard)), hard


def nofile_warning(config: Config, limit: int) -> str | None:
    """The warning when one worker may need more open files than `limit`, else None."""
    needed, parts = files_needed(config)
    if limit == resource.RLIM_INFINITY or needed <= limit:
        return None
    return (f'{config.path}: workers may need {needed} open files ({", ".join(parts)}) but '
            f'their limit is {limit}; raise worker_rlimit_nofile')


def nr_open() -> int:
    try:
        with open('/proc/sys/fs/nr_open') as f:
            return int(f.read())
    except (OSError, ValueError):
        return NR_OPEN_FALLBACK


def can_raise_hard_limit() -> bool:
    """Whether this process may raise its hard limits: CAP_SYS_RESOURCE, which root has
    except in containers that drop it."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('CapEff:'):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def worker_nofile_limit(config: Config) -> int:
    """The open-files limit this config's workers will have if started from this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit, _ = nofile_target(config.worker_rlimit_nofile, soft, hard, can_raise_hard_limit(),
                             nr_open())
    return sys.maxsize if limit == resource.RLIM_INFINITY else limit


def startup_warnings(config: Config) -> list[str]:
    """What `-t` prints as warnings and the master logs when it applies `config`."""
    lines = []
    ignored = accounts.user_ignored(config.user, os.geteuid())
    if ignored:
        lines.append(f'{config.path}: {ignored}')
    nofile = nofile_warning(config, worker_nofile_limit(config))
    if nofile:
        lines.append(nofile)
    return lines
