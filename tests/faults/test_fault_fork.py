"""fork() fails for real (a clamped pids cgroup around the master): HUP, respawn, USR2."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from helpers.faults import assert_alive, config, expect_log, refuses, serves, stop_pid, worker_slot
from helpers.net import free_port
from helpers.proc import children, cmdline, read_pid, wait_for

pytestmark = pytest.mark.timeout(60)


def test_hup_while_fork_fails_keeps_the_running_configuration(pids_cgroup, proxies, tcp_echo):
    old, new = free_port(), free_port()
    proxy = proxies(config([(old, tcp_echo.address)])).start(wait_workers=2)
    workers = sorted(proxy.workers())
    pids_cgroup.add(proxy.pid)
    pids_cgroup.clamp()
    proxy.write_config(config([(old, tcp_echo.address), (new, tcp_echo.address)]))
    proxy.signal(signal.SIGHUP)
    log = expect_log(proxy, 'reload failed')
    assert_alive(proxy)
    line = next(l for l in log.splitlines() if 'reload failed' in l)
    assert re.search(r'reload failed, keeping the running configuration: generation 2: '
                     r'cannot fork worker \d+: Resource temporarily unavailable$', line), line
    assert serves(old, 10)
    assert sorted(proxy.serving_workers()) == workers
    wait_for(lambda: refuses(new), 5, what=f'the new port {new} to be closed again (rollback)')
    assert_alive(proxy)

    pids_cgroup.lift()
    proxy.signal(signal.SIGHUP)
    expect_log(proxy, r'generation \d+ active')
    assert serves(new, 5) and serves(old, 5)


def test_respawn_while_fork_fails_retries_and_the_other_worker_serves(pids_cgroup, proxies,
                                                                      tcp_echo):
    port = free_port()
    proxy = proxies(config([(port, tcp_echo.address)])).start(wait_workers=2)
    pids_cgroup.add(proxy.pid)
    pids_cgroup.clamp()
    victim = proxy.workers()[0]
    slot = worker_slot(victim)
    os.kill(victim, signal.SIGKILL)
    line = (f'cannot fork worker {slot} (generation 1): Resource temporarily unavailable; '
            'retrying in')
    expect_log(proxy, line.replace('(', r'\(').replace(')', r'\)'))
    assert_alive(proxy)
    assert serves(port, 20)
    window = time.monotonic() + 4            # it stays clamped a while: no log flood, no death
    while time.monotonic() < window:
        assert_alive(proxy)
        assert serves(port, 1)
        time.sleep(0.1)                      # pace of the probes inside the fixed window
    count = proxy.log().count(line)
    assert count <= 2, f'{count} lines {line!r} in 4 s (once per 30 s per slot expected)'

    pids_cgroup.lift()
    proxy.wait_ready(2, timeout=10)
    assert_alive(proxy)
    assert serves(port, 10)


def test_usr2_while_fork_fails_keeps_the_pid_file_then_upgrades(pids_cgroup, proxies, tmp_path,
                                                                tcp_echo):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    oldbin = tmp_path / 'mpproxy.pid.oldbin'
    proxy = proxies(config([(port, tcp_echo.address)], pid_file=str(pid_file)))
    proxy.start(wait_workers=2)
    old = proxy.pid
    pids_cgroup.add(old)
    pids_cgroup.clamp()
    new = None
    try:
        proxy.signal(signal.SIGUSR2)
        expect_log(proxy, 'binary upgrade failed')
        assert_alive(proxy)
        wait_for(lambda: read_pid(pid_file) == old, 5, what='the pid file to name the old master')
        assert not oldbin.exists()
        assert serves(port, 5)

        pids_cgroup.lift()
        new = proxy.upgrade(pid_file)
        assert cmdline(new).startswith('mpproxy: master')
        proxy.known_pids.update(children(new))
        proxy.signal(signal.SIGQUIT)             # retire the old master
        assert proxy.wait_exit(15) == 0
        assert read_pid(pid_file) == new
        assert serves(port, 10)
    finally:
        current = read_pid(pid_file)
        for pid in {new, current} - {None, old}:
            proxy.known_pids.update(children(pid))
            stop_pid(pid)
