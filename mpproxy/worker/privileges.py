"""What a worker changes about itself while still root: its open-files limit, then its user.

Both run after the fork and before the worker's loop exists (nginx's
`ngx_worker_process_init` order): the limit first, because raising the hard
limit needs root; then setgroups, setgid, setuid, in that order (each needs
the privileges the next one removes), checked by reading the ids back.

Changing the uid makes Linux clear two settings of the process: the parent-death
signal and `dumpable`. The caller arms the parent-death signal afterwards;
`switch_user` sets dumpable back to 1, as nginx does, so a worker can still dump
core and be inspected by its own user (/proc/PID/status and limits are readable
by anyone either way).
"""

from __future__ import annotations

import ctypes
import os
import resource

from mpproxy.config import nofile
from mpproxy.config.accounts import Credentials
from mpproxy.errors import WorkerBootError

_PR_SET_DUMPABLE = 4


def set_nofile(want: int | None) -> str | None:
    """Apply `worker_rlimit_nofile`; a warning to log when it could not be met, else None."""
    if want is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = nofile.nr_open()
    privileged = nofile.can_raise_hard_limit()
    target = nofile.nofile_target(want, soft, hard, privileged, nr_open)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, target)
    except (ValueError, OSError) as exc:
        if not privileged:
            return f'cannot set worker_rlimit_nofile to {want}: {exc}'
        privileged = False                    # not allowed to raise the hard limit after all
        target = nofile.nofile_target(want, soft, hard, False, nr_open)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
        except (ValueError, OSError) as exc:
            return f'cannot set worker_rlimit_nofile to {want}: {exc}'
    if target[0] < want:
        above = "the kernel's fs.nr_open" if privileged else 'the hard limit'
        return f'worker_rlimit_nofile {want} is above {above}; workers use {target[0]}'
    return None


def switch_user(creds: Credentials) -> None:
    """Become `creds` for good; WorkerBootError when any step fails or does not stick."""
    what = f'user {creds.user} (uid {creds.uid}, gid {creds.gid})'
    for step, call, arg in (('setgroups', os.setgroups, list(creds.groups)),
                            ('setgid', os.setgid, creds.gid),
                            ('setuid', os.setuid, creds.uid)):
        try:
            call(arg)
        except OSError as exc:
            raise WorkerBootError(f'cannot switch to {what}: {step}: {exc.strerror}') from None
    if os.getresuid() != (creds.uid,) * 3 or os.getresgid() != (creds.gid,) * 3:
        raise WorkerBootError(f'cannot switch to {what}: the ids did not stick '
                              f'(uids {os.getresuid()}, gids {os.getresgid()})')
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
