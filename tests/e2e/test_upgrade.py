"""USR2, nginx's binary upgrade: a new master inherits every listening socket."""

from __future__ import annotations

import os
import signal

from helpers.backends import UdpEcho
from helpers.configs import upgrade_config
from helpers.net import EchoProber, echo_roundtrip, free_port
from helpers.proc import alive, cmdline, read_pid, wait_for


def test_usr2_starts_new_master_and_quit_of_old_loses_no_connection(proxies, tmp_path, tcp_echo):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    proxy = proxies(upgrade_config(tmp_path, port, tcp_echo.address)).start(wait_workers=2)
    old = proxy.pid
    prober = EchoProber(port, seconds=60, limit=200000)
    new = None
    try:
        wait_for(lambda: prober.ok >= 20, 5, what='traffic before the upgrade')
        new = proxy.upgrade(pid_file, workers=2)
        assert read_pid(f'{pid_file}.oldbin') == old
        assert cmdline(new) == f'mpproxy: master -c {proxy.config_path}'
        assert 'listening sockets inherited' in proxy.log()
        served = prober.ok
        proxy.signal(signal.SIGQUIT)              # the operator retires the old master
        assert proxy.wait_exit(15) == 0
        wait_for(lambda: prober.ok >= served + 50, 10, what='traffic through the new master')
        prober.finish()
        assert not prober.failures, prober.failures[:5]
        assert alive(new) and read_pid(pid_file) == new
        assert not os.path.exists(f'{pid_file}.oldbin')
        assert echo_roundtrip(port, b'new master') == b'new master'
    finally:
        prober.finish()
        proxy.stop_master(new, signal.SIGTERM, 5)


def test_usr2_udp_keeps_answering_across_the_upgrade(proxies, tmp_path):
    backend = UdpEcho(tag_source=True)
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    text = f"""
        workers: 1
        pid_file: {pid_file}
        listeners:
          - listen: "127.0.0.1:{port}"
            protocol: udp
            upstream: ["{backend.address}"]
    """
    proxy = proxies(text).start(wait_workers=1)
    new = None
    import socket
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2)
    try:
        client.sendto(b'1', ('127.0.0.1', port))
        assert client.recvfrom(100)[0].endswith(b'|1')
        new = proxy.upgrade(pid_file)
        proxy.signal(signal.SIGQUIT)
        assert proxy.wait_exit(40) == 0
        for i in range(5):
            client.sendto(b'%d' % i, ('127.0.0.1', port))
            assert client.recvfrom(100)[0].endswith(b'|%d' % i)
    finally:
        client.close()
        backend.close()
        proxy.stop_master(new, signal.SIGTERM, 5)


def test_failed_upgrade_restores_pid_file_and_keeps_serving(proxies, tmp_path, tcp_echo):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    proxy = proxies(upgrade_config(tmp_path, port, tcp_echo.address)).start(wait_workers=2)
    proxy.config_path.write_text('workers: [broken\n')     # the new master cannot load it
    proxy.signal(signal.SIGUSR2)
    proxy.wait_log('binary upgrade failed', timeout=10)
    wait_for(lambda: read_pid(pid_file) == proxy.pid, 5, what='the pid file restored')
    assert not os.path.exists(f'{pid_file}.oldbin')
    assert echo_roundtrip(port, b'still the old master') == b'still the old master'
    proxy.signal(signal.SIGUSR2)                          # and it can try again later
    proxy.wait_log('binary upgrade failed', count=2, timeout=10)
    assert read_pid(pid_file) == proxy.pid
