"""TCP relay end to end: the real `mpproxy` command between real sockets."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time

import pytest

from helpers.backends import TcpBackend, echo_handler
from helpers.configs import tcp_config
from helpers.net import connect, echo_roundtrip, free_port, recv_all
from helpers.proc import fd_count, rss_kib, wait_for


def test_one_mib_echo_is_byte_exact_across_workers(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=3)).start(wait_workers=3)
    payloads = [os.urandom(1 << 20) for _ in range(6)]
    results = [None] * len(payloads)

    def run(i):
        results[i] = echo_roundtrip(port, payloads[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for sent, got in zip(payloads, results):
        assert got is not None and len(got) == len(sent)
        assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
    assert len(proxy.workers()) == 3


def test_client_fin_first_reaches_upstream_and_reply_still_flows(proxies):
    seen = {}

    def handler(conn):
        data = recv_all(conn)                  # returns only on the client's FIN
        seen['request'] = data
        conn.sendall(b'reply to ' + data)
        conn.shutdown(socket.SHUT_WR)

    backend = TcpBackend(handler)
    try:
        port = free_port()
        proxies(tcp_config(port, backend.address)).start(wait_workers=2)
        with connect(port) as sock:
            sock.sendall(b'question')
            sock.shutdown(socket.SHUT_WR)      # half-close: FIN to the proxy
            assert recv_all(sock) == b'reply to question'
        assert seen['request'] == b'question'
    finally:
        backend.close()


def test_upstream_fin_first_and_client_can_still_send(proxies):
    got = {}
    done = threading.Event()

    def handler(conn):
        conn.sendall(b'banner')
        conn.shutdown(socket.SHUT_WR)          # the upstream is done talking
        got['after'] = recv_all(conn)          # but still reads until the client's FIN
        done.set()

    backend = TcpBackend(handler)
    try:
        port = free_port()
        proxies(tcp_config(port, backend.address)).start(wait_workers=2)
        with connect(port) as sock:
            assert recv_all(sock) == b'banner'  # EOF arrives: the upstream's FIN came through
            sock.sendall(b'late data')
            sock.shutdown(socket.SHUT_WR)
            assert done.wait(5)
            assert sock.recv(10) == b''
        assert got['after'] == b'late data'
    finally:
        backend.close()


def test_half_close_false_the_clients_fin_ends_both_directions(proxies):
    """nginx's default (proxy_half_close off): the request still reaches the upstream, the
    reply it writes after the client's FIN does not reach the client."""
    seen = {}
    done = threading.Event()

    def handler(conn):
        seen['request'] = recv_all(conn)       # the proxy's FIN (it closed) ends this
        try:
            conn.sendall(b'reply to ' + seen['request'])
        except OSError:
            pass
        done.set()

    backend = TcpBackend(handler)
    try:
        port = free_port()
        proxies(tcp_config(port, backend.address,
                           extra={'half_close': False})).start(wait_workers=2)
        with connect(port) as sock:
            sock.sendall(b'question')
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b''       # closed: no reply comes after the FIN
        assert done.wait(5)
        assert seen['request'] == b'question'
    finally:
        backend.close()


def test_half_close_false_the_upstreams_fin_closes_the_client_after_its_bytes(proxies):
    got = {}
    done = threading.Event()

    def handler(conn):
        conn.sendall(b'banner')
        conn.shutdown(socket.SHUT_WR)
        got['after'] = recv_all(conn)          # the proxy closes: nothing more comes
        done.set()

    backend = TcpBackend(handler)
    try:
        port = free_port()
        proxies(tcp_config(port, backend.address,
                           extra={'half_close': False})).start(wait_workers=2)
        with connect(port) as sock:
            assert recv_all(sock) == b'banner'   # every byte first, then the proxy's FIN
            assert done.wait(5)                  # (half-close would wait for our FIN)
        assert got['after'] == b''
    finally:
        backend.close()


