"""Rate-limited logging: at most one line per interval per cause.

The data path meets the same error many times a second (a dead upstream
answers every datagram with ICMP port unreachable); logging each one would
flood the error log and cost more than the traffic. `RateLimitedLog` lets one
line per cause through per interval and counts the rest; the next line that
gets through for that cause says how many were suppressed, and `flush()`
writes the pending counts out (call it when the owner stops).

A cause is any hashable value, usually a short string such as
'refused 10.0.0.1:53'. The table of causes is bounded: past `max_causes` the
oldest entries are forgotten (their suppressed counts are flushed first).
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Wraps a `logging.Logger`; `warning(cause, msg, *args)` and friends."""

    __slots__ = ('logger', 'interval', 'max_causes', '_clock', '_last', '_suppressed')

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock=time.monotonic, max_causes: int = 1024):
        self.logger = logger
        self.interval = interval
        self.max_causes = max_causes
        self._clock = clock
        self._last: dict = {}          # cause -> time of the last line written
        self._suppressed: dict = {}    # cause -> (count, level, msg, args) since then

    def log(self, level: int, cause, msg: str, *args, exc_info=None) -> bool:
        """Write the line unless `cause` was written less than `interval` ago.

        Returns True when the line was written.
        """
        now = self._clock()
        last = self._last.get(cause)
        if last is not None and now - last < self.interval:
            count = self._suppressed.get(cause, (0,))[0]
            self._suppressed[cause] = (count + 1, level, msg, args)
            return False
        if last is None and len(self._last) >= self.max_causes:
            self._forget_oldest()
        self._last[cause] = now
        pending = self._suppressed.pop(cause, None)
        if pending is not None:
            msg = msg + ' (%d similar suppressed)'
            args = args + (pending[0],)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def debug(self, cause, msg: str, *args, **kw) -> bool:
        return self.log(logging.DEBUG, cause, msg, *args, **kw)

    def info(self, cause, msg: str, *args, **kw) -> bool:
        return self.log(logging.INFO, cause, msg, *args, **kw)

    def warning(self, cause, msg: str, *args, **kw) -> bool:
        return self.log(logging.WARNING, cause, msg, *args, **kw)

    warn = warning

    def error(self, cause, msg: str, *args, **kw) -> bool:
        return self.log(logging.ERROR, cause, msg, *args, **kw)

    def flush(self) -> None:
        """Write one line per cause that has suppressed lines pending."""
        pending, self._suppressed = self._suppressed, {}
        for count, level, msg, args in pending.values():
            self.logger.log(level, msg + ' (%d similar suppressed)', *args, count)

    def _forget_oldest(self) -> None:
        # dicts keep insertion order; a cause re-logged is not moved, which is
        # good enough for a bound on memory
        for cause in list(self._last)[: max(1, self.max_causes // 4)]:
            del self._last[cause]
            pending = self._suppressed.pop(cause, None)
            if pending is not None:
                count, level, msg, args = pending
                self.logger.log(level, msg + ' (%d similar suppressed)', *args, count)
