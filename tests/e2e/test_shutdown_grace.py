"""QUIT with `shutdown_grace` (HAProxy's `grace`): /readyz fails at once while the listeners
go on accepting TCP and reading UDP for that long, then the drain starts as without a grace,
its `shutdown_timeout` counted from the end of the grace. TERM still stops at once, a
second QUIT cuts the grace short, HUP is refused, and a binary upgrade's QUIT to the old
master skips it (the new master serves on the same sockets).
"""

from __future__ import annotations

import json
import signal
import socket

from helpers.configs import listener, upgrade_config, with_admin, with_keys
from helpers.net import client, connect, echo_roundtrip, free_port, get, roundtrip, status_code
from helpers.proc import alive, run_cli, wait_for


def grace_config(port: int, admin: int, tcp_up: str, udp_up: str, **keys) -> dict:
    """TCP and UDP on 127.0.0.1:`port` in front of two echo backends, admin on `admin`."""
    config = {'workers': 2, 'listeners': [listener(port, [tcp_up]),
                                          listener(port, [udp_up], 'udp')]}
    return with_keys(with_admin(config, admin), **keys)


def served(port: int) -> bool:
    """A new TCP connection to `port` is accepted and relayed (an echo comes back)."""
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=1) as s:
            s.sendall(b'x')
            return s.recv(1) == b'x'
    except OSError:
        return False


def udp_answered(port: int, payload: bytes, timeout: float = 2.0) -> bool:
    """A datagram from a new client (a new session) to `port` gets its echo."""
    with client(timeout=timeout) as sock:
        try:
            return roundtrip(sock, payload, ('127.0.0.1', port))[0] == payload
        except OSError:
            return False


def held_connection(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b'held')
    assert sock.recv(100) == b'held'
    return sock


