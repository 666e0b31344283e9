"""Balancing across several real backends, through the real `mpproxy` command."""

from __future__ import annotations

import signal
import socket
import subprocess

from helpers.backends import UdpEcho, tagged_backend
from helpers.configs import upstream_config, weighted
from helpers.net import first_bytes, free_port
from helpers.proc import wait_for


def test_weighted_round_robin_matches_weights(proxies):
    backends = [tagged_backend(b'A'), tagged_backend(b'B'), tagged_backend(b'C')]
    try:
        port = free_port()
        servers = weighted((backends[0].address, 5), (backends[1].address, 3),
                           (backends[2].address, 2))
        proxies(upstream_config(port, servers, 'round_robin')).start(wait_workers=1)
        counts = {b'A': 0, b'B': 0, b'C': 0}
        for _ in range(1000):
            counts[first_bytes(port, 1)] += 1
        assert counts == {b'A': 500, b'B': 300, b'C': 200}, counts   # smooth WRR is exact
    finally:
        for b in backends:
            b.close()


def established_to(port: int) -> int:
    out = subprocess.run(['ss', '-tnH', 'state', 'established', f'( dport = :{port} )'],
                         capture_output=True, text=True).stdout
    return len(out.splitlines())


def test_least_conn_sends_new_connections_to_the_least_busy_server(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    held = []
    try:
        port = free_port()
        servers = weighted((a.address, 1), (b.address, 1))
        proxies(upstream_config(port, servers, 'least_conn')).start(wait_workers=1)
        for _ in range(4):                     # 2 + 2, held open
            sock = socket.create_connection(('127.0.0.1', port), timeout=5)
            held.append((sock, sock.recv(1)))
        assert sorted(tag for _, tag in held) == [b'A', b'A', b'B', b'B']
        for sock, tag in held:                 # A's connections end: A is now idle
            if tag == b'A':
                sock.close()
        wait_for(lambda: established_to(a.port) == 0, 5, what="A's connections to close")
        fresh = []
        for _ in range(2):                     # round robin would give one to each
            sock = socket.create_connection(('127.0.0.1', port), timeout=5)
            fresh.append(sock.recv(1))
            held.append((sock, None))
        assert fresh == [b'A', b'A']
    finally:
        for sock, _ in held:
            sock.close()
        a.close()
        b.close()


def test_hash_keeps_a_client_on_one_server_across_reloads(proxies):
    backends = [tagged_backend(t) for t in (b'A', b'B', b'C', b'D')]
    try:
        port = free_port()
        servers = weighted(*((bk.address, 1) for bk in backends))
        config = upstream_config(port, servers, 'hash', workers=2, extra={'hash_key': 'client_ip'})
        proxy = proxies(config).start(wait_workers=2)
        seen = {first_bytes(port, 1) for _ in range(30)}
        assert len(seen) == 1                   # every connection of 127.0.0.1: one server
        proxy.write_config(config)              # the same config: the reload keeps the choice
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active')
        assert {first_bytes(port, 1) for _ in range(30)} == seen
    finally:
        for b in backends:
            b.close()


def test_udp_sessions_follow_the_weights(proxies):
    a, b = UdpEcho(prefix=b'A'), UdpEcho(prefix=b'B')
    clients: list[socket.socket] = []
    try:
        port = free_port(socket.SOCK_DGRAM)
        servers = weighted((a.address, 3), (b.address, 1))
        proxies(upstream_config(port, servers, 'round_robin', protocol='udp')).start(wait_workers=1)
        counts = {b'A': 0, b'B': 0}
        # 40 clients, all kept open: 40 distinct source ports, so 40 sessions (the port of a
        # closed client may be given to the next one, which would join its session)
        for _ in range(40):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            clients.append(c)
            c.settimeout(2)
            c.sendto(b'x', ('127.0.0.1', port))
            counts[c.recv(10)[:1]] += 1
        assert counts == {b'A': 30, b'B': 10}, counts
    finally:
        for c in clients:
            c.close()
        a.close()
        b.close()


def test_dead_server_is_marked_down_and_clients_notice_nothing(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    try:
        port = free_port()
        servers = [{'address': a.address, 'max_fails': 1, 'fail_timeout': '30s'},
                   {'address': b.address, 'max_fails': 1, 'fail_timeout': '30s'}]
        proxy = proxies(upstream_config(port, servers, 'round_robin', workers=2)).start(wait_workers=2)
        assert {first_bytes(port, 1) for _ in range(10)} == {b'A', b'B'}
        a.close()                              # A dies: its port now refuses connections
        replies = [first_bytes(port, 1) for _ in range(100)]
        assert replies == [b'B'] * 100        # every connection opened after it died works
        log = proxy.wait_log('is down for 30s')
        assert f'server {a.address} is down' in log
        assert log.count('Connection refused') <= 2   # once per worker, then it is skipped
    finally:
        b.close()


def test_backup_is_used_only_when_every_primary_is_down(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    try:
        port = free_port()
        servers = [{'address': a.address}, {'address': b.address, 'backup': True}]
        proxies(upstream_config(port, servers, 'round_robin')).start(wait_workers=1)
        assert [first_bytes(port, 1) for _ in range(20)] == [b'A'] * 20
        a.close()
        assert [first_bytes(port, 1) for _ in range(20)] == [b'B'] * 20
    finally:
        b.close()


def test_max_conns_caps_a_server(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    held = []
    try:
        port = free_port()
        servers = [{'address': a.address, 'max_conns': 1}, {'address': b.address}]
        proxies(upstream_config(port, servers, 'round_robin')).start(wait_workers=1)
        for _ in range(6):
            sock = socket.create_connection(('127.0.0.1', port), timeout=5)
            held.append(sock)
        tags = [sock.recv(1) for sock in held]
        assert tags.count(b'A') == 1 and tags.count(b'B') == 5, tags
    finally:
        for sock in held:
            sock.close()
        a.close()
        b.close()


def test_backend_killed_during_load_fails_no_connection_opened_after(proxies):
    import threading
    import time
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    results, stop = [], threading.Event()

    def client():
        n = 0
        while not stop.is_set() and n < 5000:
            started = time.monotonic()
            try:
                ok = first_bytes(port, 1) in (b'A', b'B')
            except OSError:
                ok = False
            results.append((started, ok))
            n += 1

    try:
        port = free_port()
        servers = weighted((a.address, 1), (b.address, 1))
        proxies(upstream_config(port, servers, 'round_robin', workers=2)).start(wait_workers=2)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) > 200, 10, what='load before the kill')
        a.close()
        died = time.monotonic()
        wait_for(lambda: sum(1 for s, _ in results if s > died) > 400, 15, what='load after the kill')
        stop.set()
        for t in threads:
            t.join(10)
        after = [ok for started, ok in results if started > died]
        assert all(after), f'{after.count(False)} of {len(after)} connections opened after the kill failed'
    finally:
        stop.set()
        b.close()
