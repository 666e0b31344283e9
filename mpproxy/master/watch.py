"""`watch_config: true`: notice when the config file changes and ask for a reload.

No inotify and no thread: the arbiter's main loop calls `ConfigWatch.poll()` on every turn
(its selector wakes up at least every 0.25 s), and at most once per `WATCH_INTERVAL` the
watcher stats the file (microseconds on a local file: signals wait for no one). The file's
identity is

    (real path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)     or MISSING

with stat following symlinks and the real path resolving them, so that both ways a config
file changes are seen:

- an in-place write (an editor, `>`, `cp`): size, mtime or ctime change;
- a Kubernetes ConfigMap update: `mpproxy.yaml -> ..data/mpproxy.yaml` stays, while
  `..data -> ..<timestamp>` is swapped by an atomic rename to a new directory. The real path
  and the inode change even when the new file has the old one's size and mtime.

A changed identity is acted upon only once it has settled: the same new identity on two polls
in a row (at least one interval apart), so that a file in the middle of being written is not
loaded. States of `ConfigWatch` (`loaded`: the identity the running configuration was read
from; `pending`: a new identity seen on the last poll):

                     identity != loaded
       QUIET ───────────────────────────────▶ PENDING ──┐ yet another identity:
         ▲  ◀─────────────────────────────────  │   ▲ ──┘ pending := it
         │           identity == loaded         │
         │                                      │ identity == pending (settled): loaded := it;
         └──────────────────────────────────────┘ a file: reload; MISSING: warn once
       loading() (before every reload, HUP's or the watcher's): loaded := the file now → QUIET

`loading()` runs just before a reload reads the file, whether the reload came from HUP or
from here and whether it then succeeds or not. So a broken file is tried once, not in a
loop: only its next change triggers again; and a HUP right after an edit is not followed by
a second reload of the same file.

The arbiter polls only while `watch_config` of its running configuration is true (a reload
turns it on or off for the next poll), while it is not stopping, and not while a new master
it started by USR2 lives: that one watches the same file on its own and carries the service
on, and two masters reloading on one change would both bind new listeners (one fails) and
shut down removed ones that they share. Should the new master exit, polling resumes, and a
change made meanwhile is then seen and reloaded (`loaded` still names the old file).
"""

from __future__ import annotations

import os
import time

from mpproxy.observe import log as logmod

log = logmod.log

WATCH_INTERVAL = 1.0       # seconds between two stats of the config file
MISSING = None             # the identity of a file that cannot be stat'ed


def identity(path: str):
    """What identifies the content of `path` without reading it; MISSING if it cannot be
    stat'ed (deleted, a dangling symlink, no permission)."""
    try:
        st = os.stat(path)                 # follows symlinks: the file itself
    except OSError:
        return MISSING
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


class ConfigWatch:
    """Polls one config file; `poll()` says when a settled change asks for a reload."""

    def __init__(self, path: str, interval: float = WATCH_INTERVAL, clock=time.monotonic):
        self.path = path
        self.interval = interval
        self.clock = clock
        self.loaded = identity(path)       # what the running configuration was read from
        self.pending = MISSING             # a new identity seen once, not yet settled
        self.seen = False                  # `pending` holds an identity seen once
        self.next_poll = clock() + interval

    def loading(self) -> None:
        """A reload is about to read the file: what it is now is what will have been tried.
        (Stat before read: a write in between only makes the next polls reload once more.)"""
        self.loaded = identity(self.path)
        self.seen = False

    def poll(self) -> bool:
        """Stat the file if an interval has passed; True when the arbiter should reload now."""
        now = self.clock()
        if now < self.next_poll:
            return False
        self.next_poll = now + self.interval
        current = identity(self.path)
        if current == self.loaded:
            self.seen = False                # back as it was (or never really changed)
            return False
        if not self.seen or current != self.pending:
            self.pending, self.seen = current, True     # wait for it to settle
            log.debug('config file %s changed; reloading once it stays unchanged for %gs',
                      self.path, self.interval)
            return False
        self.seen = False
        self.loaded = current                # tried once; only its next change triggers again
        if current is MISSING:
            log.warning('config file %s is missing (or cannot be stat\'ed); keeping the running '
                        'configuration, reloading when the file is back', self.path)
            return False
        log.log(logmod.NOTICE, 'config file changed, reloading')
        return True
