"""The master out of files (RLIMIT_NOFILE) and out of memory (RLIMIT_AS) during a reload."""

from __future__ import annotations

import re
import signal

import pytest

from helpers.configs import render
from helpers.faults import (AddressSpaceClamp, NofileClamp, assert_alive, config, expect_log,
                            refuses, serves)
from helpers.net import free_port
from helpers.proc import wait_for

pytestmark = pytest.mark.timeout(60)


def test_reload_without_free_files_in_the_master_keeps_the_running_configuration(proxies,
                                                                                 tcp_echo):
    old, new = free_port(), free_port()
    proxy = proxies(config([(old, tcp_echo.address)])).start(wait_workers=2)
    workers = sorted(proxy.workers())
    proxy.write_config(config([(old, tcp_echo.address), (new, tcp_echo.address)]))
    with NofileClamp(proxy.pid) as clamp:
        clamp.clamp()
        proxy.signal(signal.SIGHUP)
        expect_log(proxy, 'reload failed, keeping the running configuration')
        assert_alive(proxy)
        assert serves(old, 10)
        assert sorted(proxy.serving_workers()) == workers
        assert refuses(new)
        clamp.restore()
    proxy.signal(signal.SIGHUP)
    expect_log(proxy, r'generation \d+ active')
    assert serves(new, 5) and serves(old, 5)


def write_huge_config(path, normal: dict, size: int) -> None:
    """`normal` followed by one YAML comment line of `size` bytes: valid, and too big to read
    into a master whose address space is clamped."""
    chunk = b'x' * (1 << 20)
    with open(path, 'wb') as f:
        f.write(render(normal).encode() + b'# ')
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(b'\n')


@pytest.mark.parametrize('trigger, step', [('hup', 'handle_hup'),
                                           ('watch_config', 'the config watcher')])
def test_reload_out_of_memory_reaches_the_masters_last_resort_guard(proxies, tcp_echo, trigger,
                                                                    step):
    port = free_port()
    normal = config([(port, tcp_echo.address)],
                    **({'watch_config': True} if trigger == 'watch_config' else {}))
    proxy = proxies(normal).start(wait_workers=2)
    workers = sorted(proxy.workers())
    with AddressSpaceClamp(proxy.pid) as clamp:
        clamp.clamp(30 << 20)
        write_huge_config(proxy.config_path, normal, 96 << 20)
        if trigger == 'hup':
            proxy.signal(signal.SIGHUP)        # else the watcher sees the new file by itself
        log = expect_log(proxy, rf'\[crit\].*unexpected error in {step}: MemoryError')
        assert_alive(proxy)
        crit = re.search(r'^.*\[crit\].*unexpected error.*$', log, re.M)
        assert 'Traceback' in log[crit.end():], log[crit.start():][:3000]
        assert serves(port, 10)
        assert sorted(proxy.serving_workers()) == workers
        assert_alive(proxy)
        clamp.restore()
    proxy.write_config(normal)
    proxy.signal(signal.SIGHUP)
    expect_log(proxy, r'generation \d+ active')
    wait_for(lambda: serves(port, 5), 5, what='the new generation to serve')