def test_grace_keeps_accepting_tcp_and_udp_while_readyz_fails_then_drains(
        proxies, tcp_echo, udp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(grace_config(port, admin, tcp_echo.address, udp_echo.address,
                                 shutdown_grace='5s', shutdown_timeout='3s')).start(wait_workers=2)
    workers = sorted(proxy.workers())
    assert status_code(admin, '/readyz') == 200
    held = held_connection(port)
    try:
        proxy.signal(signal.SIGQUIT)
        wait_for(lambda: status_code(admin, '/readyz') == 503, 2, what='/readyz to fail at QUIT')
        status, _, body = get(admin, '/readyz')
        assert body.startswith(b'not ready: stopping (shutdown_grace), draining in '), body
        assert status_code(admin, '/healthz') == 200
        master = json.loads(get(admin, '/status')[2])['master']
        assert master['state'] == 'grace' and 0 < master['grace_left'] <= 5, master
        # The grace: new clients are still accepted and relayed, by the same workers.
        assert echo_roundtrip(port, b'new in the grace') == b'new in the grace'
        assert udp_answered(port, b'new udp client in the grace')
        held.sendall(b'held on')
        assert held.recv(100) == b'held on'
        assert sorted(proxy.serving_workers()) == workers     # not draining yet
        log = proxy.log()
        assert 'graceful shutdown (QUIT): /readyz fails now; the listeners accept for 5s more ' \
               '(shutdown_grace), then drain for up to 3s' in log
        assert 'shutdown_grace over' not in log, 'the checks above ran after the grace'
        # Then the drain, as without a grace: new clients are not served any more ...
        proxy.wait_log('shutdown_grace over: draining for up to 3s', timeout=10)
        wait_for(lambda: not served(port), 3, what='new TCP connections refused')
        assert not udp_answered(port, b'after the grace', timeout=0.5)
        assert get(admin, '/readyz')[2] == b'not ready: draining\n'
        # ... while the open connection goes on: shutdown_timeout (3s) counts from the end
        # of the grace (5s), not from QUIT.
        held.sendall(b'still here')
        assert held.recv(100) == b'still here'
        assert proxy.proc.poll() is None
    finally:
        held.close()
    assert proxy.wait_exit(10) == 0


def test_term_during_the_grace_stops_at_once(proxies, tcp_echo, udp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(grace_config(port, admin, tcp_echo.address, udp_echo.address,
                                 shutdown_grace='60s')).start(wait_workers=2)
    workers = proxy.workers()
    held = held_connection(port)
    try:
        proxy.signal(signal.SIGQUIT)
        wait_for(lambda: status_code(admin, '/readyz') == 503, 2, what='/readyz to fail at QUIT')
        assert served(port)                                   # in the grace
        view = run_cli('-c', str(proxy.config_path), 'status')
        assert 'stopping: shutdown_grace, draining in ' in view.stdout, view
        proxy.signal(signal.SIGTERM)
        assert proxy.wait_exit(5) == 0                        # not 60 s of grace
        wait_for(lambda: not any(alive(p) for p in workers), 3, what='the workers gone')
        assert 'fast shutdown' in proxy.log() and 'shutdown_grace over' not in proxy.log()
    finally:
        held.close()


def test_second_quit_cuts_the_grace_short(proxies, tcp_echo, udp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(grace_config(port, admin, tcp_echo.address, udp_echo.address,
                                 shutdown_grace='60s')).start(wait_workers=2)
    held = held_connection(port)
    try:
        proxy.signal(signal.SIGQUIT)
        wait_for(lambda: status_code(admin, '/readyz') == 503, 2, what='/readyz to fail at QUIT')
        assert served(port)
        proxy.signal(signal.SIGQUIT)
        proxy.wait_log('second QUIT: shutdown_grace cut short, draining for up to 30s')
        wait_for(lambda: not served(port), 5, what='new TCP connections refused')
        held.sendall(b'drains on')                            # a drain, not a stop
        assert held.recv(100) == b'drains on'
    finally:
        held.close()
    assert proxy.wait_exit(10) == 0


def test_reload_is_refused_during_the_grace(proxies, tmp_path, tcp_echo, udp_echo):
    port, admin = free_port(), free_port()
    config = grace_config(port, admin, tcp_echo.address, udp_echo.address,
                          shutdown_grace='60s', pid_file=str(tmp_path / 'mpproxy.pid'))
    proxy = proxies(config).start(wait_workers=2)
    proxy.signal(signal.SIGQUIT)
    wait_for(lambda: status_code(admin, '/readyz') == 503, 2, what='/readyz to fail at QUIT')
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('reload refused: the master is stopping')
    result = run_cli('-s', 'reload', '-c', str(proxy.config_path))
    assert result.returncode == 1
    assert 'the master is stopping; no reload' in result.stdout + result.stderr, result
    assert 'generation 2' not in proxy.log() and 'reloading' not in proxy.log()
    assert served(port) and status_code(admin, '/readyz') == 503     # the grace goes on
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit(5) == 0


def test_shutdown_grace_zero_drains_at_quit_as_before(proxies, tcp_echo, udp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(grace_config(port, admin, tcp_echo.address, udp_echo.address,
                                 shutdown_grace=0)).start(wait_workers=2)
    held = held_connection(port)
    try:
        proxy.signal(signal.SIGQUIT)
        proxy.wait_log('graceful shutdown (QUIT): draining for up to 30s')
        wait_for(lambda: not served(port), 5, what='new TCP connections refused')
        assert get(admin, '/readyz')[2] == b'not ready: draining\n'
        held.sendall(b'drains on')
        assert held.recv(100) == b'drains on'
        assert 'shutdown_grace' not in proxy.log()
    finally:
        held.close()
    assert proxy.wait_exit(10) == 0


def test_binary_upgrade_quit_to_the_old_master_skips_the_grace(proxies, tmp_path, tcp_echo):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    config = with_keys(upgrade_config(tmp_path, port, tcp_echo.address), shutdown_grace='60s')
    proxy = proxies(config).start(wait_workers=2)
    new = None
    try:
        new = proxy.upgrade(pid_file, workers=2)
        proxy.signal(signal.SIGQUIT)                # the operator retires the old master
        assert proxy.wait_exit(10) == 0             # at once, not after 60 s of grace
        assert f'(no shutdown_grace: master pid {new} of the binary upgrade serves)' \
            in proxy.log()
        assert echo_roundtrip(port, b'new master') == b'new master'
    finally:
        proxy.stop_master(new, signal.SIGTERM, 5)
