"""Upstream names served by the test's own DNS server (helpers.backends.DnsServer: UDP and
TCP in threads; it truncates UDP answers past 512 bytes)."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from helpers.backends import DnsServer, TcpBackend
from helpers.configs import dns_config, listener, render
from helpers.net import exchange, first_bytes, free_port
from helpers.proc import run_cli, wait_for

PODS = [f'127.0.0.{i}' for i in range(1, 61)]


class Tagged:
    """A TCP backend on host:port that sends `tag` on every connection, then closes."""

    def __init__(self, host: str, port: int, tag: bytes):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.tag = tag
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.tag)
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def dns():
    server = DnsServer({})
    yield server
    server.close()


@pytest.fixture
def pods():
    """60 TCP backends on 127.0.0.1 ... 127.0.0.60, one port (returned), each of which
    answers a connection with its own address and closes it."""
    def handler(conn):
        conn.sendall(conn.getsockname()[0].encode())

    backends: list[TcpBackend] = []
    try:
        for _ in range(20):
            port = free_port(host='127.0.0.2')
            try:
                for ip in PODS:
                    backends.append(TcpBackend(handler, ip, port))
                break
            except OSError:                      # the port is taken on one of the addresses
                while backends:
                    backends.pop().close()
        assert len(backends) == len(PODS), 'no port free on all 60 addresses'
        yield port
    finally:
        for backend in backends:
            backend.close()


def test_a_headless_service_of_60_pods_comes_over_tcp_and_all_become_servers(proxies, dns, pods):
    dns.records['pods.test'] = PODS              # 60 A records: ~1 KB, past UDP's 512 bytes
    port = free_port()
    proxy = proxies(dns_config(port, dns.port, f'pods.test:{pods}', resolve=None))
    proxy.start(wait_workers=1)
    assert dns.names_asked('A', 'udp') == ['pods.test']        # answered with TC set
    assert dns.names_asked('A', 'tcp') == ['pods.test']        # asked again over TCP
    reached = [exchange(port, b'').decode() for _ in range(len(PODS))]
    assert sorted(reached) == sorted(PODS)       # round robin: each of the 60 once


def test_without_resolver_the_systems_search_list_and_ndots_apply(proxies, tmp_path, dns):
    backend_port = free_port(host='127.0.0.2')
    backends = [Tagged(f'127.0.0.{i}', backend_port, tag) for i, tag in ((1, b'A'), (2, b'B'),
                                                                         (3, b'C'))]
    try:
        dns.records.update({'web.svc.test': ['127.0.0.1'], 'api.prod.cluster.test': ['127.0.0.2'],
                            'api.prod': ['127.0.0.3']})
        conf = tmp_path / 'resolv.conf'
        conf.write_text(f'nameserver [127.0.0.1]:{dns.port}\nsearch svc.test cluster.test\n'
                        'options ndots:2\n')
        web, api = free_port(), free_port()
        config = {'workers': 1,
                  'upstreams': {'web': {'servers': [f'web:{backend_port}']},
                                'api': {'servers': [f'api.prod:{backend_port}']}},
                  'listeners': [listener(web, 'web'), listener(api, 'api')]}
        proxy = proxies(config, env={'MPPROXY_RESOLV_CONF': str(conf)})
        proxy.start(wait_workers=1)
        assert first_bytes(web, 1) == b'A'      # web -> web.svc.test
        assert first_bytes(api, 1) == b'B'      # 1 dot < ndots 2: the search list before api.prod
        assert 'api.prod' not in dns.names_asked('A')
    finally:
        for backend in backends:
            backend.close()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_the_ttl_decides_when_a_name_is_asked_again_within_min_and_max(proxies, tmp_path, dns):
    ttls = {'short.test': 0, 'capped.test': 3600, 'long.test': 3600, 'fixed.test': 3600}
    resolve = {'short.test': {'min': '1s', 'max': '1h'},        # TTL 0: every min (1 s)
               'capped.test': {'min': '100ms', 'max': '1s'},    # TTL 1 h: every max (1 s)
               'long.test': {'min': '100ms', 'max': '1h'},      # TTL 1 h: not again in this test
               'fixed.test': '500ms'}                            # every 500 ms, TTL aside
    for name, ttl in ttls.items():
        dns.records[name] = ['127.0.0.1']
        dns.ttls[name] = ttl
    upstreams = {name.split('.')[0]: {'resolve': resolve[name], 'servers': [f'{name}:9']}
                 for name in ttls}
    config = {'workers': 1, 'resolver': [f'127.0.0.1:{dns.port}'], 'upstreams': upstreams,
              'listeners': [listener(free_port(), name) for name in upstreams]}
    proxy = proxies(config)
    dumped = run_cli('-T', '-c', str(proxy.config_path)).stdout
    assert 'resolve: {min: 100ms, max: 1s}' in dumped and 'resolve: 500ms' in dumped
    proxy.start(wait_workers=1)

    def asked(name):
        return [when for when, asked, qtype, _ in list(dns.asked)
                if asked == name and qtype == 'A']

    wait_for(lambda: len(asked('capped.test')) >= 4, 15, what='capped.test asked 4 times')
    assert len(asked('long.test')) == 1                  # its TTL holds: asked at the start only
    assert len(asked('short.test')) >= 2 and min(gaps(asked('short.test'))) >= 0.95
    assert min(gaps(asked('capped.test'))) >= 0.95
    assert len(asked('fixed.test')) >= 4 and min(gaps(asked('fixed.test'))) >= 0.45


def test_new_connections_follow_dns_and_a_silent_dns_keeps_the_last_set(proxies, dns):
    backend_port = free_port(host='127.0.0.2')
    a = Tagged('127.0.0.1', backend_port, b'A')
    b = Tagged('127.0.0.2', backend_port, b'B')
    try:
        dns.records['backend.test'] = ['127.0.0.1']
        port = free_port()
        proxy = proxies(dns_config(port, dns.port, f'backend.test:{backend_port}'))
        proxy.start(wait_workers=1)
        assert first_bytes(port, 1) == b'A'
        dns.records['backend.test'] = ['127.0.0.2']
        wait_for(lambda: first_bytes(port, 1) == b'B', 5, what='connections to follow DNS')
        proxy.wait_log(f'upstream web: servers now 127.0.0.2:{backend_port}')
        dns.silent = True
        proxy.wait_log('cannot resolve backend.test', timeout=10)
        assert all(first_bytes(port, 1) == b'B' for _ in range(20))
        dns.silent = False
        dns.records['backend.test'] = ['127.0.0.1', '127.0.0.2']
        proxy.wait_log(f'servers now 127.0.0.1:{backend_port}, 127.0.0.2:{backend_port}',
                       timeout=10)
        assert {first_bytes(port, 1) for _ in range(6)} == {b'A', b'B'}
    finally:
        a.close()
        b.close()


def test_with_resolve_an_unresolvable_name_starts_empty_until_dns_answers(proxies, dns):
    backend_port = free_port()
    a = Tagged('127.0.0.1', backend_port, b'A')
    try:
        port = free_port()
        proxy = proxies(dns_config(port, dns.port, f'later.test:{backend_port}'))
        proxy.start(wait_workers=1)
        assert first_bytes(port, 1) == b''           # closed: no server yet
        proxy.wait_log('no upstream could be connected')
        dns.records['later.test'] = ['127.0.0.1']
        wait_for(lambda: first_bytes(port, 1) == b'A', 5, what='the name to resolve')
    finally:
        a.close()


def test_unresolvable_name_without_resolve_stops_the_start(tmp_path, dns):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(render(dns_config(free_port(), dns.port, 'missing.test:80', resolve=None)))
    started = time.monotonic()
    result = run_cli('-c', str(path), timeout=30)
    assert result.returncode == 1, result
    assert 'upstream web: cannot resolve missing.test: DNS error NXDOMAIN' in result.stderr
    assert 'cannot start' in result.stderr
    assert time.monotonic() - started < 15


def test_reload_with_an_unresolvable_name_keeps_the_running_generation(proxies, dns):
    backend_port = free_port()
    a = Tagged('127.0.0.1', backend_port, b'A')
    try:
        dns.records['backend.test'] = ['127.0.0.1']
        port = free_port()
        proxy = proxies(dns_config(port, dns.port, f'backend.test:{backend_port}', resolve=None))
        proxy.start(wait_workers=1)
        assert first_bytes(port, 1) == b'A'
        del dns.records['backend.test']
        proxy.signal(signal.SIGHUP)
        log = proxy.wait_log('reload failed', timeout=15)
        assert 'upstream web: cannot resolve backend.test' in log
        assert first_bytes(port, 1) == b'A'
    finally:
        a.close()
