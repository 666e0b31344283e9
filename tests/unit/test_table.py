"""The worker table's answer to a fork that fails for an ACTIVE slot: the respawn back-off,
and one log line per slot and cause per FORK_LOG_INTERVAL (time passed in explicitly)."""

from __future__ import annotations

import errno
import logging
import selectors
from types import SimpleNamespace

import pytest

from mpproxy.master.table import BACKOFF_MAX, FORK_LOG_INTERVAL, WorkerTable

EAGAIN = OSError(errno.EAGAIN, 'Resource temporarily unavailable')
ENOMEM = OSError(errno.ENOMEM, 'Cannot allocate memory')


@pytest.fixture
def table():
    with selectors.DefaultSelector() as selector:
        yield WorkerTable(selector, retire=lambda worker: None)


GENERATION = SimpleNamespace(number=4)


def test_each_failed_fork_doubles_the_wait_up_to_the_cap(table):
    delays = []
    now = 100.0
    for _ in range(10):
        table._fork_failed(GENERATION, 1, EAGAIN, now)
        failures, not_before = table.backoff[1]
        delays.append(not_before - now)
    assert delays == [0.5, 0.5, 1, 2, 4, 8, 16, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]
    assert table.unforked == {1: 10}


def test_a_cause_is_logged_once_per_interval_then_with_a_count(table, log_records):
    now = 100.0
    for _ in range(4):
        table._fork_failed(GENERATION, 0, EAGAIN, now)
        now += 1
    assert [r.getMessage() for r in log_records] == [
        'cannot fork worker 0 (generation 4): Resource temporarily unavailable; retrying in 0.5s']
    table._fork_failed(GENERATION, 0, ENOMEM, now)          # another cause: said at once
    table._fork_failed(GENERATION, 1, EAGAIN, now)          # another slot: said at once
    assert len(log_records) == 3
    table._fork_failed(GENERATION, 0, EAGAIN, 100.0 + FORK_LOG_INTERVAL)
    assert len(log_records) == 4
    assert log_records[-1].getMessage().endswith('(3 more failure(s) not logged)')
    assert all(r.levelno == logging.ERROR for r in log_records)
