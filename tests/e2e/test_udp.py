"""UDP sessions end to end: the real `mpproxy` command between real UDP sockets.

Every client socket has a per-recv timeout, every wait a deadline, every loop a bound.
The upstream's view (`UdpEcho.sources`) tells which session a datagram used: one session
is one connected upstream socket, so one source port.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

from helpers.backends import TcpBackend, UdpEcho, echo_handler
from helpers.configs import udp_config
from helpers.net import RECV_TIMEOUT, client, echo_roundtrip, free_port, roundtrip
from helpers.proc import assert_clean, socket_inodes, wait_for



def proc_udp_sockets(port: int) -> set[str]:
    """Inodes of the UDP sockets (v4 and v6) whose local port is `port`."""
    inodes = set()
    for table in ('/proc/net/udp', '/proc/net/udp6'):
        try:
            with open(table) as f:
                rows = [r.split() for r in f.read().splitlines()[1:]]
        except OSError:
            continue
        inodes.update(r[9] for r in rows if int(r[1].rsplit(':', 1)[1], 16) == port)
    return inodes


# -- sessions ------------------------------------------------------------------------------

def test_two_clients_get_independent_sessions(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address)).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    with client() as a, client() as b:
        for i in range(5):
            # both send before either reads: a reply delivered to the wrong client shows
            a.sendto(b'a-%d' % i, dest)
            b.sendto(b'b-%d' % i, dest)
            assert a.recvfrom(100) == (b'a-%d' % i, dest)
            assert b.recvfrom(100) == (b'b-%d' % i, dest)
        a.settimeout(0.2)
        b.settimeout(0.2)
        for sock in (a, b):                     # nothing extra is queued for either client
            try:
                extra = sock.recv(100)
            except socket.timeout:
                extra = None
            assert extra is None, extra
    sources = set(udp_echo.sources)
    assert len(udp_echo.sources) == 10
    assert len(sources) == 2, sources          # one upstream source port per client
    assert len({port for _, port in sources}) == 2
    assert_clean(proxy)


def test_repeated_datagrams_of_one_client_use_one_session(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxies(udp_config(port, udp_echo.address)).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    with client() as sock:
        for i in range(20):
            assert roundtrip(sock, b'same-%d' % i, dest) == (b'same-%d' % i, dest)
    assert len(udp_echo.sources) == 20
    assert len(set(udp_echo.sources)) == 1, set(udp_echo.sources)


def test_session_expires_after_idle_timeout(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address,
                               extra={'idle_timeout': '500ms'})).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    with client() as sock:
        assert roundtrip(sock, b'first', dest) == (b'first', dest)
        first = udp_echo.sources[-1]
        session_socket = proc_udp_sockets(first[1])
        assert session_socket, 'the session socket is not in /proc/net/udp'
        # traffic every 150 ms for 1.2 s (longer than idle_timeout) keeps the session
        for i in range(8):
            assert roundtrip(sock, b'keep-%d' % i, dest) == (b'keep-%d' % i, dest)
            time.sleep(0.15)    # the pacing of this client, not a wait for the proxy
        assert set(udp_echo.sources) == {first}
        # silence: the session socket closes after idle_timeout (and not much before)
        quiet_since = time.monotonic()
        wait_for(lambda: not proc_udp_sockets(first[1]) & session_socket, 5,
                 what='the idle session socket to be closed')
        assert time.monotonic() - quiet_since >= 0.4
        assert roundtrip(sock, b'after', dest) == (b'after', dest)
        after = udp_echo.sources[-1]
        assert after != first, 'the datagram after expiry used the old session'
        assert roundtrip(sock, b'again', dest) == (b'again', dest)
        assert udp_echo.sources[-1] == after
    assert_clean(proxy)


def test_responses_one_gives_every_request_a_new_session(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address,
                               extra={'udp': {'responses': 1}})).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    with client() as sock:
        for i in range(6):
            assert roundtrip(sock, b'req-%d' % i, dest) == (b'req-%d' % i, dest)
    ports = [p for _, p in udp_echo.sources]
    assert len(ports) == 6
    # each request is a new session: a new upstream socket, so a new source port (the
    # kernel picks ephemeral ports at random, so consecutive ones differ)
    assert all(x != y for x, y in zip(ports, ports[1:])), ports
    assert_clean(proxy)


def test_responses_one_drops_a_second_reply(proxies):
    """A backend answering twice: with responses: 1 the client sees only the first."""
    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    backend.bind(('127.0.0.1', 0))
    backend.settimeout(RECV_TIMEOUT)
    try:
        port = free_port(socket.SOCK_DGRAM)
        proxies(udp_config(port, '127.0.0.1:%d' % backend.getsockname()[1],
                           extra={'udp': {'responses': 1}})).start(wait_workers=2)
        with client() as sock:
            sock.sendto(b'q', ('127.0.0.1', port))
            data, addr = backend.recvfrom(100)
            backend.sendto(b'one', addr)
            assert sock.recv(100) == b'one'
            backend.sendto(b'two', addr)
            sock.settimeout(0.5)
            try:
                extra = sock.recv(100)
            except socket.timeout:
                extra = None
            assert extra is None
    finally:
        backend.close()


# -- sizes ---------------------------------------------------------------------------------

def test_empty_and_largest_datagrams_ipv4(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address)).start(wait_workers=2)
    dest = ('127.0.0.1', port)
    big = os.urandom(65507)
    with client() as sock:
        assert roundtrip(sock, b'', dest) == (b'', dest)
        assert roundtrip(sock, big, dest) == (big, dest)
        assert roundtrip(sock, b'', dest) == (b'', dest)
    assert len(udp_echo.sources) == 3
    assert_clean(proxy)


def test_empty_and_largest_datagrams_ipv6(proxies):
    backend = UdpEcho(host='::1')
    try:
        port = free_port(socket.SOCK_DGRAM, host='::1')
        proxy = proxies(udp_config(port, backend.address, host='::1')).start(wait_workers=2)
        big = os.urandom(65527)
        with client(socket.AF_INET6) as sock:
            for payload in (b'', big, b''):
                data, src = roundtrip(sock, payload, ('::1', port))
                assert data == payload
                assert src[:2] == ('::1', port)
        assert len(backend.sources) == 3
        assert backend.sources[0][0] == '::1'
        assert_clean(proxy)
    finally:
        backend.close()


# -- wildcard listeners: answer from the address the client sent to ------------------------

def test_wildcard_ipv4_listener_answers_from_the_address_sent_to(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address, workers=1, host='0.0.0.0')
                    ).start(wait_workers=1)
    with client() as a, client() as b, client() as both:
        assert roundtrip(a, b'to .2', ('127.0.0.2', port)) == (b'to .2', ('127.0.0.2', port))
        assert roundtrip(b, b'to .1', ('127.0.0.1', port)) == (b'to .1', ('127.0.0.1', port))
        # one client, two destination addresses: each reply from the address it went to
        for i in range(3):
            for host in ('127.0.0.2', '127.0.0.1', '127.0.0.3'):
                payload = f'{host}-{i}'.encode()
                assert roundtrip(both, payload, (host, port)) == (payload, (host, port))
    assert_clean(proxy)


def test_wildcard_dual_stack_listener_answers_from_the_address_sent_to(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address, workers=1, host='::',
                               extra={'ipv6only': False})).start(wait_workers=1)
    with client() as v4a, client() as v4b, client(socket.AF_INET6) as v6:
        assert roundtrip(v4a, b'v4 to .2', ('127.0.0.2', port)) == \
            (b'v4 to .2', ('127.0.0.2', port))
        assert roundtrip(v4b, b'v4 to .1', ('127.0.0.1', port)) == \
            (b'v4 to .1', ('127.0.0.1', port))
        data, src = roundtrip(v6, b'v6', ('::1', port))
        assert data == b'v6' and src[:2] == ('::1', port)
    assert_clean(proxy)


# -- load, neighbours, failures ------------------------------------------------------------

def test_many_clients_over_two_workers_all_answered_exactly(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, udp_echo.address)).start(wait_workers=2)
    workers = proxy.workers()
    dest = ('127.0.0.1', port)
    socks = [client() for _ in range(50)]
    try:
        for rnd in range(20):
            for i, sock in enumerate(socks):
                sock.sendto(b'client %d round %d' % (i, rnd), dest)
            for i, sock in enumerate(socks):
                assert sock.recvfrom(100) == (b'client %d round %d' % (i, rnd), dest)
        # each client kept one session, and both workers own some of them
        assert len(udp_echo.sources) == 50 * 20
        upstream_ports = {p for _, p in udp_echo.sources}
        assert len(upstream_ports) == 50
        session_inodes = set()
        for p in upstream_ports:
            session_inodes |= proc_udp_sockets(p)
        owned = {pid: socket_inodes(pid) & session_inodes for pid in workers}
        assert all(owned.values()), f'a worker got no client: {owned}'
        assert sorted(proxy.workers()) == sorted(workers)
    finally:
        for sock in socks:
            sock.close()
    assert_clean(proxy)


def test_udp_and_tcp_listeners_on_the_same_port(proxies, udp_echo):
    tcp_backend = TcpBackend(echo_handler)
    try:
        port = free_port()
        proxy = proxies(f"""
            workers: 2
            listeners:
              - name: same-port-tcp     # the default name (the address) would clash
                listen: "127.0.0.1:{port}"
                protocol: tcp
                upstream: ["{tcp_backend.address}"]
              - name: same-port-udp
                listen: "127.0.0.1:{port}"
                protocol: udp
                upstream: ["{udp_echo.address}"]
        """).start(wait_workers=2)
        with client() as sock:
            for i in range(3):
                assert roundtrip(sock, b'udp %d' % i, ('127.0.0.1', port)) == \
                    (b'udp %d' % i, ('127.0.0.1', port))
                assert echo_roundtrip(port, b'tcp %d' % i) == b'tcp %d' % i
        assert len(udp_echo.sources) == 3 and len(tcp_backend.peers) == 3
        assert_clean(proxy)
    finally:
        tcp_backend.close()


def test_upstream_down_then_up(proxies):
    dead = free_port(socket.SOCK_DGRAM)
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(udp_config(port, f'127.0.0.1:{dead}')).start(wait_workers=2)
    workers = sorted(proxy.workers())
    dest = ('127.0.0.1', port)
    with client(timeout=0.3) as sock:
        for i in range(5):                      # nothing answers; the proxy survives it
            sock.sendto(b'lost %d' % i, dest)
            try:
                reply = sock.recv(100)
            except socket.timeout:
                reply = None
            assert reply is None, reply
        proxy.wait_log('Connection refused')    # the ICMP error was seen, the session ended
        assert sorted(proxy.workers()) == workers
        assert proxy.proc.poll() is None
        backend = UdpEcho(port=dead)
        try:
            sock.settimeout(RECV_TIMEOUT)
            assert roundtrip(sock, b'now up', dest) == (b'now up', dest)
            with client() as other:
                assert roundtrip(other, b'fresh client', dest) == (b'fresh client', dest)
        finally:
            backend.close()
    assert sorted(proxy.workers()) == workers
    assert_clean(proxy)


# -- reload --------------------------------------------------------------------------------

def test_hup_with_unchanged_udp_listener_keeps_serving(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    config = udp_config(port, udp_echo.address, extra={'idle_timeout': '2s'})
    proxy = proxies(config).start(wait_workers=2)
    old_workers = set(proxy.workers())
    dest = ('127.0.0.1', port)
    sock = client(timeout=0.2)
    sent: list[int] = []          # sequence numbers, in order
    got: set[int] = set()
    stop = threading.Event()      # the sender stops
    done = threading.Event()      # the receiver stops
    limit = 1000                  # at most 10 s of traffic at one datagram per 10 ms

    def sender():
        for seq in range(limit):
            if stop.is_set():
                return
            sock.sendto(b'%d' % seq, dest)
            sent.append(seq)
            time.sleep(0.01)      # the client's pacing

    def receiver():
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            try:
                got.add(int(sock.recv(100)))
            except socket.timeout:
                continue
            except (OSError, ValueError):
                return

    threads = [threading.Thread(target=sender, daemon=True),
               threading.Thread(target=receiver, daemon=True)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(got) >= 10, 5, what='replies before the reload')
        proxy.write_config(config)
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active', timeout=10)
        first_after = len(sent)       # every datagram from here on was sent after the reload
        wait_for(lambda: len(sent) >= first_after + 100, 10, what='100 datagrams after the reload')
        stop.set()
        threads[0].join(2)
        last = len(sent)
        after = set(range(first_after, last))
        wait_for(lambda: after <= got, 5,
                 what='replies to every datagram sent after the reload')
        new_workers = set(proxy.serving_workers())
        assert len(new_workers) == 2 and not new_workers & old_workers
    finally:
        stop.set()
        done.set()
        for t in threads:
            t.join(3)
        sock.close()
    assert_clean(proxy)
