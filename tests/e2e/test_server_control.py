"""Run-time server control (issue 15): `mpproxy server drain|maint|ready|weight` through the
master's admin endpoint, for every worker at once, kept across reloads and USR2; writes need
the bearer token of admin.token_file; slow_start ramps a server back in."""

from __future__ import annotations

import json
import signal
import time

import pytest

from helpers.admin import admin_config as config, put, server_status, tags
from helpers.backends import UdpEcho, tagged_backend
from helpers.configs import with_pid_file
from helpers.net import client, connect, free_port, get, roundtrip
from helpers.proc import run_cli, wait_for

def cli(proxy, *args):
    return run_cli('-c', str(proxy.config_path), 'server', *args)


def test_drain_takes_new_connections_away_and_keeps_the_open_ones(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(config(port, admin, [a.address, b.address], tmp_path)).start(wait_workers=2)
    held = []
    while not any(t == b'A' for t, _ in held):       # an open connection through A
        s = connect(port)
        held.append((s.recv(1), s))
    out = cli(proxy, 'drain', 'pool', a.address)
    assert out.returncode == 0, out.stderr
    assert 'drain' in out.stdout
    wait_for(lambda: tags(port, 10) == [b'B'] * 10, 3, what='new connections all to B')
    assert tags(port, 20) == [b'B'] * 20
    for t, s in held:                                 # the open ones go on
        s.sendall(b'still')
        assert s.recv(5) == b'still'
    assert server_status(admin, a.address)['admin_state'] == 'drain'
    metrics = get(admin, '/metrics')[2].decode()
    assert (f'mpproxy_upstream_server_admin_state{{upstream="pool",server="{a.address}",'
            f'state="drain"}} 1') in metrics
    shown = run_cli('-c', str(proxy.config_path), 'status')
    assert any(a.address in line and 'drain' in line for line in shown.stdout.splitlines())
    waited = cli(proxy, 'drain', 'pool', a.address, '--wait', '--timeout', '2.5')
    assert waited.returncode == 1 and 'still has 1 connection' in waited.stderr  # one is open
    for _, s in held:
        s.close()
    waited = cli(proxy, 'drain', 'pool', a.address, '--wait', '--timeout', '5')
    assert waited.returncode == 0, waited.stderr
    assert cli(proxy, 'ready', 'pool', a.address).returncode == 0
    wait_for(lambda: b'A' in tags(port, 10), 3, what='A back in rotation')
    assert 'server %s set to drain' % a.address in proxy.log()


def test_maint_ends_the_open_connections_after_the_grace(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(config(port, admin, [a.address, b.address], tmp_path)).start(wait_workers=2)
    held = None
    others = []
    while held is None:
        s = connect(port)
        if s.recv(1) == b'A':
            held = s
        else:
            others.append(s)
    out = cli(proxy, 'maint', 'pool', a.address, '--grace', '0.5')
    assert out.returncode == 0, out.stderr
    started = time.monotonic()
    held.settimeout(5)
    assert held.recv(10) == b''                   # ended by the proxy ...
    assert time.monotonic() - started >= 0.3      # ... after the grace, not at once
    for s in others:                              # B's connections go on
        s.sendall(b'ok')
        assert s.recv(2) == b'ok'
        s.close()
    held.close()
    assert tags(port, 10) == [b'B'] * 10
    proxy.wait_log('is in maintenance: ended')


def test_weight_changes_the_share_of_new_connections(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(config(port, admin, [a.address, b.address], tmp_path, workers=1))
    proxy.start(wait_workers=1)
    assert sorted(tags(port, 10)) == [b'A'] * 5 + [b'B'] * 5
    out = cli(proxy, 'weight', 'pool', a.address, '9')
    assert out.returncode == 0 and 'weight 9' in out.stdout, out.stderr
    wait_for(lambda: server_status(admin, a.address)['weight'] == 9, 3, what='weight 9 shown')
    wait_for(lambda: tags(port, 10).count(b'A') == 9, 3, what='weight 9 in effect')
    got = tags(port, 100)
    assert got.count(b'A') == 90, got.count(b'A')


def test_writes_need_the_token_and_bad_requests_change_nothing(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(config(port, admin, [a.address, b.address], tmp_path)).start(wait_workers=2)
    path = f'/servers/pool/{a.address}'
    assert put(admin, path, {'state': 'drain'}, token=None)[0] == 401
    assert put(admin, path, {'state': 'drain'}, token='wrong')[0] == 401
    assert put(admin, '/servers/nope/' + a.address, {'state': 'drain'})[0] == 404
    assert put(admin, '/servers/pool/127.0.0.1:1', {'state': 'drain'})[0] == 404
    assert put(admin, path, {'weight': 0})[0] == 400
    assert put(admin, path, {'state': 'sleeping'})[0] == 400
    assert put(admin, path, None, raw=b'not json')[0] == 400
    assert put(admin, path, None, raw=b'x' * 5000)[0] == 413
    assert server_status(admin, a.address)['admin_state'] == 'ready'
    assert sorted(set(tags(port, 6))) == [b'A', b'B']
    status, body = put(admin, path, {'state': 'drain'})
    assert status == 200 and json.loads(body)['state'] == 'drain'
    assert 'refused: no bearer token' in proxy.log()


def test_without_a_token_file_the_endpoint_is_read_only(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(config(port, admin, [a.address, b.address], tmp_path, token=False))
    proxy.start(wait_workers=2)
    assert put(admin, f'/servers/pool/{a.address}', {'state': 'drain'})[0] == 403
    out = cli(proxy, 'drain', 'pool', a.address)
    assert out.returncode == 1 and '403' in out.stderr
    assert 'read-only' in proxy.log()
    assert get(admin, '/status')[0] == 200


def test_the_state_survives_a_reload_and_a_binary_upgrade(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    cfg = with_pid_file(config(port, admin, [a.address, b.address], tmp_path), str(pid_file))
    proxy = proxies(cfg).start(wait_workers=2)
    assert cli(proxy, 'drain', 'pool', a.address).returncode == 0
    wait_for(lambda: tags(port, 10) == [b'B'] * 10, 3, what='A drained')
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    assert tags(port, 20) == [b'B'] * 20
    assert server_status(admin, a.address)['admin_state'] == 'drain'
    new = proxy.upgrade(pid_file)
    try:
        proxy.signal(signal.SIGQUIT)
        assert proxy.wait_exit(40) == 0
        assert tags(port, 20) == [b'B'] * 20
        assert server_status(admin, a.address)['admin_state'] == 'drain'
    finally:
        proxy.stop_master(new)


def test_a_drained_udp_server_gets_no_new_session_and_keeps_its_own(proxies, tmp_path):
    a, b = UdpEcho(prefix=b'A'), UdpEcho(prefix=b'B')
    try:
        port, admin = free_port(), free_port()
        cfg = config(port, admin, [a.address, b.address], tmp_path, workers=1)
        cfg['listeners'][0]['protocol'] = 'udp'
        proxy = proxies(cfg).start(wait_workers=1)
        clients = []
        for _ in range(4):
            c = client(timeout=2)
            c.sendto(b'x', ('127.0.0.1', port))
            clients.append((c, c.recv(10)[:1]))
        assert {t for _, t in clients} == {b'A', b'B'}
        assert cli(proxy, 'drain', 'pool', a.address).returncode == 0
        probes = []             # kept open to the end: a port of a closed one could come
                                # again and find its session, which may be A's

        def new_session_tag():
            probes.append(client())
            return roundtrip(probes[-1], b'z', ('127.0.0.1', port))[0][:1]
        wait_for(lambda: [new_session_tag() for _ in range(4)] == [b'B'] * 4, 3,
                 what='A drained for new sessions')
        for c, t in clients:                          # existing sessions keep their server
            c.sendto(b'y', ('127.0.0.1', port))
            assert c.recv(10)[:1] == t
        for _ in range(6):                            # new ones avoid A
            c = client(timeout=2)
            probes.append(c)
            c.sendto(b'z', ('127.0.0.1', port))
            assert c.recv(10)[:1] == b'B'
        for c in [c for c, _ in clients] + probes:
            c.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize('balance', ['round_robin', 'least_conn', 'random_two'])
def test_slow_start_ramps_a_server_back_in(proxies, tmp_path, pair, balance):
    a, b = pair
    port, admin = free_port(), free_port()
    servers = [{'address': a.address, 'slow_start': '4s'}, b.address]
    proxy = proxies(config(port, admin, servers, tmp_path, workers=1, balance=balance))
    proxy.start(wait_workers=1)
    assert cli(proxy, 'drain', 'pool', a.address).returncode == 0
    wait_for(lambda: tags(port, 10) == [b'B'] * 10, 3, what='A drained')
    assert cli(proxy, 'ready', 'pool', a.address).returncode == 0
    assert_ramps_back(port)


def held_tags(port: int, n: int) -> list[bytes]:
    """The tags of `n` connections open at once (least_conn and random_two weigh the open
    connections by weight, so their share follows the weights only when they overlap)."""
    socks = [connect(port) for _ in range(n)]
    try:
        return [s.recv(1) for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize('balance', ['least_conn', 'hash', 'random_two'])
def test_drain_works_with_every_balancer(proxies, tmp_path, pair, balance):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(config(port, admin, [a.address, b.address], tmp_path, workers=1,
                           balance=balance, hash_key='client_addr')).start(wait_workers=1)
    wait_for(lambda: b'A' in tags(port, 10), 3, what='A picked before the drain')
    assert cli(proxy, 'drain', 'pool', a.address).returncode == 0
    wait_for(lambda: tags(port, 10) == [b'B'] * 10, 3, what='new connections all to B')
    assert tags(port, 30) == [b'B'] * 30


def test_health_checks_never_undrain_and_a_drained_server_is_no_last_resort(proxies, tmp_path,
                                                                              pair):
    a, b = pair
    port, admin = free_port(), free_port()
    cfg = config(port, admin, [a.address, b.address], tmp_path, workers=1,
                 health_check={'interval': '0.1s', 'timeout': '0.5s', 'rise': 1, 'fall': 1})
    proxy = proxies(cfg).start(wait_workers=1)
    assert cli(proxy, 'drain', 'pool', a.address).returncode == 0
    wait_for(lambda: tags(port, 10) == [b'B'] * 10, 3, what='A drained')
    checked = len(a.peers)                        # health checks connect to A: five more
    wait_for(lambda: len(a.peers) >= checked + 5, 5, what='five health checks of A')
    assert tags(port, 20) == [b'B'] * 20
    assert server_status(admin, a.address)['health_check'] == 'up'
    b.close()                                     # the only server in rotation goes down
    proxy.wait_log(f'server {b.address} is down', timeout=5)
    for _ in range(5):                            # A is not tried as a last resort
        with connect(port) as s:
            s.settimeout(5)
            assert s.recv(1) == b''
    assert cli(proxy, 'ready', 'pool', a.address).returncode == 0
    wait_for(lambda: tags(port, 1) == [b'A'], 3, what='A serves once ready')


def test_slow_start_after_a_health_check_brings_a_server_back(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    cfg = config(port, admin, [a.address, b.address], tmp_path, workers=1, slow_start='4s',
                 health_check={'interval': '0.1s', 'timeout': '0.5s', 'rise': 1, 'fall': 1})
    proxy = proxies(cfg).start(wait_workers=1)
    a_port = a.port
    a.close()                                          # A fails its checks ...
    proxy.wait_log(f'server {a.address} is down', timeout=5)
    wait_for(lambda: held_tags(port, 10) == [b'B'] * 10, 3, what='A out of rotation')
    again = tagged_backend(b'A', a_port)               # ... and comes back
    try:
        proxy.wait_log(f'server {a.address} is up', timeout=5)
        assert_ramps_back(port)
    finally:
        again.close()


def assert_ramps_back(port: int) -> None:
    """Server A, just back, gets a small share of 60 overlapping connections at first (an
    even share is 30), then about its full share."""
    wait_for(lambda: b'A' in held_tags(port, 40), 4, what='A picked again')
    early = held_tags(port, 60).count(b'A')
    wait_for(lambda: held_tags(port, 60).count(b'A') >= 24, 10, what='A at its full share')
    assert early < 20, early



def test_slow_start_after_passive_health_lets_a_server_back(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    servers = [{'address': a.address, 'max_fails': 1, 'fail_timeout': '1s'}, b.address]
    proxy = proxies(config(port, admin, servers, tmp_path, workers=1, slow_start='4s'))
    proxy.start(wait_workers=1)
    a_port = a.port
    a.close()
    def a_down():
        held_tags(port, 4)            # connections that try A, fail, and go on to B
        return f'server {a.address} is down for 1s' in proxy.log()
    wait_for(a_down, 3, what='A down by passive health')
    again = tagged_backend(b'A', a_port)
    try:
        assert_ramps_back(port)
    finally:
        again.close()


def test_the_admin_unix_socket_allows_changes_by_its_file_mode(proxies, tmp_path, pair):
    import os
    import stat
    a, b = pair
    port, admin = free_port(), free_port()
    cfg = config(port, admin, [a.address, b.address], tmp_path, token=False)
    path = str(tmp_path / 'admin.sock')
    cfg['admin']['socket'] = path
    proxy = proxies(cfg).start(wait_workers=2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert put(admin, f'/servers/pool/{a.address}', {'state': 'drain'})[0] == 403   # TCP
    out = cli(proxy, 'drain', 'pool', a.address)      # no token: over the socket
    assert out.returncode == 0, out.stderr
    wait_for(lambda: tags(port, 10) == [b'B'] * 10, 3, what='A drained')
    assert server_status(admin, a.address)['admin_state'] == 'drain'


def test_maint_ends_the_udp_sessions_of_the_server_after_the_grace(proxies, tmp_path):
    a, b = UdpEcho(prefix=b'A'), UdpEcho(prefix=b'B')
    clients = []
    try:
        port, admin = free_port(), free_port()
        cfg = config(port, admin, [a.address, b.address], tmp_path, workers=1)
        cfg['listeners'][0]['protocol'] = 'udp'
        proxy = proxies(cfg).start(wait_workers=1)
        for _ in range(4):
            c = client(timeout=2)
            c.sendto(b'x', ('127.0.0.1', port))
            clients.append((c, c.recv(10)[:1]))
        on_a = [c for c, t in clients if t == b'A']
        assert on_a
        assert cli(proxy, 'maint', 'pool', a.address, '--grace', '0.3').returncode == 0
        proxy.wait_log('is in maintenance: ended', timeout=5)
        for c in on_a:            # their session ended: the next datagram makes one with B
            c.sendto(b'y', ('127.0.0.1', port))
            assert c.recv(10)[:1] == b'B'
    finally:
        for c, _ in clients:
            c.close()
        a.close()
        b.close()
