"""For unit tests that run mpproxy's objects in this process: `ListHandler` (keeps every log
record), `run_loop_until` (drives an event loop to a condition, with a deadline) and
`serve_env` (the body of an `env` fixture that fails the test on a loop error)."""

from __future__ import annotations

import asyncio
import logging
import time


class ListHandler(logging.Handler):
    """Keeps every log record (unit tests of code that logs)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def run_loop_until(loop, cond, timeout: float = 5.0, what: str = 'condition',
                   step: float = 0.001) -> None:
    """Run `loop` until `cond()` holds (checked every `step` s); AssertionError after `timeout`."""
    async def wait():
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError('timed out waiting for ' + what)
            await asyncio.sleep(step)
    loop.run_until_complete(wait())


def serve_env(env):
    """The body of a unit test's `env` fixture (`yield from serve_env(Env())`): yields it,
    closes it, then fails the test if its loop reported an error."""
    try:
        yield env
    finally:
        errors = env.loop_errors
        env.close()
    assert not errors, errors
