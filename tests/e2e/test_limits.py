"""TCP connection limits shared by every worker: max_connections and max_connections_per_ip.

Two workers share one listening socket, and the kernel gives each new connection to
whichever worker accepts first, so a limit counted per worker would let up to twice as
many through; these tests open more connections than that and count what is served.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

from helpers.backends import TcpBackend, echo_handler
from helpers.configs import pp_config, tcp_config
from helpers.net import PAYLOAD, exchange, free_port
from helpers.proc import wait_for
from mpproxy.proxy.edge import proxy_header


def held(port: int, source: str = '127.0.0.1', timeout: float = 3.0) -> socket.socket | None:
    """Open a connection and check it is served (one echo); None when it is not."""
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    try:
        s.connect(('127.0.0.1', port))
        s.sendall(b'ping')
        if s.recv(10) == b'ping':
            return s
    except OSError:
        pass
    s.close()
    return None


def test_max_connections_is_shared_and_the_rest_wait_in_the_backlog(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=2,
                               extra={'max_connections': 3})).start(wait_workers=2)
    open_ = [held(port) for _ in range(3)]
    assert all(open_)
    waiting = []
    try:
        for _ in range(3):                 # accepted by the kernel, not by mpproxy: no echo
            s = socket.create_connection(('127.0.0.1', port), timeout=5)
            s.sendall(b'wait')
            s.settimeout(0.5)
            try:
                got = s.recv(10)
            except socket.timeout:
                got = None
            assert got is None, 'a connection past max_connections was served'
            waiting.append(s)
        proxy.wait_log('max_connections reached; new connections wait in the backlog')
        open_.pop().close()                # one slot frees: exactly one waiting client goes on
        served = wait_for(lambda: [s for s in waiting if _ready(s)] or None, 5,
                          what='a waiting client served')
        assert len(served) == 1
        for s in open_:
            s.close()
        for s in waiting:                  # all served in the end, none reset
            s.settimeout(5)
            if s not in served:
                assert s.recv(10) == b'wait'
    finally:
        for s in open_ + waiting:
            s.close()
    assert len(tcp_echo.peers) == 6


def _ready(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(10) == b'wait'
    except socket.timeout:
        return False


def test_max_connections_per_ip_is_shared_and_counts_each_ip(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=2,
                               extra={'max_connections_per_ip': 2})).start(
        wait_workers=2)
    first = [held(port) for _ in range(2)]
    try:
        assert all(first)
        refused = [held(port, timeout=1.0) for _ in range(6)]     # each may land on either worker
        assert refused == [None] * 6, 'the limit was counted per worker'
        other = held(port, source='127.0.0.2')                      # another IP has its own count
        assert other is not None
        other.close()
        proxy.wait_log('refused: max_connections_per_ip (2) reached')
        first.pop().close()
        again = wait_for(lambda: held(port, timeout=1.0), 5, what='a slot for 127.0.0.1 again')
        first.append(again)
    finally:
        for s in first:
            if s:
                s.close()


def test_per_ip_limit_counts_the_real_client_behind_a_proxy(proxies, header_echo):
    port = free_port()
    proxy = proxies(pp_config(port, header_echo.address, accept=True, workers=2,
                              extra={'max_connections_per_ip': 1})).start(
        wait_workers=2)
    a = proxy_header.v1(('192.0.2.1', 1000), ('127.0.0.1', port))
    b = proxy_header.v1(('192.0.2.2', 1000), ('127.0.0.1', port))
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(a + b'one')
        assert s.recv(10) == b'one'              # 192.0.2.1 holds its one connection
        assert exchange(port, a + PAYLOAD, timeout=2) == b''
        assert exchange(port, b + PAYLOAD) == PAYLOAD   # the same peer, another real client
    proxy.wait_log('client 192.0.2.1:1000 refused: max_connections_per_ip (1) reached')
    wait_for(lambda: exchange(port, a + PAYLOAD) == PAYLOAD, 5,    # released once it closed
             what='192.0.2.1 admitted again')


class CountingEcho(TcpBackend):
    """An echo backend that records the most connections it held at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.active = self.peak = 0
        super().__init__(self._handle)

    def _handle(self, conn: socket.socket):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            echo_handler(conn)
        finally:
            with self.lock:
                self.active -= 1


def test_a_connection_flood_past_the_limits_is_held_to_them(proxies):
    backend = CountingEcho()
    try:
        port = free_port()
        proxy = proxies(tcp_config(port, backend.address, workers=2, extra={
            'max_connections': 20, 'max_connections_per_ip': 10})).start(wait_workers=2)
        workers = sorted(proxy.workers())
        outcomes = collections.Counter()
        deadline = time.monotonic() + 20

        def flood():
            for _ in range(60):                   # 8 x 60 connections from one IP
                if time.monotonic() > deadline:
                    break
                try:
                    with socket.create_connection(('127.0.0.1', port), timeout=3) as s:
                        s.sendall(b'x')
                        got = s.recv(1)
                        time.sleep(0.02)          # hold it a moment: the flood overlaps
                    outcomes['served' if got == b'x' else 'closed'] += 1
                except OSError:
                    outcomes['refused'] += 1

        threads = [threading.Thread(target=flood) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcomes['served'] > 0 and outcomes['refused'] > 0, outcomes
        # per IP 10, and two workers may each let one past in the same instant
        assert backend.peak <= 10 + 1, backend.peak
        assert sorted(proxy.workers()) == workers
        log = proxy.log()
        assert 'Traceback' not in log
        lines = [l for l in log.splitlines() if 'max_connections_per_ip (10) reached' in l]
        per_second = collections.Counter((l[:19], l.split('#')[1].split(':')[0]) for l in lines)
        assert lines and max(per_second.values()) == 1, per_second   # per worker, per second
        other = held(port, source='127.0.0.2')    # and the listener still serves
        assert other is not None
        other.close()
    finally:
        backend.close()
