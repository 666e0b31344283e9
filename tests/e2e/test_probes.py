"""/healthz and /readyz on the admin listener, for orchestrators and load balancers.

/healthz: the master is up and every worker slot has a live worker with a recent heartbeat.
/readyz: the listeners are served and the master is not draining (503 from QUIT on, while
the connections already open still drain), so a load balancer stops sending first.
"""

from __future__ import annotations

import os
import signal
import socket

from helpers.configs import tcp_config, with_admin, with_keys
from helpers.net import free_port, get, status_code
from helpers.proc import wait_for


def test_healthz_fails_while_a_worker_is_stuck_and_recovers_when_it_is_replaced(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    config = with_keys(with_admin(tcp_config(port, tcp_echo.address), admin),
                       worker_timeout='5s')
    proxy = proxies(config).start(wait_workers=2)
    assert status_code(admin, '/healthz') == 200 and status_code(admin, '/readyz') == 200
    stuck = proxy.workers()[0]
    proxy.known_pids.add(stuck)
    try:
        os.kill(stuck, signal.SIGSTOP)                # its loop stops: no more heartbeats
        status = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(admin, '/healthz')),
                          6, what='/healthz to fail')
        assert b'gave no heartbeat' in status[2] and str(stuck).encode() in status[2]
        assert get(admin, '/readyz')[0] == 200       # the other worker still serves
        # worker_timeout: the master kills the stuck worker and forks a new one
        wait_for(lambda: stuck not in proxy.workers() and len(proxy.serving_workers()) == 2,
                 15, what='the stuck worker replaced')
        wait_for(lambda: status_code(admin, '/healthz') == 200, 5, what='/healthz to recover')
    finally:
        try:
            os.kill(stuck, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_readyz_fails_once_quit_starts_while_connections_drain(proxies, tcp_echo):
    port, admin = free_port(), free_port()
    proxy = proxies(with_admin(tcp_config(port, tcp_echo.address), admin)).start(
        wait_workers=2)
    assert status_code(admin, '/readyz') == 200
    held = socket.create_connection(('127.0.0.1', port), timeout=5)   # keeps the drain going
    try:
        held.sendall(b'x')
        assert held.recv(1) == b'x'
        proxy.signal(signal.SIGQUIT)
        wait_for(lambda: status_code(admin, '/readyz') == 503, 5, what='/readyz to fail at QUIT')
        status, _, body = get(admin, '/readyz')
        assert body == b'not ready: draining\n'
        assert status_code(admin, '/healthz') == 200            # draining is healthy, not dead
        held.sendall(b'still here')                      # the open connection drains on
        assert held.recv(100) == b'still here'
    finally:
        held.close()
    assert proxy.wait_exit(10) == 0
