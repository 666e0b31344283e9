"""Signals and the process model: reload, graceful and fast stop, respawn, master death."""

from __future__ import annotations

import os
import signal
import socket
import time

from helpers.backends import tagged_backend
from helpers.configs import listener, tcp_config, udp_config, with_keys
from helpers.faults import refuses
from helpers.net import connect, echo_roundtrip, first_bytes, free_port, port_free, recv_all
from helpers.proc import alive, cmdline, fd_count, listening_inodes, socket_inodes, wait_for


def test_process_titles(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=2)).start(wait_workers=2)
    assert cmdline(proxy.pid) == f'mpproxy: master -c {proxy.config_path}'
    titles = sorted(cmdline(pid) for pid in proxy.workers())
    assert titles == ['mpproxy: worker 0 (generation 1)', 'mpproxy: worker 1 (generation 1)']


def test_hup_with_good_config_switches_upstream_for_new_connections(proxies):
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    try:
        port = free_port()
        proxy = proxies(tcp_config(port, a.address)).start(wait_workers=2)
        old_workers = set(proxy.workers())
        assert first_bytes(port, 1) == b'A'
        held = connect(port)                   # an open connection on the old generation
        assert held.recv(1) == b'A'
        proxy.write_config(tcp_config(port, b.address))
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active')
        assert all(first_bytes(port, 1) == b'B' for _ in range(20))
        new_workers = set(proxy.serving_workers())
        assert new_workers and not new_workers & old_workers
        held.sendall(b'still here')            # the old generation keeps serving it
        assert held.recv(100) == b'still here'
        held.close()
        wait_for(lambda: not any(alive(p) for p in old_workers), 5, what='old workers to exit')
    finally:
        a.close()
        b.close()