def test_half_close_timeout_closes_the_other_direction(proxies):
    def handler(conn):
        recv_all(conn)                          # read the FIN, then never answer nor close
        time.sleep(5)

    backend = TcpBackend(handler)
    try:
        port = free_port()
        proxy = proxies(tcp_config(port, backend.address,
                                   extra={'half_close_timeout': '300ms'})).start(wait_workers=2)
        with connect(port) as sock:
            sock.sendall(b'x')
            sock.shutdown(socket.SHUT_WR)
            start = time.monotonic()
            assert sock.recv(10) == b''
            assert time.monotonic() - start < 3
        proxy.wait_log('half-close timeout')
    finally:
        backend.close()


def test_idle_timeout_closes_a_silent_pair(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address,
                               extra={'idle_timeout': '400ms'})).start(wait_workers=2)
    with connect(port) as sock:
        sock.sendall(b'ping')
        assert sock.recv(10) == b'ping'
        start = time.monotonic()
        assert sock.recv(10) == b''
        assert 0.3 < time.monotonic() - start < 3
    proxy.wait_log('idle timeout')


def test_upstream_refused_closes_client_promptly_and_logs(proxies):
    dead = free_port()
    port = free_port()
    proxy = proxies(tcp_config(port, f'127.0.0.1:{dead}')).start(wait_workers=2)
    with connect(port) as sock:
        start = time.monotonic()
        try:
            assert sock.recv(10) == b''
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 2
    log = proxy.wait_log('Connection refused')
    assert f'127.0.0.1:{dead}' in log


@pytest.mark.parametrize('extra', [{}, {'allow': ['127.0.0.0/8']}],
                         ids=['address asked when logging', 'address from accept'])
def test_connect_failure_log_names_the_client(proxies, extra):
    # Without allow/deny, limits, PROXY protocol, access log or hashing the worker accepts
    # without the client's address (accept4) and asks the socket only to log about it.
    dead = free_port()
    port = free_port()
    proxy = proxies(tcp_config(port, f'127.0.0.1:{dead}', workers=1, extra=extra)).start()
    with connect(port) as sock:
        client = sock.getsockname()
        try:
            sock.recv(10)
        except ConnectionResetError:
            pass
    log = proxy.wait_log(f'no upstream could be connected for client {client[0]}:{client[1]}')
    assert f'client: {client[0]}:{client[1]}' in log       # the connect() failure line too


def test_connect_timeout(proxies):
    # A listening socket whose accept queue is full does not answer SYNs: connect() hangs.
    blocker = socket.socket()
    blocker.bind(('127.0.0.1', 0))
    blocker.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(blocker.getsockname())
            fillers.append(s)
        bport = blocker.getsockname()[1]
        wait_for(lambda: int(subprocess.run(['ss', '-ltnH', f'sport = :{bport}'], capture_output=True,
                                            text=True).stdout.split()[1]) >= 1,
                 what='a full accept queue')
        port = free_port()
        upstream = f'127.0.0.1:{blocker.getsockname()[1]}'
        proxy = proxies(tcp_config(port, upstream,
                                   extra={'connect_timeout': '300ms'})).start(wait_workers=2)
        with connect(port) as sock:
            start = time.monotonic()
            try:
                assert sock.recv(10) == b''
            except ConnectionResetError:
                pass
            assert time.monotonic() - start < 4
        proxy.wait_log('timed out')
    finally:
        for s in fillers:
            s.close()
        blocker.close()


