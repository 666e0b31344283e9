"""The master stopped (SIGSTOP) under load, and the master killed (SIGKILL)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from helpers.backends import TcpBackend, echo_handler
from helpers.faults import assert_alive, config, expect_log, serves
from helpers.net import EchoProber, free_port
from helpers.proc import alive, wait_for

pytestmark = pytest.mark.timeout(60)

STOP = 10.0           # seconds the master stays stopped
HUP_AFTER = 2.0       # the HUP arrives while it is stopped


def state(pid: int) -> str:
    with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()[0]


def test_master_stopped_under_load_kills_no_worker_and_handles_the_queued_hup(proxies, tcp_echo):
    other = TcpBackend(echo_handler)
    client = None
    try:
        port = free_port()
        worker_timeout = '5s'           # shorter than the stop, on purpose
        proxy = proxies(config([(port, tcp_echo.address)], worker_timeout=worker_timeout)).start(
            wait_workers=2)
        first = sorted(proxy.workers())
        client = EchoProber(port, seconds=12.0, limit=3000, pause=0.003)
        wait_for(lambda: client.ok >= 20, 5, what='traffic before the stop')
        stopped_at = time.monotonic()
        os.kill(proxy.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: state(proxy.pid) == 'T', 2, what='the master to stop')
            ok_at_stop = client.ok
            time.sleep(max(0.0, stopped_at + HUP_AFTER - time.monotonic()))   # the scenario's clock
            proxy.write_config(config([(port, other.address)], worker_timeout=worker_timeout))
            proxy.signal(signal.SIGHUP)
            time.sleep(max(0.0, stopped_at + STOP - time.monotonic()))
            assert state(proxy.pid) == 'T'
            ok_during, failed_during = client.ok - ok_at_stop, list(client.failures)
        finally:
            os.kill(proxy.pid, signal.SIGCONT)
        assert not failed_during, failed_during[:5]
        assert ok_during > 0, 'no client connection was made while the master was stopped'
        expect_log(proxy, 'generation 2 active')
        assert_alive(proxy)
        wait_for(lambda: not any(alive(p) for p in first), 10,
                 what='the generation-1 workers to drain and exit')
        client.finish()
        assert not client.failures, client.failures[:5]
        log = proxy.log()
        assert 'gave no heartbeat' not in log
        assert 'killed by SIGKILL' not in log
        assert serves(port, 5)
    finally:
        if client is not None:
            client.finish()
        other.close()


def test_master_killed_its_workers_exit_and_a_new_master_serves_at_once(proxies, tcp_echo,
                                                                       tmp_path):
    port = free_port()
    text = config([(port, tcp_echo.address)], pid_file=f'{tmp_path}/mpproxy.pid')
    first = proxies(text).start(wait_workers=2)
    workers = first.workers()
    assert len(workers) == 2
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(5)
    wait_for(lambda: not any(alive(p) for p in workers), 2, what='the workers to exit within 2 s')
    second = proxies(text, name='second').start(wait_workers=2)
    assert serves(port, 10)
    assert_alive(second)
