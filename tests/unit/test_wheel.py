"""Wheel (proxy/io/wheel.py): coarse relay timeouts, on a real uvloop loop (firing times measured
with loop.time()) and, where only the bucketing is checked, on a loop whose clock the test sets.
Every wait has a deadline; the loop is closed in teardown and no exception may reach its
exception handler."""

from __future__ import annotations

import logging

import pytest
import uvloop

from helpers.unit import ListHandler, run_loop_until
from mpproxy.proxy.io.wheel import RESOLUTION, SPREAD, Wheel

SLACK = 0.005             # the loop's own lateness in running a due timer


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    errors = []
    loop.set_exception_handler(lambda loop, ctx: errors.append(ctx))
    try:
        yield loop
    finally:
        loop.close()
    assert not errors, errors


@pytest.fixture
def log():
    handler = ListHandler()
    logger = logging.getLogger('test.wheel.%d' % id(handler))
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.records = handler.records
    yield logger
    logger.removeHandler(handler)


class ClockLoop:
    """The two loop methods a Wheel uses, with a clock the test sets."""

    def __init__(self, now=1000.0):
        self.now = now
        self.timers = []              # (when, fn, args) per call_at

    def time(self):
        return self.now

    def call_at(self, when, fn, *args):
        self.timers.append((when, fn, args))


def arm_together(loop, delay, fns, log=None):
    """A fresh Wheel with `fns` armed with the same `delay` in one bucket. Armed back to back
    they share one unless the clock crosses a bucket boundary in between: then try again."""
    for _ in range(5):
        wheel = Wheel(loop, log)
        entries = [wheel.call_later(delay, fn, *args) for fn, *args in fns]
        if len(wheel.buckets) == 1:
            return wheel, entries
        for entry in entries:
            entry.cancel()
    raise AssertionError('could not arm the entries in one bucket')


def test_fires_never_early_and_late_by_at_most_its_bucket(loop):
    wheel = Wheel(loop)
    delays = [0.0, 0.003, 0.01, 0.037, 0.2, 0.64, 0.65, 0.9, 1.3, 1.5]
    armed, fired = {}, {}
    for delay in delays:
        armed[delay] = loop.time()
        wheel.call_later(delay, lambda d=delay: fired.setdefault(d, loop.time()))
    assert len(wheel) == len(delays)
    run_loop_until(loop, lambda: len(fired) == len(delays), what='every timeout')

    for delay in delays:
        late = fired[delay] - (armed[delay] + delay)
        assert late >= -1e-6, (delay, late)                  # never early
        bound = max(RESOLUTION, delay / SPREAD) + SLACK
        assert late <= bound, (delay, late, bound)
    assert len(wheel) == 0 and wheel.buckets == {}


@pytest.mark.parametrize('delay', [0.0, 0.004, 0.3, 0.64, 0.65, 1.0, 2.5, 7.0, 30.0, 60.0,
                                   299.9, 600.0, 3600.0])
def test_bucket_end_is_never_early_and_late_by_at_most_delay_over_spread(delay):
    """The same bound for delays too long to wait for: where the loop timer is set."""
    clock = ClockLoop()
    wheel = Wheel(clock)
    for i in range(200):
        clock.now = 1000.0 + i * 0.0137
        entry = wheel.call_later(delay, lambda: None)
        due = [when for when, bucket in wheel.buckets.items() if bucket is entry.bucket]
        assert len(due) == 1
        assert any(when == due[0] for when, _, _ in clock.timers)      # a loop timer for it
        late = due[0] - (clock.now + delay)
        assert late >= -1e-9
        assert late <= max(RESOLUTION, delay / SPREAD) + 1e-9


def test_cancel_prevents_firing_and_removes_the_entry(loop):
    wheel = Wheel(loop)
    fired = []
    gone = wheel.call_later(0.01, fired.append, 'gone')
    also_gone = wheel.call_later(0.01, fired.append, 'also gone')
    wheel.call_later(0.06, fired.append, 'sentinel')          # a later bucket
    assert len(wheel) == 3
    gone.cancel()
    assert len(wheel) == 2
    gone.cancel()                     # twice: no error, no change
    assert len(wheel) == 2
    also_gone.cancel()
    assert len(wheel) == 1

    run_loop_until(loop, lambda: fired, what='the sentinel')
    assert fired == ['sentinel'] and len(wheel) == 0


def test_equal_delays_armed_together_share_a_bucket():
    clock = ClockLoop(1000.001)
    wheel = Wheel(clock)
    for now in (1000.001, 1000.004, 1000.009):        # within one 10 ms step
        clock.now = now
        wheel.call_later(0.3, lambda: None)
    assert len(wheel.buckets) == 1 and len(wheel) == 3
    assert len(clock.timers) == 1                       # one loop timer for the bucket
    wheel.call_later(0.5, lambda: None)
    assert len(wheel.buckets) == 2 and len(clock.timers) == 2

    for i in range(100):        # 600 s: buckets of 5.12 s; due in (2595.84, 2600.96]: one
        clock.now = 1996.0 + i * 0.01
        wheel.call_later(600.0, lambda: None)
    assert len(wheel.buckets) == 3 and len(clock.timers) == 3 and len(wheel) == 104


def test_equal_delays_armed_together_fire_together(loop):
    fired = []
    wheel, _ = arm_together(loop, 0.02, [(fired.append, i) for i in range(50)])
    assert len(wheel) == 50
    run_loop_until(loop, lambda: fired, what='the bucket')
    assert sorted(fired) == list(range(50))             # all in the same loop callback
    assert len(wheel) == 0 and wheel.buckets == {}


def test_cancelling_another_entry_of_the_bucket_from_a_callback(loop, log):
    fired = []
    entries = []

    def cancel_the_other(me):
        fired.append(me)
        entries[1 - me].cancel()
        entries[me].cancel()          # its own, already fired: harmless too
    wheel, found = arm_together(loop, 0.01, [(cancel_the_other, 0), (cancel_the_other, 1)], log)
    entries.extend(found)
    run_loop_until(loop, lambda: fired, what='the bucket')
    run_loop_until(loop, lambda: not wheel.buckets, what='the bucket to be done')
    assert len(fired) == 1 and len(wheel) == 0
    assert log.records == []          # nothing raised (nor was the cancelled one called)


def test_an_exception_in_a_callback_does_not_skip_the_others(loop, log):
    fired = []

    def boom():
        raise RuntimeError('boom')
    fns = [(fired.append, 1), (boom,), (fired.append, 2), (boom,), (fired.append, 3)]
    wheel, _ = arm_together(loop, 0.01, fns, log)
    run_loop_until(loop, lambda: len(fired) == 3, what='the other callbacks')
    assert sorted(fired) == [1, 2, 3]
    assert [r.exc_info[0] for r in log.records] == [RuntimeError, RuntimeError]
    assert len(wheel) == 0


def test_args_are_passed(loop):
    wheel = Wheel(loop)
    got = []
    marker = object()
    wheel.call_later(0.005, lambda *args: got.append(args), 1, 'two', marker)
    run_loop_until(loop, lambda: got, what='the callback')
    assert got == [(1, 'two', marker)]
