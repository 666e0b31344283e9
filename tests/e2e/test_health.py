"""Active health checks: run once per host, shared by every worker."""

from __future__ import annotations

import socket

from helpers.backends import TcpBackend, UdpEcho, tagged_backend
from helpers.configs import upstream_config
from helpers.net import first_bytes, free_port
from helpers.proc import wait_for


def test_tcp_check_takes_a_dead_server_out_and_back_in_for_all_workers(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    a_port = a.port
    revived = None
    try:
        port = free_port()
        servers = [{'address': a.address, 'max_fails': 0}, {'address': b.address, 'max_fails': 0}]
        check = {'health_check': {'type': 'tcp', 'interval': '100ms', 'timeout': '200ms',
                                  'rise': 2, 'fall': 2}}
        proxy = proxies(upstream_config(port, servers, 'round_robin', workers=2,
                                        extra=check)).start(wait_workers=2)
        assert {first_bytes(port, 1) for _ in range(20)} == {b'A', b'B'}
        a.close()
        proxy.wait_log(f'server {a.address} is down', timeout=5)
        refused_before = proxy.log().count(f'connect() to {a.address} failed')
        assert [first_bytes(port, 1) for _ in range(60)] == [b'B'] * 60
        # no client connection tried A once the check marked it down, in any worker
        assert proxy.log().count(f'connect() to {a.address} failed') == refused_before
        assert proxy.log().count('is down') == 1             # one checker, not one per worker
        revived = TcpBackend(lambda conn: (conn.sendall(b'A'), conn.recv(10)), port=a_port)
        proxy.wait_log(f'server {a.address} is up', timeout=5)
        wait_for(lambda: b'A' in {first_bytes(port, 1) for _ in range(10)}, 5,
                 what='A to get connections again')
    finally:
        b.close()
        if revived:
            revived.close()


def test_udp_check_with_send_and_expect(proxies):
    good, bad = UdpEcho(prefix=b'pong:'), UdpEcho(prefix=b'nope:')
    try:
        port = free_port(socket.SOCK_DGRAM)
        servers = [{'address': good.address, 'max_fails': 0},
                   {'address': bad.address, 'max_fails': 0}]
        check = {'health_check': {'type': 'udp', 'interval': '100ms', 'timeout': '200ms',
                                  'rise': 1, 'fall': 1, 'send': 'ping', 'expect': 'pong'}}
        proxy = proxies(upstream_config(port, servers, 'round_robin', extra=check,
                                        protocol='udp')).start(wait_workers=1)
        proxy.wait_log(f'server {bad.address} is down', timeout=5)
        assert f'server {good.address} is down' not in proxy.log()
        for _ in range(10):                      # new sessions all go to the healthy server
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(2)
                c.sendto(b'x', ('127.0.0.1', port))
                assert c.recv(100).startswith(b'pong:')
    finally:
        good.close()
        bad.close()
