"""PROXY protocol over TCP, end to end: `send` to the upstream, `accept` from trusted peers.

A `HeaderEcho` backend (helpers.backends) records everything a connection sent before the client's
payload (the header mpproxy wrote) and echoes the rest, so each test sees both what the
upstream was told and that the client's bytes went through unaltered.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from helpers.backends import HeaderEcho, tagged_backend
from helpers.configs import pp_config, upstream_config, weighted
from helpers.net import PAYLOAD, exchange, free_port, recv_all
from helpers.proc import wait_for
from mpproxy.proxy.edge import proxy_header



def echo_payload(host: str, port: int) -> int:
    """PAYLOAD through the proxy and back, byte-exact; returns the client's port."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(PAYLOAD)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == PAYLOAD
        return s.getsockname()[1]


# -- send ------------------------------------------------------------------------------------

@pytest.mark.parametrize('version', ['v1', 'v2'])
def test_send_writes_the_client_address_before_any_client_byte(proxies, header_echo, version):
    port = free_port()
    proxies(pp_config(port, header_echo.address, send=version)).start(wait_workers=1)
    client_port = echo_payload('127.0.0.1', port)
    [(header, raw)] = header_echo.headers
    assert header.version == int(version[1])
    assert (header.source, header.destination) == (('127.0.0.1', client_port), ('127.0.0.1', port))
    assert header.transport == 'tcp' and not header.local
    if version == 'v1':
        assert raw == f'PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n'.encode()


def test_send_v2_over_ipv6(proxies):
    backend = HeaderEcho('::1')
    try:
        port = free_port(host='::1')
        proxies(pp_config(port, backend.address, send='v2', host='::1')).start(wait_workers=1)
        client_port = echo_payload('::1', port)
        [(header, raw)] = backend.headers
        assert (header.source, header.destination) == (('::1', client_port), ('::1', port))
        assert raw[12] == 0x21 and raw[13] == 0x21          # v2 PROXY, AF_INET6 + STREAM
    finally:
        backend.close()


def test_send_header_goes_first_even_when_the_client_speaks_first(proxies, header_echo):
    port = free_port()
    proxies(pp_config(port, header_echo.address, send='v1')).start(wait_workers=1)
    big = bytes(range(256)) * 4096                       # 1 MiB, sent before the upstream is up
    assert exchange(port, big) == big
    [(header, _)] = header_echo.headers
    assert header is not None and header.source[0] == '127.0.0.1'


# -- accept ----------------------------------------------------------------------------------

def test_accept_uses_the_real_client_for_send_and_logs(proxies, header_echo):
    port = free_port()
    proxies(pp_config(port, header_echo.address, send='v1', accept=True)).start(wait_workers=1)
    incoming = proxy_header.v2(('203.0.113.7', 5555), ('198.51.100.1', 443))
    assert exchange(port, incoming + PAYLOAD) == PAYLOAD     # the header is consumed
    v1 = proxy_header.v1(('2001:db8::7', 6666), ('2001:db8::1', 443))
    assert exchange(port, v1 + PAYLOAD) == PAYLOAD
    first, second = (h for h, _ in header_echo.headers)
    assert (first.source, first.destination) == (('203.0.113.7', 5555), ('198.51.100.1', 443))
    assert (second.source, second.destination) == (('2001:db8::7', 6666), ('2001:db8::1', 443))


def test_accept_local_command_keeps_the_peer_address(proxies, header_echo):
    port = free_port()
    proxies(pp_config(port, header_echo.address, send='v2', accept=True)).start(wait_workers=1)
    assert exchange(port, proxy_header.v2(None, None) + PAYLOAD) == PAYLOAD
    [(header, _)] = header_echo.headers
    assert header.source[0] == '127.0.0.1' and header.destination == ('127.0.0.1', port)


def test_accept_real_client_drives_allow_deny(proxies, header_echo):
    port = free_port()
    proxy = proxies(pp_config(port, header_echo.address, accept=True,
                              extra={'deny': ['203.0.113.0/24']})).start(wait_workers=1)
    bad = proxy_header.v1(('203.0.113.9', 1000), ('127.0.0.1', port))
    good = proxy_header.v1(('192.0.2.9', 1000), ('127.0.0.1', port))
    assert exchange(port, bad + PAYLOAD) == b''
    assert exchange(port, good + PAYLOAD) == PAYLOAD
    assert len(header_echo.headers) == 1
    proxy.wait_log('client 203.0.113.9:1000 denied by allow/deny')


