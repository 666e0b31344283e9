"""No space left on device (a full tmpfs): the error log, the access log, the pid file."""

from __future__ import annotations

import re
import signal

import pytest

from helpers.backends import tagged_backend
from helpers.configs import render
from helpers.faults import (assert_alive, config, echo_roundtrip, expect_log, first_byte, serves,
                            stop_pid)
from helpers.net import free_port
from helpers.proc import alive, read_pid, run_cli, wait_for

pytestmark = pytest.mark.timeout(60)


def read_text(path) -> str:
    try:
        return path.read_text(errors='replace')
    except FileNotFoundError:
        return ''


def test_error_log_on_a_full_disk_loses_lines_not_service(full_tmpfs, proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    proxy = None
    try:
        port = free_port()
        error_log = full_tmpfs.dir / 'error.log'
        proxy = proxies(config([(port, a.address)], error_log=str(error_log)))
        proxy.log = lambda: read_text(error_log)   # start() waits for 'mpproxy started' in it
        proxy.start(wait_workers=2)
        full_tmpfs.fill(top_up=[error_log])
        assert all(first_byte(port) == b'A' for _ in range(10))

        proxy.write_config(config([(port, b.address)], error_log=str(error_log)))
        proxy.signal(signal.SIGHUP)                # its log lines cannot be written
        wait_for(lambda: first_byte(port) == b'B', 10, what='the reload to take effect')
        assert all(first_byte(port) == b'B' for _ in range(10))
        assert_alive(proxy)
        wait_for(lambda: len(proxy.serving_workers()) == 2, 5, what='2 serving workers')

        full_tmpfs.free()
        proxy.signal(signal.SIGHUP)                # a later event, written again
        logged = expect_log(proxy, r'generation 3 active')
        assert_alive(proxy)
        assert re.search(r'\d+ error log line\(s\) lost: No space left on device', logged), logged[-3000:]
        assert first_byte(port) == b'B'
    finally:
        a.close()
        b.close()
        stderr = read_text(proxy.log_path) if proxy else ''
        print(f'--- the master\'s stderr ---\n{stderr[-3000:]}')   # shown when the test fails


def test_access_log_on_a_full_disk_drops_lines_not_clients(full_tmpfs, proxies, tcp_echo):
    port = free_port()
    access_log = full_tmpfs.dir / 'access.log'
    proxy = proxies(config([(port, tcp_echo.address)],
                           access_log={'path': str(access_log), 'format': 'json'}))
    proxy.start(wait_workers=2)
    master, workers = proxy.pid, sorted(proxy.workers())
    assert serves(port, 5)
    wait_for(lambda: read_text(access_log).count('\n') >= 5, 5, what='access log lines written')
    full_tmpfs.fill(top_up=[access_log])

    failures = []
    for i in range(50):
        payload = b'client %d' % i
        try:
            got = echo_roundtrip(port, payload)
            if got != payload:
                failures.append((i, got))
        except OSError as exc:
            failures.append((i, repr(exc)))
    assert not failures, failures[:5]
    expect_log(proxy, re.escape(f'access log {access_log}: No space left on device;')
               + r' \d+ line\(s\) dropped')
    assert_alive(proxy)
    assert proxy.pid == master and sorted(proxy.workers()) == workers
    assert all(alive(pid) for pid in workers)
    assert serves(port, 5)


def test_usr2_whose_new_master_cannot_write_the_pid_file(full_tmpfs, proxies, tcp_echo):
    port = free_port()
    pid_file = full_tmpfs.dir / 'mpproxy.pid'
    proxy = proxies(config([(port, tcp_echo.address)], pid_file=str(pid_file)))
    proxy.start(wait_workers=2)
    old = proxy.pid
    full_tmpfs.fill()
    try:
        proxy.signal(signal.SIGUSR2)
        expect_log(proxy, 'binary upgrade failed', timeout=15)
        assert_alive(proxy)
        wait_for(lambda: read_pid(pid_file) == old, 5, what='the pid file to name the old master')
        assert not (full_tmpfs.dir / 'mpproxy.pid.oldbin').exists()
        assert serves(port, 10)
        assert_alive(proxy)
    finally:
        started = re.findall(r'new master pid (\d+)', proxy.log())
        for pid in ({int(p) for p in started} | {read_pid(pid_file)}) - {None, old}:
            stop_pid(pid)


def test_start_with_the_pid_file_on_a_full_disk_fails_in_one_line_and_leaves_no_file(
        full_tmpfs, tmp_path, tcp_echo):
    pid_file = full_tmpfs.dir / 'mpproxy.pid'
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(render(config([(free_port(), tcp_echo.address)], pid_file=str(pid_file))))
    full_tmpfs.fill()
    done = run_cli('-c', str(path))
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        f'cannot write pid file {pid_file}: No space left on device'), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not pid_file.exists()