def test_slow_reader_backpressure_bounds_worker_memory(proxies):
    total = 256 << 20
    chunk = os.urandom(1 << 16)
    sent = {}

    def handler(conn):
        n = 0
        while n < total:
            conn.sendall(chunk)
            n += len(chunk)
        sent['n'] = n
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)

    backend = TcpBackend(handler)
    try:
        port = free_port()
        proxy = proxies(tcp_config(port, backend.address, workers=1)).start(wait_workers=1)
        worker = proxy.workers()[0]
        base = rss_kib(worker)
        with connect(port, timeout=30) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            assert sock.recv(1) != b''
            time.sleep(1.5)   # a stalled reader, on purpose: let the upstream push all it can
            grown = rss_kib(worker) - base
            assert grown < 16 * 1024, f'worker RSS grew by {grown} KiB while the client was stalled'
            assert 'n' not in sent, 'the upstream could send everything: no backpressure'
            received = 1 + len(recv_all(sock))
        assert received == total
    finally:
        backend.close()


def test_ipv6_listener_and_upstream(proxies):
    backend = TcpBackend(echo_handler, host='::1')
    try:
        port = free_port(host='::1')
        proxies(tcp_config(port, backend.address, host='::1')).start(wait_workers=2)
        assert echo_roundtrip(port, b'over v6', host='::1') == b'over v6'
        assert backend.peers[0][0] == '::1'
    finally:
        backend.close()


def test_ipv6only_false_accepts_ipv4_on_a_v6_wildcard(proxies, tcp_echo):
    port = free_port()
    proxies(f"""
        workers: 1
        listeners:
          - listen: "[::]:{port}"
            protocol: tcp
            ipv6only: false
            upstream: ["{tcp_echo.address}"]
    """).start(wait_workers=1)
    assert echo_roundtrip(port, b'v4 on v6', host='127.0.0.1') == b'v4 on v6'
    assert echo_roundtrip(port, b'v6', host='::1') == b'v6'


def test_configured_backlog_is_kept(proxies, tcp_echo):
    port = free_port()
    proxies(tcp_config(port, tcp_echo.address, extra={'backlog': 1234})).start(wait_workers=2)
    assert echo_roundtrip(port, b'x') == b'x'         # the workers have created their servers
    out = subprocess.run(['ss', '-ltnH', f'sport = :{port}'], capture_output=True, text=True).stdout
    assert out.split()[2] == '1234', out               # Send-Q of a listener is its backlog


def test_keepalive_sets_so_keepalive_on_both_sides(proxies):
    backend = TcpBackend(echo_handler)
    try:
        port = free_port()
        proxies(tcp_config(port, backend.address, workers=1, extra={
            'keepalive': {'idle': '30s', 'interval': '5s', 'count': 3}})).start(wait_workers=1)
        # the proxy's two sockets of an open pair both show a keepalive timer in `ss -o`
        with connect(port) as sock:
            sock.sendall(b'k')
            assert sock.recv(1) == b'k'
            out = subprocess.run(['ss', '-tnoH', f'( sport = :{port} )'], capture_output=True,
                                 text=True).stdout
            assert 'keepalive' in out, out
            out = subprocess.run(['ss', '-tnoH', f'( dport = :{backend.port} )'],
                                 capture_output=True, text=True).stdout
            assert 'keepalive' in out, out
    finally:
        backend.close()


def test_churn_with_half_close_no_crash_no_failure_no_fd_leak(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=2)).start(wait_workers=2)
    workers = proxy.workers()
    echo_roundtrip(port, b'warm')
    idle = {pid: fd_count(pid) for pid in workers}
    failures, done = [], [0]
    deadline = time.monotonic() + 20
    lock = threading.Lock()

    def client(i):
        n = 0
        while time.monotonic() < deadline and n < 20000:
            payload = b'%d-%d' % (i, n)
            try:
                with connect(port) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    got = recv_all(sock)
                if got != payload:
                    failures.append((payload, got))
            except OSError as exc:
                failures.append((payload, exc))
            n += 1
        with lock:
            done[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert done[0] > 2000
    assert sorted(proxy.workers()) == sorted(workers), 'a worker crashed or was replaced'
    assert 'crash' not in proxy.log() and 'Traceback' not in proxy.log()
    wait_for(lambda: all(fd_count(pid) <= idle[pid] for pid in workers), 5,
             what=f'fd counts back to idle {idle}')
