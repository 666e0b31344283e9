"""`watch_config: true`: the real mpproxy reloads when its config file changes, no signal sent.

The master polls the file once a second and reloads once a change has been seen on two polls
in a row, so a change is applied within about 2.5 s; the waits below give it 10 s. Where a
test checks that something does NOT happen, it watches for a bounded window (OBSERVE) that
covers more than two poll intervals, and says so.
"""

from __future__ import annotations

import os
import signal
import time

from helpers.backends import tagged_backend
from helpers.configmap import ConfigMapDir
from helpers.configs import render, tcp_config, with_keys
from helpers.net import first_bytes, free_port
from helpers.proc import wait_for, workers_of

RELOAD = 10.0           # deadline for a change to be applied
OBSERVE = 3.5           # a window in which nothing must happen: > 2 polls of 1 s, plus slack


def watched(port: int, upstream: str, on: bool = True, **keys) -> dict:
    """A TCP config with `watch_config: true` (unless `on` is false) and `keys`."""
    config = tcp_config(port, upstream)
    return with_keys(config, watch_config=True, **keys) if on else config


def all_from(port: int, tag: bytes, n: int = 10) -> bool:
    return all(first_bytes(port, 1) == tag for _ in range(n))


def only_from(port: int, tag: bytes) -> bool:
    """After 'generation N active' the old generation's workers have been told to stop
    accepting, and do within moments: then 20 connections in a row reach `tag`."""
    return wait_for(lambda: all_from(port, tag, 20), 5, what=f'traffic to {tag!r} only')


def observe(seconds: float = OBSERVE) -> None:
    """A bounded observation window: the only sleep here, for checks that nothing happens."""
    time.sleep(seconds)


def test_a_plain_rewrite_reloads_without_a_signal(proxies, pair):
    a, b = pair
    port = free_port()
    proxy = proxies(watched(port, a.address)).start(wait_workers=2)
    assert all_from(port, b'A')
    proxy.write_config(watched(port, b.address))
    log = proxy.wait_log('generation 2 active', timeout=RELOAD)
    assert 'config file changed, reloading' in log
    assert log.count('reloading configuration from') == 1
    assert only_from(port, b'B')


def same_size(*configs: dict) -> list[str]:
    """The configs' texts padded with a comment to one length."""
    texts = [render(c) for c in configs]
    width = max(len(t) for t in texts) + 2
    return [t + '#' * (width - len(t) - 1) + '\n' for t in texts]


def test_a_configmap_swap_reloads_also_with_the_same_size_and_mtime(proxies, tmp_path, pair):
    a, b = pair
    port = free_port()
    first, second, third = same_size(watched(port, a.address), watched(port, b.address),
                                      watched(port, a.address, log_level='info'))
    (tmp_path / 'configmap').mkdir()
    cm = ConfigMapDir(tmp_path / 'configmap', first)
    proxy = proxies('', name='k8s')
    proxy.config_path = cm.path                   # -c <dir>/mpproxy.yaml, a symlink
    proxy.start(wait_workers=2)
    assert all_from(port, b'A')

    cm.update(second)                             # the kubelet's ..data swap
    proxy.wait_log('generation 2 active', timeout=RELOAD)
    assert only_from(port, b'B')

    before = os.stat(cm.path)
    cm.update(third, same_times=True)             # nothing but the real path and inode differ
    after = os.stat(cm.path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino
    log = proxy.wait_log('generation 3 active', timeout=RELOAD)
    assert only_from(port, b'A')
    assert log.count('config file changed, reloading') == 2
    assert 'is missing' not in log                # the visible path never dangled


def test_a_broken_file_is_tried_once_and_the_old_generation_keeps_serving(proxies, pair):
    a, b = pair
    port = free_port()
    proxy = proxies(watched(port, a.address)).start(wait_workers=2)
    workers = sorted(proxy.workers())
    proxy.write_config('workers: 2\nwatch_config: true\nlisteners: [\n')   # bad YAML
    log = proxy.wait_log('reload failed', timeout=RELOAD)
    assert 'YAML syntax error' in log and 'Traceback' not in log
    assert all_from(port, b'A')
    observe()                                     # the same broken file: no retry
    log = proxy.log()
    assert log.count('reload failed') == 1, log
    assert log.count('config file changed, reloading') == 1
    assert sorted(proxy.workers()) == workers and all_from(port, b'A')

    proxy.write_config(watched(port, b.address))  # fixed: the change reloads
    proxy.wait_log('generation 2 active', timeout=RELOAD)
    assert only_from(port, b'B')


def test_a_missing_file_is_logged_once_and_reloaded_when_it_is_back(proxies, pair):
    a, b = pair
    port = free_port()
    proxy = proxies(watched(port, a.address)).start(wait_workers=2)
    proxy.config_path.unlink()
    proxy.wait_log('is missing', timeout=RELOAD)
    assert all_from(port, b'A')
    observe()                                     # still missing: logged once only
    log = proxy.log()
    assert log.count('is missing') == 1 and 'reloading configuration' not in log
    proxy.write_config(watched(port, b.address))
    proxy.wait_log('generation 2 active', timeout=RELOAD)
    assert only_from(port, b'B')


def test_watch_config_is_off_by_default_and_a_reload_turns_it_on_and_off(proxies, pair):
    a, b = pair
    port = free_port()
    proxy = proxies(watched(port, a.address, on=False)).start(wait_workers=2)
    proxy.write_config(watched(port, b.address, on=False))
    observe()                                     # off: the change does nothing
    assert 'config file changed' not in proxy.log()
    assert 'generation 2' not in proxy.log() and all_from(port, b'A')

    proxy.write_config(watched(port, a.address))  # turned on by a HUP
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active', timeout=RELOAD)
    proxy.write_config(watched(port, b.address, on=False))   # seen by the watch: applied
    log = proxy.wait_log('generation 3 active', timeout=RELOAD)
    assert log.count('config file changed, reloading') == 1
    assert only_from(port, b'B')

    proxy.write_config(watched(port, a.address, on=False))   # turned off by that reload
    observe()
    assert proxy.log().count('config file changed, reloading') == 1
    assert 'generation 4' not in proxy.log() and all_from(port, b'B')


def test_after_usr2_only_the_new_master_follows_the_file(proxies, tmp_path):
    """The old master does not reload while its new master lives; backed out, it catches up."""
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    pid_file = tmp_path / 'mpproxy.pid'
    try:
        port = free_port()
        proxy = proxies(watched(port, a.address, pid_file=str(pid_file))).start(wait_workers=2)
        old = proxy.pid
        new = proxy.upgrade(pid_file)

        proxy.write_config(watched(port, b.address, pid_file=str(pid_file)))
        proxy.wait_log(f'{new}#master: generation 2 active', timeout=RELOAD)
        proxy.known_pids.update(workers_of(new))
        observe()                                     # the old master leaves the file alone
        assert f'{old}#master: config file changed' not in proxy.log()

        os.kill(new, signal.SIGQUIT)                  # back out: the old master goes on ...
        proxy.wait_log('binary upgrade backed out: the new master', timeout=10)
        log = proxy.wait_log(f'{old}#master: generation 2 active', timeout=RELOAD)
        assert f'{old}#master: config file changed, reloading' in log   # ... with the new file
        assert only_from(port, b'B')
    finally:
        a.close()
        b.close()
