"""UDP at the edge, end to end: PROXY protocol v2 per datagram (send and accept) and
udp.max_sessions_per_ip shared by all workers, with the real `mpproxy` command.

A `HeaderServer` backend parses the v2 header in front of each datagram (as a server
behind mpproxy would), records it, and answers with the payload alone, so each test sees
both what the upstream was told and that the client's bytes went through unaltered.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from helpers.backends import UdpEcho, UdpServer
from helpers.configs import udp_config
from helpers.net import client, free_port, roundtrip
from helpers.proc import assert_clean, wait_for
from mpproxy.proxy.edge import proxy_header

CLIENT = ('203.0.113.7', 5555)            # the real client a spoofed proxy in front names
CLIENT_DST = ('198.51.100.1', 53)


class HeaderServer(UdpServer):
    """Records (header, payload) of each datagram; answers with the payload, or b'NO HEADER'."""

    def __init__(self, host='127.0.0.1'):
        self.got: list = []
        super().__init__(host)

    def answer(self, data, addr):
        state, header, used, _ = proxy_header.parse(data)
        if state != proxy_header.DONE:
            self.got.append((None, data))
            return b'NO HEADER'
        self.got.append((header, data[used:]))
        return data[used:]


@pytest.fixture
def header_server():
    backend = HeaderServer()
    yield backend
    backend.close()


def pp(send='none', accept=False, trusted='127.0.0.1/32', extra=None) -> dict:
    """Listener keys: `proxy_protocol` (send, and accept from `trusted`), and `extra`."""
    proxy_protocol = {'send': send}
    if accept:
        proxy_protocol.update(accept=True, trusted=[trusted])
    return {'proxy_protocol': proxy_protocol, **(extra or {})}


def silent(sock: socket.socket, payload: bytes, dest, wait: float = 0.5) -> bool:
    """Send `payload`; True when no reply comes within `wait`."""
    sock.sendto(payload, dest)
    sock.settimeout(wait)
    try:
        sock.recvfrom(70000)
        return False
    except socket.timeout:
        return True
    finally:
        sock.settimeout(2.0)


# -- send: v2 ------------------------------------------------------------------------------

@pytest.mark.parametrize('host', ['127.0.0.1', '::1'])
def test_send_v2_prefixes_each_datagram_with_the_client(proxies, host):
    backend = HeaderServer(host)
    try:
        port = free_port(socket.SOCK_DGRAM, host=host)
        proxy = proxies(udp_config(port, backend.address, host=host,
                                   extra=pp(send='v2'))).start(wait_workers=2)
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        with client(family) as sock:
            sock.bind((host, 0))
            for i in range(3):
                data, src = roundtrip(sock, b'ping-%d' % i, (host, port))
                assert (data, src[:2]) == (b'ping-%d' % i, (host, port))
            me = sock.getsockname()[:2]
        assert [payload for _, payload in backend.got] == [b'ping-%d' % i for i in range(3)]
        for header, _ in backend.got:
            assert (header.version, header.transport, header.local) == (2, 'udp', False)
            assert (header.source, header.destination) == (me, (host, port))
        assert_clean(proxy)
    finally:
        backend.close()


def test_send_v2_drops_a_datagram_that_no_longer_fits(proxies, header_server):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, header_server.address, extra=pp(send='v2'))).start(
        wait_workers=2)
    dest = ('127.0.0.1', port)
    fits = 65507 - 28                     # the largest IPv4 payload less the v2 header
    with client() as sock:
        assert silent(sock, os.urandom(65507), dest)           # the largest datagram: no room
        proxy.wait_log('datagram of 65507 bytes from')
        big = os.urandom(fits)
        assert roundtrip(sock, big, dest) == (big, dest)       # one that fits passes
        assert roundtrip(sock, b'small', dest) == (b'small', dest)
    assert [len(p) for _, p in header_server.got] == [fits, 5]
    assert 'does not fit beside its 28-byte PROXY protocol header' in proxy.log()
    assert_clean(proxy)


# -- accept: true --------------------------------------------------------------------------

def test_accept_the_real_client_reaches_the_backend(proxies, header_server):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, header_server.address,
                               extra=pp(send='v2', accept=True))).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    incoming = proxy_header.v2(CLIENT, CLIENT_DST, 'udp')
    with client() as front:               # a proxy in front, spoofed: from trusted 127.0.0.1
        for i in range(3):
            assert roundtrip(front, incoming + b'q-%d' % i, dest) == (b'q-%d' % i, dest)
    assert [p for _, p in header_server.got] == [b'q-0', b'q-1', b'q-2']
    for header, _ in header_server.got:
        assert (header.source, header.destination) == (CLIENT, CLIENT_DST)
    assert_clean(proxy)


def test_accept_allow_deny_judges_the_real_client(proxies, header_server):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, header_server.address, extra=pp(
        send='v2', accept=True, extra={'deny': ['203.0.113.0/24']}))).start(
        wait_workers=2)
    dest = ('127.0.0.1', port)
    with client() as front:
        assert silent(front, proxy_header.v2(CLIENT, CLIENT_DST, 'udp') + b'no', dest)
        other = ('192.0.2.9', 1000)
        assert roundtrip(front, proxy_header.v2(other, CLIENT_DST, 'udp') + b'yes', dest)[0] \
            == b'yes'
    assert [(h.source, p) for h, p in header_server.got] == [(other, b'yes')]
    proxy.wait_log("client ('203.0.113.7', 5555) via ('127.0.0.1', ")


def test_accept_drops_an_untrusted_sender(proxies, header_server):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, header_server.address,
                               extra=pp(send='v2', accept=True))).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    datagram = proxy_header.v2(CLIENT, CLIENT_DST, 'udp') + b'hello'
    with client() as stranger:
        stranger.bind(('127.0.0.2', 0))
        assert silent(stranger, datagram, dest)
    proxy.wait_log("datagram from ('127.0.0.2', ")
    assert 'not in proxy_protocol.trusted; dropped' in proxy.log()
    assert header_server.got == []
    with client() as front:
        assert roundtrip(front, datagram, dest) == (b'hello', dest)    # trusted still works
    assert_clean(proxy)


@pytest.mark.parametrize('garbage, reason', [
    (b'\r\n\r\n\x00garbage', 'not a PROXY protocol header'),
    (proxy_header.v1(CLIENT, CLIENT_DST) + b'x', 'a v1 PROXY header (UDP takes v2 only)'),
    (proxy_header.v2(CLIENT, CLIENT_DST, 'udp')[:20], 'ends inside its PROXY protocol header'),
])
def test_accept_drops_garbage_and_the_worker_goes_on(proxies, header_server, garbage, reason):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, header_server.address,
                               extra=pp(send='v2', accept=True))).start(wait_workers=2)
    workers = sorted(proxy.workers())
    dest = ('127.0.0.1', port)
    good = proxy_header.v2(CLIENT, CLIENT_DST, 'udp') + b'good'
    with client() as front:
        assert silent(front, garbage, dest)
        proxy.wait_log(reason)
        assert roundtrip(front, good, dest) == (b'good', dest)          # next good one works
        assert silent(front, garbage, dest)        # an open session takes no garbage either
        assert roundtrip(front, good, dest) == (b'good', dest)
    assert [p for _, p in header_server.got] == [b'good', b'good']
    assert sorted(proxy.workers()) == workers
    assert_clean(proxy)


def test_two_instances_chain_and_the_backend_sees_the_original_client(proxies, header_server):
    back_port = free_port(socket.SOCK_DGRAM)
    front_port = free_port(socket.SOCK_DGRAM)
    back = proxies(udp_config(back_port, header_server.address, extra=pp(send='v2', accept=True)),
                   name='back').start(wait_workers=2)
    front = proxies(udp_config(front_port, f'127.0.0.1:{back_port}', extra=pp(send='v2')),
                    name='front').start(wait_workers=2)
    dest = ('127.0.0.1', front_port)
    with client() as sock:
        sock.bind(('127.0.0.1', 0))
        for i in range(3):
            assert roundtrip(sock, b'chain-%d' % i, dest) == (b'chain-%d' % i, dest)
        me = sock.getsockname()
    assert [p for _, p in header_server.got] == [b'chain-%d' % i for i in range(3)]
    for header, _ in header_server.got:
        assert (header.source, header.destination) == (me, dest)
    assert_clean(back)
    assert_clean(front)


# -- udp.max_sessions_per_ip, across workers ------------------------------------------------

def test_max_sessions_per_ip_holds_across_workers(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address, workers=2, extra={
        'idle_timeout': '2s', 'udp': {'max_sessions_per_ip': 2}})).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    socks = [client() for _ in range(8)]   # 8 source ports: the flow hash spreads them over
    try:                                   # both workers, so a per-worker count lets up to 4 in
        answered = []
        for sock in socks:
            for held in answered:           # keep the admitted sessions alive meanwhile
                assert roundtrip(held, b'keep', dest) == (b'keep', dest)
            if not silent(sock, b'hello', dest, wait=0.4):
                answered.append(sock)
        assert len(answered) == 2, f'{len(answered)} sessions from one IP were admitted'
        proxy.wait_log('is at udp.max_sessions_per_ip, new session dropped')
        with client() as other:             # another IP has its own count
            other.bind(('127.0.0.2', 0))
            assert roundtrip(other, b'other', dest) == (b'other', dest)
        # once 127.0.0.1's sessions expire (idle_timeout), it gets sessions again
        refused = [s for s in socks if s not in answered]
        wait_for(lambda: not silent(refused[0], b'again', dest, wait=0.3), 8,
                 what='a session for 127.0.0.1 after the others expired')
        # the second expires by its own worker's sweep, up to one sweep period later
        wait_for(lambda: not silent(refused[1], b'again', dest, wait=0.3), 4,
                 what='a second session for 127.0.0.1')
    finally:
        for sock in socks:
            sock.close()
    assert_clean(proxy)


def test_max_sessions_per_ip_counts_the_sessions_a_reload_hands_over(proxies):
    backend = UdpEcho(tag_source=True)
    try:
        port = free_port(socket.SOCK_DGRAM)
        config = udp_config(port, backend.address, workers=1, extra={
            'idle_timeout': '10s', 'udp': {'max_sessions_per_ip': 2}})
        proxy = proxies(config).start(wait_workers=1)
        dest = ('127.0.0.1', port)
        held = [client() for _ in range(2)]
        try:
            before = [roundtrip(s, b'x', dest)[0] for s in held]
            proxy.write_config(config)            # the same config again
            proxy.signal(signal.SIGHUP)
            proxy.wait_log('took over 2 UDP session(s) from the previous worker')
            proxy.wait_log('generation 1 finished')
            # the same sessions (same upstream source port) in the new worker, still counted
            assert [roundtrip(s, b'x', dest)[0] for s in held] == before
            with client() as third:
                assert silent(third, b'x', dest)
        finally:
            for s in held:
                s.close()
        assert_clean(proxy)
    finally:
        backend.close()