def test_untrusted_peer_is_refused_and_logged(proxies, header_echo):
    port = free_port()
    proxy = proxies(pp_config(port, header_echo.address, accept=True)).start(wait_workers=1)
    header = proxy_header.v1(('192.0.2.1', 1), ('127.0.0.1', port))
    assert exchange(port, header + PAYLOAD, source='127.0.0.2') == b''
    assert header_echo.headers == []
    proxy.wait_log('is not in proxy_protocol.trusted')
    assert exchange(port, header + PAYLOAD) == PAYLOAD       # the trusted peer still works


@pytest.mark.parametrize('data, reason', [
    (b'GET / HTTP/1.1\r\nHost: x\r\n\r\n', 'not a PROXY protocol header'),
    (b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n', 'wrong number of fields in v1 header'),
    (b'PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n', 'bad IPv4 address in v1 header'),
    (proxy_header.V2_SIGNATURE + b'\x31\x11\x00\x0c' + bytes(12), 'bad v2 version'),
    (b'PROXY ' + b'x' * 200, 'v1 line too long'),
    (b'PROXY TCP4 1.2.3.4', 'closed before its PROXY protocol header ended'),
])
def test_malformed_or_half_headers_close_the_connection(proxies, header_echo, data, reason):
    port = free_port()
    proxy = proxies(pp_config(port, header_echo.address, accept=True)).start(wait_workers=1)
    assert exchange(port, data) == b''
    proxy.wait_log(reason)
    assert header_echo.headers == []
    assert exchange(port, proxy_header.v1(('192.0.2.1', 1), ('127.0.0.1', port)) + PAYLOAD) \
        == PAYLOAD                                          # the worker is unharmed


def test_slow_header_trickle_is_closed_after_3s(proxies, header_echo):
    port = free_port()
    proxy = proxies(pp_config(port, header_echo.address, accept=True)).start(wait_workers=1)
    header = proxy_header.v1(('192.0.2.1', 1), ('127.0.0.1', port))
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        start = time.monotonic()
        closed_at = None
        for byte in header[:-1]:                            # slowloris: a byte every 0.3 s
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            s.settimeout(0.3)                               # the pacing of the trickle
            try:
                if s.recv(10) == b'':
                    closed_at = time.monotonic()
                    break
            except socket.timeout:
                continue
            except OSError:
                closed_at = time.monotonic()
                break
    assert closed_at is not None, 'the trickling client was never closed'
    assert 2.5 <= closed_at - start <= 5.0
    proxy.wait_log('sent no complete PROXY protocol header in 3s')
    assert header_echo.headers == []


def test_many_bad_headers_log_once_a_second_and_crash_nothing(proxies, header_echo):
    port = free_port()
    proxy = proxies(pp_config(port, header_echo.address, accept=True, workers=2)).start(
        wait_workers=2)
    workers = sorted(proxy.workers())
    errors = []

    def flood(n):
        for _ in range(n):
            if exchange(port, b'\r\n\r\n\x00garbage') != b'':
                errors.append('answered')

    threads = [threading.Thread(target=flood, args=(100,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert exchange(port, proxy_header.v1(('192.0.2.1', 1), ('127.0.0.1', port)) + PAYLOAD) \
        == PAYLOAD
    assert sorted(proxy.workers()) == workers
    wait_for(lambda: 'similar suppressed' in proxy.log() or
             proxy.log().count('not a PROXY protocol header') >= 1, 5, what='the log line')
    lines = proxy.log().count('not a PROXY protocol header')
    assert 1 <= lines <= 2 * 2 * 10, f'{lines} lines for 400 bad headers: not rate-limited'


def test_accept_hashes_on_the_real_client(proxies):
    """Behind one trusted peer, `balance: hash` spreads real clients over the servers and
    keeps each on one server (hashing the peer would send them all to one)."""
    backends = [tagged_backend(t) for t in (b'A', b'B', b'C')]
    try:
        port = free_port()
        servers = weighted(*((b.address, 1) for b in backends))
        config = upstream_config(port, servers, 'hash', extra={'hash_key': 'client_ip'})
        config['listeners'][0]['proxy_protocol'] = {'accept': True, 'trusted': ['127.0.0.1/32']}
        proxies(config).start(wait_workers=1)

        def server_for(ip: str) -> bytes:
            with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
                s.sendall(proxy_header.v1((ip, 4000), ('127.0.0.1', port)))
                return s.recv(1)

        clients = [f'198.51.100.{i}' for i in range(1, 31)]
        first = {ip: server_for(ip) for ip in clients}
        assert len(set(first.values())) == 3, first
        assert {ip: server_for(ip) for ip in clients} == first
    finally:
        for b in backends:
            b.close()
