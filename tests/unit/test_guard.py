"""The master's guard: an unexpected exception in a step is logged at crit with its
traceback, once per minute per kind, and never escapes (time from an injected clock)."""

from __future__ import annotations

import logging


from mpproxy.master.guard import MAX_KINDS, REPEAT_INTERVAL, Guard


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def boom(what='disk on fire'):
    raise RuntimeError(what)


def test_a_step_that_works_returns_its_value(log_records):
    assert Guard().run('adding', lambda a, b: a + b, 2, 3) == 5
    assert log_records == []


def test_an_exception_is_logged_at_crit_with_its_traceback_and_goes_no_further(log_records):
    guard = Guard(Clock())
    assert guard.run('handle_hup', boom) is None
    (record,) = log_records
    assert record.levelno == logging.CRITICAL
    assert record.getMessage() == ('unexpected error in handle_hup: RuntimeError: disk on fire; '
                                   'the master goes on')
    assert record.exc_info[0] is RuntimeError
    assert guard.errors == 1


def test_the_same_error_is_logged_once_a_minute_with_a_count(log_records):
    clock = Clock()
    guard = Guard(clock)
    for _ in range(5):                       # a bug hit on every turn of the loop
        guard.run('manage_workers', boom)
        clock.now += 0.25
    assert len(log_records) == 1
    clock.now += REPEAT_INTERVAL
    guard.run('manage_workers', boom)
    assert len(log_records) == 2
    assert log_records[1].getMessage().endswith(
        'the master goes on (it happened 4 more time(s) since it was last logged)')
    assert guard.errors == 6


def test_other_steps_and_other_errors_are_logged_on_their_own(log_records):
    guard = Guard(Clock())
    guard.run('reaping', boom)
    guard.run('manage_workers', boom)
    guard.run('reaping', boom, 'another message')
    guard.run('reaping', lambda: {}['missing'])
    assert len(log_records) == 4


def test_memory_of_errors_is_bounded(log_records):
    guard = Guard(Clock())
    for i in range(MAX_KINDS * 3):
        guard.run('step', boom, f'error {i}')
    assert len(guard.reported) == MAX_KINDS
    assert len(log_records) == MAX_KINDS * 3
