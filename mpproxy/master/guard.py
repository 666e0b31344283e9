"""The master's last line of defence: no bug ends the master.

Every step of the arbiter's loop (the poll, each ready socket's handler, each
`handle_<signal>`, the config watcher, reaping, reconciling, each table event, the admin
endpoint's timers) runs through `Guard.run`. An exception that escapes a step is one
nobody planned for (planned failures are logged where they happen: a reload that fails,
a fork that fails, a log file that cannot be written); it is logged at `crit` with its
traceback, and the loop goes on to the next step, so the master keeps serving signals
and keeping its workers. The same error from the same step is logged once per
REPEAT_INTERVAL, with how often it recurred meanwhile, so a bug hit on every turn of the
loop (four times a second) does not flood the error log.
"""

from __future__ import annotations

import time

from mpproxy.observe import log as logmod

log = logmod.log

REPEAT_INTERVAL = 60.0     # seconds between two reports of the same error from one step
MAX_KINDS = 64             # errors remembered for that; the oldest are forgotten first


class Guard:
    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.reported: dict[tuple, list] = {}    # (step, type, text) -> [quiet until, count]
        self.errors = 0                          # every error caught, reported or not

    def run(self, step: str, func, *args):
        """`func(*args)`; an exception is reported and None returned instead."""
        try:
            return func(*args)
        except Exception as exc:                 # noqa: BLE001 - the point of this module
            self.errors += 1
            try:
                self.report(step, exc)
            except Exception:                    # noqa: BLE001 - e.g. MemoryError again
                pass
            return None

    def report(self, step: str, exc: BaseException) -> None:
        now = self.clock()
        key = (step, type(exc).__name__, str(exc)[:200])
        entry = self.reported.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            return
        again = f' (it happened {entry[1]} more time(s) since it was last logged)' \
            if entry is not None and entry[1] else ''
        log.critical('unexpected error in %s: %s: %s; the master goes on%s', step,
                     type(exc).__name__, exc, again, exc_info=exc)
        self.reported.pop(key, None)
        self.reported[key] = [now + REPEAT_INTERVAL, 0]
        while len(self.reported) > MAX_KINDS:
            del self.reported[next(iter(self.reported))]
