"""The config file watcher (master/watch.py): identity, debounce, no retry, missing file.

Real files in tmp_path, a fake clock: each `tick()` moves past the poll interval.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from helpers.configmap import ConfigMapDir
from mpproxy.master.watch import MISSING, ConfigWatch, identity

CONFIG = 'listeners: [{listen: "127.0.0.1:8000", upstream: ["127.0.0.1:9000"]}]\n'
OTHER = 'listeners: [{listen: "127.0.0.1:8000", upstream: ["127.0.0.1:9001"]}]\n'  # same size


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def watcher(path, clock) -> ConfigWatch:
    return ConfigWatch(str(path), interval=1.0, clock=clock)


def polls(watch: ConfigWatch, clock: Clock, n: int) -> list[bool]:
    """n polls, one interval apart."""
    results = []
    for _ in range(n):
        clock.now += 1.0
        results.append(watch.poll())
    return results


def rewrite(path, text: str, times=None) -> None:
    """An in-place write (same inode), optionally with (atime_ns, mtime_ns) set afterwards."""
    with open(path, 'r+') as f:
        f.truncate(0)
        f.write(text)
    if times:
        os.utime(path, ns=times)


def test_an_unchanged_file_never_asks_for_a_reload(tmp_path, clock):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    assert polls(watch, clock, 5) == [False] * 5


def test_a_rewrite_reloads_once_it_has_settled_then_only_once(tmp_path, clock):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    rewrite(path, CONFIG + '# a comment\n')
    # seen once: pending; the same identity on the next poll: reload; then quiet
    assert polls(watch, clock, 4) == [False, True, False, False]


def test_no_stat_before_the_interval_has_passed(tmp_path, clock):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    rewrite(path, CONFIG + '# a comment\n')
    clock.now += 0.5
    assert not watch.poll() and not watch.seen         # too early: nothing looked at
    clock.now += 0.5
    assert not watch.poll() and watch.seen
    clock.now += 0.9
    assert not watch.poll()                            # the confirming poll is not due yet
    clock.now += 0.1
    assert watch.poll()


def test_a_writer_in_the_middle_of_a_write_is_waited_for(tmp_path, clock):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    with open(path, 'w') as f:
        f.write(CONFIG[:10])                           # half written
        f.flush()
        assert polls(watch, clock, 1) == [False]
        f.write(CONFIG[10:] + '# more\n')              # it goes on: a new identity
        f.flush()
        assert polls(watch, clock, 1) == [False]       # still not settled
    assert polls(watch, clock, 2) == [True, False]


def test_a_change_back_to_the_loaded_file_is_no_change(tmp_path, clock):
    cm = ConfigMapDir(tmp_path, CONFIG)
    watch = watcher(cm.path, clock)
    first = cm.current
    new = cm._write_version(OTHER)
    os.symlink(new, tmp_path / '..data_tmp')
    os.rename(tmp_path / '..data_tmp', tmp_path / '..data')
    assert polls(watch, clock, 1) == [False]           # pending: the new file
    os.symlink(first, tmp_path / '..data_tmp')         # swapped back before it settled
    os.rename(tmp_path / '..data_tmp', tmp_path / '..data')
    assert polls(watch, clock, 3) == [False] * 3


def test_a_file_that_was_tried_is_not_retried_until_it_changes(tmp_path, clock):
    """The watcher does not know whether the reload worked: a broken file is tried once."""
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    rewrite(path, 'listeners: [\n')                    # broken
    assert polls(watch, clock, 2) == [False, True]
    watch.loading()                                    # the arbiter's reload (it fails)
    assert polls(watch, clock, 10) == [False] * 10
    rewrite(path, CONFIG + '# fixed\n')
    assert polls(watch, clock, 2) == [False, True]


def test_a_reload_by_hup_resets_a_pending_change(tmp_path, clock):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    rewrite(path, CONFIG + '# edited\n')
    assert polls(watch, clock, 1) == [False]           # pending
    watch.loading()                                    # the operator sent HUP meanwhile
    assert polls(watch, clock, 3) == [False] * 3       # no second reload of the same file


def test_a_rewrite_with_the_same_size_and_mtime_is_seen_by_its_ctime(tmp_path, clock):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    st = os.stat(path)
    watch = watcher(path, clock)
    # ctime is the kernel's clock, coarse: wait until it has moved on before the rewrite
    probe, deadline = tmp_path / 'probe', time.monotonic() + 2
    while time.monotonic() < deadline:
        probe.write_text('x')
        if os.stat(probe).st_ctime_ns != st.st_ctime_ns:
            break
    rewrite(path, OTHER, (st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert polls(watch, clock, 2) == [False, True]


def test_configmap_swap_reloads_even_with_the_same_size_and_mtime(tmp_path, clock):
    cm = ConfigMapDir(tmp_path, CONFIG)
    watch = watcher(cm.path, clock)
    before = identity(str(cm.path))
    assert before[0] == str(cm.file())                 # the real path, through both links
    cm.update(OTHER, same_times=True)
    after = identity(str(cm.path))
    assert after[3:5] == before[3:5]                   # size and mtime: equal
    assert after[0] != before[0] and after[2] != before[2]   # real path and inode: not
    assert polls(watch, clock, 3) == [False, True, False]


def test_the_real_path_alone_tells_two_links_to_one_inode_apart(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    (tmp_path / 'a' / 'c.yaml').write_text(CONFIG)
    os.link(tmp_path / 'a' / 'c.yaml', tmp_path / 'b' / 'c.yaml')
    os.symlink('a', tmp_path / 'cur')
    first = identity(str(tmp_path / 'cur' / 'c.yaml'))
    os.symlink('b', tmp_path / 'tmp')
    os.rename(tmp_path / 'tmp', tmp_path / 'cur')
    second = identity(str(tmp_path / 'cur' / 'c.yaml'))
    assert first[1:] == second[1:] and first != second


def test_a_missing_file_is_logged_once_and_reloaded_when_back(tmp_path, clock, caplog):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(CONFIG)
    watch = watcher(path, clock)
    path.unlink()
    with caplog.at_level(logging.WARNING, logger='mpproxy'):
        assert polls(watch, clock, 6) == [False] * 6
    warnings = [r for r in caplog.records if 'is missing' in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert watch.loaded is MISSING
    path.write_text(CONFIG)                            # back, even as it was: reload it
    assert polls(watch, clock, 3) == [False, True, False]


def test_a_symlink_dangling_for_a_moment_is_not_reported(tmp_path, clock, caplog):
    """A swap that is not atomic (unlink, then symlink): one poll may see nothing."""
    cm = ConfigMapDir(tmp_path, CONFIG)
    watch = watcher(cm.path, clock)
    new = cm._write_version(OTHER)
    os.unlink(tmp_path / '..data')
    with caplog.at_level(logging.WARNING, logger='mpproxy'):
        assert polls(watch, clock, 1) == [False]       # dangling: pending MISSING
        os.symlink(new, tmp_path / '..data')
        assert polls(watch, clock, 3) == [False, True, False]
    assert not [r for r in caplog.records if 'is missing' in r.getMessage()]
