"""Coarse timers for relays: connect, idle, half-close and preamble timeouts.

Every relay arms and cancels a few timeouts in its life, nearly all of which
never fire. A uvloop `call_later` is a libuv timer handle made, started,
stopped and closed for each (about 2 us a timer on the bench machine); a
`Wheel` files each timeout in a bucket of timeouts due at the same moment,
with one loop timer per bucket, and cancelling one is a set removal.

A timeout fires at the end of its bucket: never early, and late by at most
its delay / 64 (at least RESOLUTION): 10 ms for a 0.5 s connect timeout,
about 2 s for a 10-minute idle timeout.
"""

from __future__ import annotations

import math

RESOLUTION = 0.01         # seconds: the finest bucket
SPREAD = 64               # a bucket spans at most delay / SPREAD


class Entry:
    """One armed timeout; `cancel()` it like an asyncio.TimerHandle."""

    __slots__ = ('bucket', 'fn', 'args')

    def __init__(self, bucket: set, fn, args: tuple):
        self.bucket = bucket
        self.fn = fn
        self.args = args

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None
            self.bucket.discard(self)


class Wheel:
    """Timeouts of one worker's relays, bucketed by when they are due."""

    __slots__ = ('loop', 'buckets', 'steps', 'log')

    def __init__(self, loop, log=None):
        self.loop = loop
        self.buckets: dict[float, set] = {}
        self.steps: dict[float, float] = {}   # delay -> bucket width (a few configured delays)
        self.log = log

    def call_later(self, delay: float, fn, *args) -> Entry:
        step = self.steps.get(delay)
        if step is None:
            step = self.steps[delay] = _step(delay)
        due = -(-(self.loop.time() + delay) // step) * step       # rounded up to a step
        bucket = self.buckets.get(due)
        if bucket is None:
            bucket = self.buckets[due] = set()
            self.loop.call_at(due, self._fire, due)
        entry = Entry(bucket, fn, args)
        bucket.add(entry)
        return entry

    def _fire(self, due: float) -> None:
        for entry in list(self.buckets.pop(due, ())):
            fn = entry.fn
            if fn is None:
                continue
            entry.fn = None
            try:
                fn(*entry.args)
            except Exception:     # noqa: BLE001 - one relay's bug must not skip the others
                if self.log is not None:
                    self.log.exception('unexpected error in a relay timeout')

    def __len__(self) -> int:
        return sum(map(len, self.buckets.values()))


def _step(delay: float) -> float:
    """The bucket width for `delay`: RESOLUTION times a power of two, at most delay / SPREAD
    (so that equal delays share buckets)."""
    if delay <= RESOLUTION * SPREAD:
        return RESOLUTION
    return RESOLUTION * 2 ** math.floor(math.log2(delay / (RESOLUTION * SPREAD)))
