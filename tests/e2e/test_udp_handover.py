"""UDP sessions cross a binary upgrade and a change of the number of workers (issue 17).

50 clients, each sending every 10 ms from its own port, through mpproxy to an echo backend
that names in each reply the upstream source port (the session) it came from. Every client
must get every reply, all through one upstream port from start to end.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from types import SimpleNamespace

import pytest

from helpers.backends import UdpEcho
from helpers.configs import udp_config, with_pid_file
from helpers.net import UdpFleet, client, free_port, get, metric_total
from helpers.proc import Proxy, alive, read_pid, wait_for, workers_of
from mpproxy.shared.steer import slot_of

CLIENTS = 50


def assert_kept(fleet: UdpFleet) -> None:
    lost = fleet.lost()
    assert sum(lost) == 0, f'{sum(lost)} datagram(s) unanswered: {lost}'
    moved = [sorted(p) for p in fleet.ports() if len(p) != 1]
    assert not moved, f'{len(moved)} client(s) moved to a new upstream port: {moved[:5]}'


def config(port: int, backend, workers: int, admin: int | None = None, **extra) -> dict:
    cfg = udp_config(port, backend.address, workers=workers, extra=extra or None)
    if admin is not None:
        cfg['admin'] = {'listen': f'127.0.0.1:{admin}'}
    return cfg


def reload_keeps_sessions(proxies, before: int, after: int) -> None:
    backend = UdpEcho(tag_source=True)
    fleet = None
    try:
        port, admin = free_port(), free_port()
        proxy = proxies(config(port, backend, before, admin)).start(wait_workers=before)
        fleet = UdpFleet(port, CLIENTS)
        wait_for(lambda: fleet.answered(5), 10, what='every client answered')
        proxy.write_config(config(port, backend, after, admin))
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active', timeout=10)
        replies_after(fleet, 30, 'after the reload')
        wait_for(lambda: len(proxy.serving_workers()) == after, 10, what='the old workers gone')
        fleet.finish()
        assert_kept(fleet)
        wait_for(lambda: metric_total(admin, 'mpproxy_udp_sessions_adopted_total') >= CLIENTS, 5,
                 what='the adopted sessions in /metrics')
        assert 'could not be sent' not in proxy.log()
    finally:
        if fleet is not None:
            fleet.finish()
        backend.close()


def test_reload_from_two_workers_to_one_keeps_every_udp_session(proxies):
    reload_keeps_sessions(proxies, 2, 1)


def test_reload_from_one_worker_to_three_keeps_every_udp_session(proxies):
    reload_keeps_sessions(proxies, 1, 3)


def test_reload_from_three_workers_to_two_keeps_every_udp_session(proxies):
    reload_keeps_sessions(proxies, 3, 2)


@contextlib.contextmanager
def upgrade_scene(proxies, tmp_path, workers: int, admin: int | None = None):
    """A proxy with `workers` workers and a pid file, the fleet answered through it; the new
    master of an upgrade (`scene.new`) is stopped at the end if it still runs."""
    backend = UdpEcho(tag_source=True)
    scene = SimpleNamespace(new=None, fleet=None, pid_file=tmp_path / 'mpproxy.pid')
    try:
        port = free_port()
        scene.port = port
        scene.config = lambda n: with_pid_file(config(port, backend, n, admin), str(scene.pid_file))
        scene.proxy = proxies(scene.config(workers)).start(wait_workers=workers)
        scene.fleet = UdpFleet(port, CLIENTS)
        wait_for(lambda: scene.fleet.answered(5), 10, what='every client answered')
        yield scene
    finally:
        if scene.fleet is not None:
            scene.fleet.finish()
        backend.close()
        Proxy.stop_master(scene.new)


def replies_after(fleet: UdpFleet, n: int, what: str) -> None:
    sent = list(fleet.sent)
    wait_for(lambda: all(len(r) >= s + n for r, s in zip(fleet.replies, sent)), 10,
             what=f'{n} replies each {what}')


def quit_old_master(scene) -> None:
    """QUIT to the old master; the new one serves every client, each on its old session."""
    scene.proxy.signal(signal.SIGQUIT)
    assert scene.proxy.wait_exit(40) == 0
    replies_after(scene.fleet, 30, 'from the new master')
    scene.fleet.finish()
    assert_kept(scene.fleet)


def test_udp_sessions_follow_a_binary_upgrade(proxies, tmp_path):
    admin = free_port()
    with upgrade_scene(proxies, tmp_path, 2, admin) as scene:
        scene.new = scene.proxy.upgrade(scene.pid_file)
        replies_after(scene.fleet, 20, 'after USR2')   # the old master serves UDP alone
        quit_old_master(scene)
        wait_for(lambda: metric_total(admin, 'mpproxy_udp_sessions_adopted_total') >= CLIENTS, 5,
                 what='the adopted sessions in /metrics of the new master')
        handed = re.findall(r'handed (\d+) UDP session', scene.proxy.log())
        assert sum(int(n) for n in handed) >= CLIENTS, scene.proxy.log()[-3000:]


@pytest.mark.parametrize('before, after', [(1, 3), (3, 2)])
def test_udp_sessions_follow_an_upgrade_that_changes_the_worker_count(proxies, tmp_path,
                                                                       before, after):
    with upgrade_scene(proxies, tmp_path, before) as scene:
        scene.proxy.write_config(scene.config(after))
        scene.new = scene.proxy.upgrade(scene.pid_file)
        quit_old_master(scene)


def test_a_backed_out_upgrade_keeps_every_session_on_the_old_master(proxies, tmp_path):
    with upgrade_scene(proxies, tmp_path, 2) as scene:
        scene.new = scene.proxy.upgrade(scene.pid_file)
        os.kill(scene.new, signal.SIGKILL)     # backed out: the new master dies before QUIT
        scene.proxy.wait_log('binary upgrade failed', timeout=10)
        replies_after(scene.fleet, 30, 'after the new master died')
        scene.fleet.finish()
        assert_kept(scene.fleet)
        assert alive(scene.proxy.pid) and read_pid(scene.pid_file) == scene.proxy.pid


def test_a_new_worker_that_dies_before_quit_is_replaced_by_one_that_waits_too(proxies,
                                                                              tmp_path):
    """Between USR2 and QUIT the old master's workers read UDP alone; a worker of the new
    master that dies then must not be replaced by one that reads the same sockets at once
    (its slot's clients would get second sessions): it waits on the same inbox."""
    with upgrade_scene(proxies, tmp_path, 2) as scene:
        scene.new = scene.proxy.upgrade(scene.pid_file, workers=2)
        workers = workers_of(scene.new)
        os.kill(workers[0], signal.SIGKILL)
        replacement = wait_for(lambda: [p for p in workers_of(scene.new) if p not in workers], 10,
                               what='the replacement worker')
        scene.proxy.known_pids.update(replacement)
        replies_after(scene.fleet, 30, 'after the replacement')   # still the old master alone
        quit_old_master(scene)


def sessions_by_worker(admin: int) -> dict[str, int]:
    _, _, body = get(admin, '/metrics')
    out: dict[str, int] = {}
    for line in body.decode().splitlines():
        if line.startswith('mpproxy_udp_sessions_created_total{'):
            worker = re.search(r'worker="(\d+)"', line).group(1)
            out[worker] = out.get(worker, 0) + int(float(line.rsplit(' ', 1)[1]))
    return out


def test_an_old_master_that_dies_without_quit_leaves_no_client_unserved(proxies, tmp_path):
    """USR2 from 3 workers to 2, then the old master is killed (no QUIT, so it never steered
    the flows to 2): every client is served again, by the new master's workers alone (on
    new sessions: nothing was handed over), and the new master steers the flows to its 2
    workers itself: new clients reach the worker slot_of names for 2, not for 3."""
    admin = free_port()
    with upgrade_scene(proxies, tmp_path, 3, admin) as scene:
        scene.proxy.write_config(scene.config(2))
        scene.new = scene.proxy.upgrade(scene.pid_file, workers=2)
        scene.proxy.proc.kill()
        scene.proxy.proc.wait(5)
        replies_after(scene.fleet, 30, 'from the new master alone')
        probes = []                     # clients that slot_of sends to 0 of 2 but to 1 of 3
        for _ in range(2000):
            if len(probes) == 10:
                break
            sock = client()
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
            if slot_of(('127.0.0.1', port), 2) == 0 and slot_of(('127.0.0.1', port), 3) == 1:
                probes.append(sock)
            else:
                sock.close()
        before = wait_for(lambda: (lambda c: c if sum(c.values()) >= CLIENTS else None)(
            sessions_by_worker(admin)), 5, what="the fleet's new sessions counted")
        try:
            for sock in probes:
                sock.sendto(b'probe', ('127.0.0.1', scene.port))
                assert sock.recvfrom(100)[0].endswith(b'probe')
        finally:
            for sock in probes:
                sock.close()
        wait_for(lambda: sum(sessions_by_worker(admin).values()) >= sum(before.values()) + 10,
                 5, what='the probes counted (workers publish each second)')
        after = sessions_by_worker(admin)
        assert after.get('0', 0) - before.get('0', 0) == 10, (before, after)
