"""The admin endpoint of the real mpproxy: /metrics, /status, `mpproxy status`, its safety."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from helpers.backends import TcpBackend, tagged_backend
from helpers.configs import listener, tcp_config, udp_config, upgrade_config, with_admin
from helpers.net import client, connect, echo_roundtrip, free_port, get, recv_exactly
from helpers.proc import (alive, cmdline, fd_count, listening_inodes, run_cli, socket_inodes,
                          wait_for)

PROM_CT = 'text/plain; version=0.0.4; charset=utf-8'
HIST = 'mpproxy_upstream_connect_duration_seconds'


def scrape(port: int) -> dict:
    """{(name, frozenset of labels): value} of every sample /metrics has now."""
    status, content_type, body = get(port, '/metrics')
    assert status == 200 and content_type == PROM_CT
    out = {}
    for line in body.decode().splitlines():
        if not line or line.startswith('#'):
            continue
        head, value = line.rsplit(' ', 1)
        name, _, labels = head.partition('{')
        pairs = [p.split('=', 1) for p in labels.rstrip('}').split(',')] if labels else []
        out[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def series(samples: dict, name: str) -> dict:
    return {ls: v for (n, ls), v in samples.items() if n == name}


def counters(samples: dict) -> dict:
    """Every counter sample (histogram buckets, sums and counts included)."""
    return {key: v for key, v in samples.items()
            if key[0].endswith(('_total', '_bucket', '_sum', '_count'))}


def wait_metric(port: int, name: str, expected, timeout: float = 5.0, **labels) -> dict:
    """Scrape until total(name, labels) == expected (workers publish once a second)."""
    box = {}

    def check():
        box['s'] = scrape(port)
        return total(box['s'], name, **labels) == expected
    try:
        wait_for(check, timeout, interval=0.1, what=f'{name}{labels} == {expected}')
    except AssertionError:
        raise AssertionError(f'{name}{labels}: {total(box["s"], name, **labels)} != {expected}')
    return box['s']


def never_backwards(before: dict, after: dict) -> None:
    for key, value in counters(before).items():
        assert key in after, f'{key} disappeared'
        assert after[key] >= value, f'{key} went from {value} to {after[key]}'


# -- /metrics ----------------------------------------------------------------------------

def test_tcp_counts_connections_exact_bytes_and_connect_times(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(wait_workers=2)
    name = f'127.0.0.1:{port}'
    sizes = [1 + 997 * i for i in range(12)]
    for size in sizes:
        assert echo_roundtrip(port, b'x' * size) == b'x' * size
    s = wait_metric(admin, 'mpproxy_tcp_received_bytes_total', sum(sizes), listener=name)
    assert total(s, 'mpproxy_tcp_sent_bytes_total', listener=name) == sum(sizes)
    assert total(s, 'mpproxy_tcp_connections_accepted_total', listener=name) == len(sizes)
    assert total(s, 'mpproxy_tcp_connections_failed_total') == 0
    workers = {dict(ls)['worker'] for ls in series(s, 'mpproxy_tcp_connections_accepted_total')}
    assert workers == {'0', '1'}
    server = dict(upstream=name, server=tcp_echo.address)
    assert total(s, HIST + '_count', **server) == len(sizes)      # one connect per connection
    assert total(s, HIST + '_bucket', le='+Inf', **server) == len(sizes)
    assert 0 < total(s, HIST + '_sum', **server) < len(sizes) * 1.0
    held = connect(port)                                          # an open one is a gauge
    held.sendall(b'abc')
    assert held.recv(3) == b'abc'
    s = wait_metric(admin, 'mpproxy_tcp_connections_active', 1, listener=name)
    assert total(s, 'mpproxy_tcp_received_bytes_total') == sum(sizes) + 3
    assert total(s, 'mpproxy_upstream_server_active', **server) == 1
    held.close()
    wait_metric(admin, 'mpproxy_tcp_connections_active', 0, listener=name)
    assert proxy.proc.poll() is None


def test_udp_counts_datagrams_and_sessions(proxies, udp_echo):
    port, admin = free_port(socket.SOCK_DGRAM), free_port()
    proxy = proxies(with_admin(udp_config(port, udp_echo.address), admin)).start(wait_workers=2)
    name = f'127.0.0.1:{port}'
    socks = [client() for _ in range(3)]
    try:
        for i, sock in enumerate(socks):
            for j in range(4):
                payload = b'%d-%d' % (i, j) * 10
                sock.sendto(payload, ('127.0.0.1', port))
                assert sock.recvfrom(1000)[0] == payload
        s = wait_metric(admin, 'mpproxy_udp_datagrams_sent_total', 12, listener=name)
        assert total(s, 'mpproxy_udp_datagrams_received_total', listener=name) == 12
        assert total(s, 'mpproxy_udp_received_bytes_total', listener=name) == 12 * 30
        assert total(s, 'mpproxy_udp_sent_bytes_total', listener=name) == 12 * 30
        assert total(s, 'mpproxy_udp_sessions_created_total', listener=name) == 3
        assert total(s, 'mpproxy_udp_sessions_active', listener=name) == 3
        assert total(s, 'mpproxy_udp_datagrams_dropped_total') == 0
        assert {dict(ls)['worker'] for ls in series(s, 'mpproxy_udp_sessions_active')} == {'0', '1'}
    finally:
        for sock in socks:
            sock.close()
    assert proxy.proc.poll() is None


def test_counters_never_go_backwards_across_reload_and_a_killed_worker(proxies, tcp_echo, udp_echo):
    port, admin = free_port(), free_port()
    config = with_admin(tcp_config(port, tcp_echo.address), admin)
    config['listeners'].append(listener(port, [udp_echo.address], 'udp'))
    proxy = proxies(config).start(wait_workers=2)
    sent = 0

    def traffic(n):
        nonlocal sent
        for _ in range(n):
            assert echo_roundtrip(port, b'y' * 100) == b'y' * 100
            with client() as c:
                c.sendto(b'ping', ('127.0.0.1', port))
                assert c.recvfrom(10)[0] == b'ping'
        sent += n
        return wait_metric(admin, 'mpproxy_tcp_connections_accepted_total', sent)

    before = traffic(10)
    old = set(proxy.workers())
    held = connect(port)                           # stays with its old worker while it drains
    held.sendall(b'h')
    assert held.recv(1) == b'h'
    proxy.signal(signal.SIGHUP)                    # a reload: every worker is replaced
    proxy.wait_log('generation 2 active')
    held.sendall(b'z' * 776)                       # counted just before its worker exits:
    assert len(recv_exactly(held, 776)) == 776     # only the publish at exit can tell
    held.close()
    wait_for(lambda: not any(alive(p) for p in old), 10, what='the old workers to exit')
    after_reload = scrape(admin)
    never_backwards(before, after_reload)
    assert total(after_reload, 'mpproxy_tcp_received_bytes_total') == 10 * 100 + 777
    assert total(after_reload, 'mpproxy_tcp_connections_accepted_total') == 11
    sent += 1
    assert total(after_reload, 'mpproxy_udp_sessions_created_total') == 10
    before = traffic(10)
    victim = proxy.workers()[0]
    os.kill(victim, signal.SIGKILL)                # no goodbye: its last published counts stay
    wait_for(lambda: len(proxy.serving_workers()) == 2 and victim not in proxy.workers(), 5,
             what='the killed worker to be replaced')
    after_kill = scrape(admin)
    never_backwards(before, after_kill)
    assert total(after_kill, 'mpproxy_tcp_connections_accepted_total') == 21
    final = traffic(5)
    never_backwards(after_kill, final)
    assert total(final, 'mpproxy_tcp_received_bytes_total') == 25 * 100 + 777


def test_server_state_flips_with_passive_health(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    try:
        port, admin = free_port(), free_port()
        config = with_admin(f"""
        workers: 1
        upstreams:
          pool:
            servers:
              - {{address: "{a.address}", max_fails: 1, fail_timeout: 60s}}
              - {{address: "{b.address}", max_fails: 1, fail_timeout: 60s}}
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: pool
        """, admin)
        proxy = proxies(config).start(wait_workers=1)
        s = wait_metric(admin, 'mpproxy_upstream_server_up', 2)
        a_state = dict(upstream='pool', server=a.address)
        a.close()                                  # A refuses from now on
        for _ in range(4):
            with connect(port) as c:
                assert c.recv(1) == b'B'           # the failed try went on to B
        s = wait_metric(admin, 'mpproxy_upstream_server_up', 0, **a_state)
        assert total(s, 'mpproxy_upstream_server_up', upstream='pool', server=b.address) == 1
        assert total(s, 'mpproxy_upstream_connect_errors_total', **a_state) == 1
        assert total(s, 'mpproxy_upstream_server_check_up') == 0        # no health_check
        status = json.loads(get(admin, '/status')[2])
        servers = {x['server']: x for x in status['upstreams'][0]['servers']}
        assert servers[a.address]['state'] == 'down' and servers[a.address]['health_check'] is None
        assert servers[a.address]['connect_errors'] == 1
        assert servers[b.address]['state'] == 'up'
        assert proxy.proc.poll() is None
    finally:
        b.close()


def test_server_state_follows_active_health_checks(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    revived = None
    try:
        port, admin = free_port(), free_port()
        config = with_admin(f"""
        workers: 2
        upstreams:
          pool:
            health_check: {{type: tcp, interval: 100ms, timeout: 200ms, rise: 1, fall: 2}}
            servers:
              - {{address: "{a.address}", max_fails: 0}}
              - {{address: "{b.address}", max_fails: 0}}
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: pool
        """, admin)
        proxy = proxies(config).start(wait_workers=2)
        a_state = dict(upstream='pool', server=a.address)
        wait_metric(admin, 'mpproxy_upstream_server_check_up', 2)
        a_port = a.port
        a.close()
        proxy.wait_log(f'server {a.address} is down', timeout=5)
        s = scrape(admin)
        assert total(s, 'mpproxy_upstream_server_check_up', **a_state) == 0
        assert total(s, 'mpproxy_upstream_server_check_up', server=b.address) == 1
        s = wait_metric(admin, 'mpproxy_upstream_server_up', 0, **a_state)    # in both workers
        assert len(series(s, 'mpproxy_upstream_server_up')) == 4
        status = json.loads(get(admin, '/status')[2])
        servers = {x['server']: x for x in status['upstreams'][0]['servers']}
        assert servers[a.address]['state'] == 'down'
        assert servers[a.address]['health_check'] == 'down'
        assert servers[b.address]['health_check'] == 'up'
        revived = TcpBackend(lambda conn: (conn.sendall(b'A'), conn.recv(10)), port=a_port)
        proxy.wait_log(f'server {a.address} is up', timeout=5)
        wait_metric(admin, 'mpproxy_upstream_server_up', 2, **a_state)
        assert total(scrape(admin), 'mpproxy_upstream_server_check_up', **a_state) == 1
    finally:
        b.close()
        if revived:
            revived.close()


# -- /status -------------------------------------------------------------------------------

def test_status_describes_master_generations_and_workers(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(wait_workers=2)
    assert echo_roundtrip(port, b'hello') == b'hello'
    time.sleep(0.3)               # the test: 0.3 s of life, which every uptime must show
    code, content_type, body = get(admin, '/status')
    assert code == 200 and content_type == 'application/json'
    status = json.loads(body)
    from mpproxy import __version__
    assert status['version'] == __version__
    assert status['master']['pid'] == proxy.pid and status['master']['uptime'] >= 0.3
    assert status['config']['path'] == str(proxy.config_path)
    assert abs(status['config']['loaded'] - time.time()) < 60
    assert status['config']['generation'] == 1
    assert [(g['number'], g['state'], g['workers']) for g in status['generations']] == \
        [(1, 'active', 2)]
    assert sorted(w['pid'] for w in status['workers']) == sorted(proxy.workers())
    assert sorted(w['slot'] for w in status['workers']) == [0, 1]
    assert all(w['uptime'] >= 0.3 and w['ready'] and w['generation'] == 1
               for w in status['workers'])
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    wait_for(lambda: len(proxy.workers()) == 2, 10, what='the old generation to finish')

    def settled():      # the master has reaped the old workers too (their exit is async)
        status = json.loads(get(admin, '/status')[2])
        pids = sorted(w['pid'] for w in status['workers'])
        return status if pids == sorted(proxy.workers()) else None

    status = wait_for(settled, 5, what='/status to list only the new workers')
    assert {w['generation'] for w in status['workers']} == {2}
    assert status['config']['generation'] == 2
    listener = status['listeners'][0]
    assert (listener['name'], listener['protocol'], listener['accepted']) == \
        (f'127.0.0.1:{port}', 'tcp', 1)                    # the first generation's count too
    assert listener['received_bytes'] == 5


def test_http_errors_and_head(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(wait_workers=2)
    assert get(admin, '/nope')[0] == 404
    assert get(admin, '/metrics', method='POST')[0] == 405
    code, _, body = get(admin, '/metrics?x=1', method='HEAD')
    assert code == 200 and body == b''
    with socket.create_connection(('127.0.0.1', admin), timeout=5) as s:
        s.sendall(b'nonsense\r\n\r\n')
        assert s.recv(100).startswith(b'HTTP/1.0 400 ')
    with socket.create_connection(('127.0.0.1', admin), timeout=5) as s:
        s.sendall(b'GET /metrics HTTP/1.0\r\nX-Long: ' + b'a' * 9000)
        assert s.recv(100).startswith(b'HTTP/1.0 431 ')
    assert get(admin, '/status')[0] == 200


def test_slow_admin_client_blocks_neither_metrics_nor_reload(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(wait_workers=2)
    silent = socket.create_connection(('127.0.0.1', admin), timeout=10)   # sends nothing
    partial = socket.create_connection(('127.0.0.1', admin), timeout=10)
    partial.sendall(b'GET /metr')                                         # and never ends
    opened = time.monotonic()
    try:
        started = time.monotonic()
        assert get(admin, '/metrics', timeout=2)[0] == 200
        assert time.monotonic() - started < 3        # not after the slow ones' 5 s deadline
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active', timeout=5)
        assert echo_roundtrip(port, b'still') == b'still'
        assert silent.recv(10) == b''                  # closed at the read deadline (5 s)
        assert partial.recv(10) == b''
        assert 4 < time.monotonic() - opened < 8
    finally:
        silent.close()
        partial.close()
    assert get(admin, '/status')[0] == 200


def test_admin_connections_are_capped_and_the_rest_wait_in_the_backlog(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(wait_workers=2)
    base = fd_count(proxy.pid)
    silent = [socket.create_connection(('127.0.0.1', admin), timeout=10) for _ in range(20)]
    try:
        wait_for(lambda: fd_count(proxy.pid) >= base + 16, 5, what='16 admin connections taken')
        assert fd_count(proxy.pid) <= base + 16         # 16 served, the others wait
        proxy.signal(signal.SIGHUP)                     # the master is not held up
        proxy.wait_log('generation 2 active', timeout=5)
        started = time.monotonic()
        assert get(admin, '/metrics', timeout=15)[0] == 200    # once deadlines free slots
        assert 3 < time.monotonic() - started < 10
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: fd_count(proxy.pid) <= base, 10, what='the admin connections to close')


def test_admin_listen_follows_reload(proxies, tcp_echo):
    port, first, second = free_port(), free_port(), free_port()
    config = tcp_config(port, tcp_echo.address)
    proxy = proxies(with_admin(config, first)).start(wait_workers=2)
    assert get(first, '/status')[0] == 200
    proxy.write_config(with_admin(config, second))
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    assert get(second, '/status')[0] == 200
    wait_for(lambda: not listening_inodes(first), 5, what='the old admin port to close')
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    try:                                             # a port it cannot bind: nothing changes
        proxy.write_config(with_admin(config, taken.getsockname()[1]))
        proxy.signal(signal.SIGHUP)
        log = proxy.wait_log('reload failed')
        assert f'cannot bind admin 127.0.0.1:{taken.getsockname()[1]}' in log
        assert get(second, '/status')[0] == 200
    finally:
        taken.close()
    proxy.write_config(config)                       # admin removed: it stops listening
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 3 active')
    wait_for(lambda: not listening_inodes(second), 5, what='the admin port to close')


def test_admin_is_off_by_default(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    with open('/proc/net/tcp') as f:
        rows = [r.split() for r in f.read().splitlines()[1:]]
    listening = {r[9] for r in rows if r[3] == '0A'}
    with open('/proc/net/tcp6') as f:
        listening |= {r.split()[9] for r in f.read().splitlines()[1:] if r.split()[3] == '0A'}
    mine = socket_inodes(proxy.pid) & listening
    assert mine == listening_inodes(port)            # the listener, nothing else


def test_usr2_hands_the_admin_socket_to_the_new_master(proxies, tmp_path, tcp_echo):
    port, admin = free_port(), free_port()
    config = with_admin(upgrade_config(tmp_path, port, tcp_echo.address), admin)
    proxy = proxies(config).start(wait_workers=2)
    old = proxy.pid
    proxy.signal(signal.SIGUSR2)
    proxy.wait_log('mpproxy started', count=2, timeout=10)
    new = wait_for(lambda: [p for p in _masters(proxy.config_path) if p != old], 5,
                   what='the new master')[0]
    proxy.known_pids.add(new)
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait_exit(15) == 0
    status = json.loads(get(admin, '/status')[2])
    assert status['master']['pid'] == new
    os.kill(new, signal.SIGTERM)
    wait_for(lambda: not alive(new), 5, what='the new master to stop')


def _masters(config_path) -> list[int]:
    want = f'mpproxy: master -c {config_path}'
    return [int(p) for p in os.listdir('/proc') if p.isdigit() and cmdline(int(p)) == want]


# -- mpproxy status --------------------------------------------------------------------------

def test_status_command_prints_the_view(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(wait_workers=2)
    assert echo_roundtrip(port, b'x' * 2048) == b'x' * 2048
    wait_metric(admin, 'mpproxy_tcp_connections_accepted_total', 1)
    result = run_cli('-c', str(proxy.config_path), 'status')
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f'master pid {proxy.pid}' in out and str(proxy.config_path) in out
    assert 'generations: 1 active (2 workers)' in out
    for pid in proxy.workers():
        assert f' {pid} ' in out
    listener = next(l for l in out.splitlines() if l.startswith(f'127.0.0.1:{port}'))
    assert listener.split()[:5] == [f'127.0.0.1:{port}', 'tcp', f'127.0.0.1:{port}', '1', '0']
    assert '2.0 KiB' in listener
    assert any(l.split()[:3] == [f'127.0.0.1:{port}', tcp_echo.address, 'up']
               for l in out.splitlines())


def test_status_command_without_admin_or_proxy_fails_clearly(tmp_path, tcp_echo):
    path = tmp_path / 'c.yaml'
    path.write_text(f'listeners: [{{listen: "127.0.0.1:{free_port()}", '
                    f'upstream: ["{tcp_echo.address}"]}}]\n')
    result = run_cli('-c', str(path), 'status')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'status needs the admin endpoint' in result.stderr and str(path) in result.stderr
    admin = free_port()
    path.write_text(f'admin: {{listen: "127.0.0.1:{admin}"}}\n' + path.read_text())
    result = run_cli('-c', str(path), 'status')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert f'cannot get /status from 127.0.0.1:{admin}' in result.stderr
