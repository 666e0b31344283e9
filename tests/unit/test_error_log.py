"""The error log file on a full disk: lines are dropped and counted, never raised, and the
first line that can be written again says how many were lost (/dev/full gives a real ENOSPC)."""

from __future__ import annotations

import os

import pytest

from mpproxy.observe import log as logmod


@pytest.fixture
def error_log(tmp_path):
    """The error log set up to a file, and the logger put back as it was afterwards."""
    logger = logmod.log
    saved = (logger.handlers[:], logger.level, logger.propagate, logmod._handler, logmod._target)
    path = tmp_path / 'error.log'
    logmod.setup(str(path), 'info')
    yield path
    logmod._handler.close()
    logger.handlers[:], level, logger.propagate, logmod._handler, logmod._target = saved
    logger.setLevel(level)


def _handler_fd() -> int:
    (fd,) = logmod.fds()
    return fd


def test_lines_written_while_the_disk_is_full_are_counted_then_reported(error_log, capsys):
    logmod.log.info('before')
    fd = _handler_fd()
    saved = os.dup(fd)
    full = os.open('/dev/full', os.O_WRONLY)
    try:
        os.dup2(full, fd)                       # the disk is full from here on
        for i in range(5):
            logmod.log.warning('lost %d', i)    # must not raise
        os.dup2(saved, fd)                      # space again
        logmod.log.info('after')
    finally:
        os.close(full)
        os.close(saved)
    lines = error_log.read_text().splitlines()
    assert [line.split(': ', 1)[1] for line in lines] == [
        'before', '5 error log line(s) lost: No space left on device', 'after']
    assert '[warn]' in lines[1]
    assert capsys.readouterr().err == ''        # no "--- Logging error ---" traceback


def test_fds_names_the_file_a_forked_worker_must_keep(error_log):
    st = os.fstat(_handler_fd())
    assert (st.st_dev, st.st_ino) == (error_log.stat().st_dev, error_log.stat().st_ino)
