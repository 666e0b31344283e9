"""allow / deny: refused clients are closed (TCP) or dropped (UDP) before any upstream is used."""

from __future__ import annotations

import socket

from helpers.net import free_port


def config(port: int, upstream: str, protocol: str, rules: str) -> str:
    return f"""
        workers: 2
        listeners:
          - listen: "127.0.0.1:{port}"
            protocol: {protocol}
            upstream: ["{upstream}"]
{rules}
    """


def tcp_from(source: str, port: int) -> bytes:
    with socket.socket() as s:
        s.settimeout(3)
        s.bind((source, 0))
        try:                                           # a denied client may be reset at once,
            s.connect(('127.0.0.1', port))             # even before connect() returns
            s.sendall(b'hello')
            s.shutdown(socket.SHUT_WR)
            return s.recv(100)
        except OSError:
            return b''


def test_tcp_deny_then_allow(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(config(port, tcp_echo.address, 'tcp', """
            allow: [127.0.0.0/30]
            deny: [127.0.0.2/32]""")).start(wait_workers=2)
    assert tcp_from('127.0.0.1', port) == b'hello'
    assert tcp_from('127.0.0.2', port) == b''          # denied though inside allow
    assert tcp_from('127.0.0.5', port) == b''          # outside allow
    assert len(tcp_echo.peers) == 1                    # the denied never reached the upstream
    log = proxy.wait_log('denied by allow/deny')
    assert 'client 127.0.0.2:' in log or 'client 127.0.0.5:' in log


def test_udp_denied_datagrams_are_dropped(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(config(port, udp_echo.address, 'udp', """
            deny: [127.0.0.2/32]""")).start(wait_workers=2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bad, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as good:
        bad.bind(('127.0.0.2', 0))
        bad.settimeout(0.5)
        good.settimeout(3)
        for _ in range(3):
            bad.sendto(b'no', ('127.0.0.1', port))
        good.sendto(b'yes', ('127.0.0.1', port))
        assert good.recv(10) == b'yes'
        try:
            got = bad.recv(10)
        except socket.timeout:
            got = None
        assert got is None
    assert [a[0] for a in udp_echo.sources] == ['127.0.0.1']
    proxy.wait_log('denied by allow/deny')