def test_hup_with_bad_config_changes_nothing(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    workers = sorted(proxy.workers())
    proxy.write_config('workers: 2\nlisteners: [{listen: "127.0.0.1:99999"}]\n')
    proxy.signal(signal.SIGHUP)
    log = proxy.wait_log('reload failed')
    errors = [line for line in log.splitlines() if 'reload failed' in line]
    assert len(errors) == 1 and 'port must be 1-65535' in errors[0], errors
    assert 'Traceback' not in log
    assert echo_roundtrip(port, b'still served') == b'still served'
    assert sorted(proxy.workers()) == workers


def test_hup_that_cannot_bind_keeps_old_generation(proxies, tcp_echo):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    try:
        port = free_port()
        proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
        busy = taken.getsockname()[1]
        config = tcp_config(port, tcp_echo.address)
        config['listeners'].append(listener(busy, [tcp_echo.address]))
        proxy.write_config(config)
        proxy.signal(signal.SIGHUP)
        log = proxy.wait_log('reload failed')
        assert f'cannot bind tcp 127.0.0.1:{busy}' in log
        assert echo_roundtrip(port, b'ok') == b'ok'
        assert 'generation 2' not in log
    finally:
        taken.close()


def test_unchanged_listener_keeps_its_socket_across_reload(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    before = listening_inodes(port)
    assert len(before) == 1 and before <= socket_inodes(proxy.pid)
    proxy.write_config(tcp_config(port, tcp_echo.address, extra={'idle_timeout': '5m'}))
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    assert listening_inodes(port) == before
    assert before <= socket_inodes(proxy.pid)
    assert echo_roundtrip(port, b'same socket') == b'same socket'


def test_quit_drains_open_connection_then_exits_zero(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    held = connect(port)
    held.sendall(b'before')
    assert held.recv(100) == b'before'
    proxy.signal(signal.SIGQUIT)
    proxy.wait_log('graceful shutdown')
    # new connections are refused (RST to the SYN, not queued for nobody) once the master
    # and the workers closed their listening sockets
    wait_for(lambda: refuses(port), 5, what='new connections refused')
    assert proxy.proc.poll() is None, 'master exited while a connection was open'
    held.sendall(b'during drain')
    assert held.recv(100) == b'during drain'
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b''
    held.close()
    assert proxy.wait_exit(10) == 0


def test_quit_closes_connections_at_shutdown_timeout(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(with_keys(tcp_config(port, tcp_echo.address, workers=1),
                              shutdown_timeout='500ms')).start(wait_workers=1)
    held = connect(port)
    held.sendall(b'x')
    assert held.recv(1) == b'x'
    start = time.monotonic()
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait_exit(10) == 0
    assert time.monotonic() - start < 4
    try:
        assert held.recv(1) == b''
    except ConnectionResetError:
        pass
    held.close()


def test_term_exits_fast(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    workers = proxy.workers()
    held = connect(port)
    held.sendall(b'x')
    assert held.recv(1) == b'x'
    start = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit(5) == 0
    assert time.monotonic() - start < 1.5
    wait_for(lambda: not any(alive(p) for p in workers), 2, what='workers gone')
    held.close()


def test_killed_worker_is_replaced_and_clients_keep_being_served(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    victim = proxy.workers()[0]
    victim_title = cmdline(victim)
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    def replaced():
        serving = proxy.serving_workers()      # one snapshot: the victim may still show briefly
        return len(serving) == 2 and victim not in serving
    wait_for(replaced, 3, what='the worker to be replaced')
    assert time.monotonic() - start < 1.5
    assert victim_title in {cmdline(p) for p in proxy.workers()}   # same slot, same generation
    for _ in range(50):
        assert echo_roundtrip(port, b'served') == b'served'
    assert 'unexpectedly' in proxy.log()


def test_worker_that_keeps_dying_is_respawned_with_backoff(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=1)).start(wait_workers=1)
    kills = 0
    deadline = time.monotonic() + 4
    seen = set()
    while time.monotonic() < deadline:
        for pid in proxy.workers():
            if pid not in seen:
                seen.add(pid)
                os.kill(pid, signal.SIGKILL)
                kills += 1
        time.sleep(0.02)  # polling interval of this kill loop
    # with back-off (0, 0.5, 1, 2 s ...) only a handful of workers can have been started
    assert 3 <= kills <= 6, kills
    assert 'keeps dying' in proxy.log()


def test_workers_exit_when_master_is_killed(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address)).start(wait_workers=2)
    workers = proxy.workers()
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.proc.wait(5)
    wait_for(lambda: not any(alive(p) for p in workers), 3, what='workers to exit')
    wait_for(lambda: port_free(port), 3, what='the port to be free')   # nothing keeps it


def test_hup_storm_bounds_draining_generations(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(with_keys(tcp_config(port, tcp_echo.address, workers=1),
                              max_draining_generations=2)).start(wait_workers=1)
    base_fds = fd_count(proxy.pid)
    held = []
    for i in range(8):
        sock = connect(port)
        sock.sendall(b'x')
        assert sock.recv(1) == b'x'
        held.append(sock)
        proxy.signal(signal.SIGHUP)
        proxy.wait_log(f'generation {i + 2} active')
    wait_for(lambda: len(proxy.workers()) <= 1 + 2, 5, what='at most 2 draining generations')
    for sock in held:
        sock.close()
    wait_for(lambda: len(proxy.workers()) == 1, 5, what='draining generations to finish')
    wait_for(lambda: fd_count(proxy.pid) <= base_fds, 5, what='master fds back to baseline')
    assert 'too many draining generations' in proxy.log()


def test_stuck_worker_is_killed_and_replaced(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(with_keys(tcp_config(port, tcp_echo.address, workers=1),
                              worker_timeout='1s')).start(wait_workers=1)
    stuck = proxy.workers()[0]
    os.kill(stuck, signal.SIGSTOP)            # its event loop stops turning
    try:
        proxy.wait_log('gave no heartbeat', timeout=5)
        wait_for(lambda: (lambda w: w and stuck not in w)(proxy.serving_workers()), 5,
                 what='a replacement worker')
    finally:
        if alive(stuck):
            os.kill(stuck, signal.SIGKILL)
    assert echo_roundtrip(port, b'unstuck') == b'unstuck'


def test_reload_adds_and_removes_listeners(proxies, tcp_echo):
    kept, removed, added = free_port(), free_port(), free_port()

    def config(*ports):
        return {'workers': 2, 'listeners': [listener(p, [tcp_echo.address]) for p in ports]}

    proxy = proxies(config(kept, removed)).start(wait_workers=2)
    held = connect(removed)                    # a connection on the listener that goes away
    held.sendall(b'x')
    assert held.recv(1) == b'x'
    proxy.write_config(config(kept, added))
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    assert echo_roundtrip(added, b'new listener') == b'new listener'
    assert echo_roundtrip(kept, b'kept listener') == b'kept listener'
    try:                                       # the removed one refuses new connections at once
        with socket.create_connection(('127.0.0.1', removed), timeout=2) as s:
            s.sendall(b'y')
            assert s.recv(1) == b''
    except (ConnectionRefusedError, ConnectionResetError):
        pass
    held.sendall(b'still')                     # while its open connection is still served
    assert held.recv(10) == b'still'
    held.close()
    wait_for(lambda: port_free(removed), 5, what='the removed port to be released')


def test_reload_changing_workers_steers_udp_flows_without_a_rehash_warning(proxies, udp_echo):
    port = free_port()
    proxy = proxies(udp_config(port, udp_echo.address, workers=2)).start(wait_workers=2)
    proxy.write_config(udp_config(port, udp_echo.address, workers=3))
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    assert 'UDP flows re-hash' not in proxy.log()     # steered: see test_udp_handover.py
    wait_for(lambda: len(proxy.workers()) == 3, 5, what='3 workers')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.settimeout(2)
        c.sendto(b'after', ('127.0.0.1', port))
        assert c.recvfrom(100)[0] == b'after'
