"""Privilege drop (`user`, `group`), `worker_rlimit_nofile` and the `-t` open-files warning.

The master runs as root (as the tests do) and binds, low ports included; its
workers switch to `user` before they serve. Tests that need root skip without it.
"""

from __future__ import annotations

import grp
import os
import pwd
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers.configs import listener, udp_config, with_keys
from helpers.net import client, echo_roundtrip, free_port, roundtrip
from helpers.proc import Proxy, run_cli, wait_for

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0,
                               reason='switching users needs the tests to run as root')
USER = 'nobody'


def _has_group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


GROUP = next((g for g in ('nogroup', 'nobody') if _has_group(g)), None)   # Debian: nogroup
UID = pwd.getpwnam(USER).pw_uid
GID = grp.getgrnam(GROUP).gr_gid if GROUP else pwd.getpwnam(USER).pw_gid


def free_low_port() -> int:
    """A port below 1024 free for TCP and UDP on 127.0.0.1 right now."""
    ports = list(range(600, 1024))
    random.shuffle(ports)
    for port in ports:
        try:
            with socket.socket() as t, socket.socket(type=socket.SOCK_DGRAM) as u:
                t.bind(('127.0.0.1', port))
                u.bind(('127.0.0.1', port))
            return port
        except OSError:
            continue
    raise RuntimeError('no free port below 1024')


def ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, filesystem) and Groups of `pid`, from /proc."""
    found = {}
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            key, _, value = line.partition(':')
            if key in ('Uid', 'Gid', 'Groups'):
                found[key] = [int(v) for v in value.split()]
    return found


def nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of `pid`, from /proc/<pid>/limits."""
    with open(f'/proc/{pid}/limits') as f:
        for line in f:
            if line.startswith('Max open files'):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError('no "Max open files" line')


def assert_dropped(pid: int) -> None:
    assert ids(pid) == {'Uid': [UID] * 4, 'Gid': [GID] * 4, 'Groups': [GID]}, pid
    assert os.stat(f'/proc/{pid}').st_uid == UID     # dumpable again after setuid, as nginx


def nr_open() -> int:
    with open('/proc/sys/fs/nr_open') as f:
        return int(f.read())


def can_raise_hard_limit() -> bool:
    """CAP_SYS_RESOURCE: root has it, except in containers that drop it (as some CI does)."""
    with open('/proc/self/status') as f:
        caps = next(int(l.split()[1], 16) for l in f if l.startswith('CapEff:'))
    return bool(caps >> 24 & 1)


@pytest.fixture
def open_dir():
    """A directory the workers' user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix='mpproxy-privs-'))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def two_listeners(tcp_port: int, tcp_upstream: str, udp_port: int, udp_upstream: str,
                  **top) -> dict:
    """Workers as USER:GROUP behind a TCP and a UDP listener; `top`: more top-level keys."""
    return {'workers': 2, 'user': USER, 'group': GROUP or USER, **top,
            'listeners': [listener(tcp_port, [tcp_upstream], protocol=None),
                          listener(udp_port, [udp_upstream], 'udp')]}


@ROOT_ONLY
def test_workers_switch_user_after_the_master_binds_low_ports(proxies, tcp_echo, udp_echo):
    low = free_low_port()
    udp_port = free_port(socket.SOCK_DGRAM)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    above_hard = min(hard + 1000, nr_open())
    # raised while still root; without CAP_SYS_RESOURCE only up to the hard limit, with a warning
    expected = (above_hard,) * 2 if can_raise_hard_limit() else (hard, hard)
    config = two_listeners(low, tcp_echo.address, udp_port, udp_echo.address,
                           worker_rlimit_nofile=above_hard)
    proxy = proxies(config).start(wait_workers=2)
    workers = proxy.workers()
    assert ids(proxy.pid)['Uid'] == [0] * 4                      # the master stays root
    for pid in workers:
        assert_dropped(pid)
        assert nofile(pid) == expected
    if not can_raise_hard_limit():
        assert proxy.log().count(f'worker_rlimit_nofile {above_hard} is above the hard limit; '
                                 f'workers use {hard}') == 1     # said once, by worker 0
    assert echo_roundtrip(low, b'low port') == b'low port'
    with client() as sock:
        assert roundtrip(sock, b'datagram', ('127.0.0.1', udp_port))[0] == b'datagram'

    # A reload: the master, still root, binds one more low port; new workers switch too.
    second = free_low_port()
    config['listeners'].append(listener(second, [tcp_echo.address], protocol=None))
    proxy.write_config(config)
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active', timeout=10)
    new = wait_for(lambda: (lambda w: w if len(w) == 2 and not set(w) & set(workers) else None)(
        proxy.serving_workers()), 10, what='the new generation')
    for pid in new:
        assert_dropped(pid)
    assert ids(proxy.pid)['Uid'] == [0] * 4
    assert echo_roundtrip(second, b'new low port') == b'new low port'
    assert echo_roundtrip(low, b'old low port') == b'old low port'
    with client() as sock:
        assert roundtrip(sock, b'after reload', ('127.0.0.1', udp_port))[0] == b'after reload'
    assert 'could not start' not in proxy.log() and 'Traceback' not in proxy.log()


@ROOT_ONLY
def test_group_defaults_to_the_users_primary_group(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(f"""
        workers: 1
        user: "{UID}"
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: ["{tcp_echo.address}"]
    """).start(wait_workers=1)
    primary = pwd.getpwnam(USER).pw_gid
    (worker,) = proxy.workers()
    found = ids(worker)
    assert found['Uid'] == [UID] * 4 and found['Gid'] == [primary] * 4
    assert echo_roundtrip(port, b'numeric uid') == b'numeric uid'


@ROOT_ONLY
def test_usr1_reopens_the_log_in_workers_that_dropped_privileges(proxies, tcp_echo, open_dir):
    """As nginx: the master reopens the file and gives it to the workers' user first."""
    port = free_port()
    log_path = open_dir / 'error.log'
    proxy = proxies(f"""
        workers: 2
        user: {USER}
        error_log: {log_path}
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: ["{tcp_echo.address}"]
    """)
    proxy.log_path = log_path                 # the fixture waits for 'mpproxy started' in it
    proxy.start(wait_workers=2)
    workers = proxy.workers()
    rotated = open_dir / 'error.log.1'
    os.rename(log_path, rotated)
    proxy.signal(signal.SIGUSR1)

    def open_files(pid):
        fds = os.listdir(f'/proc/{pid}/fd')
        return {os.readlink(f'/proc/{pid}/fd/{fd}') for fd in fds if fd.isdigit()} - {''}

    wait_for(lambda: all(str(log_path) in open_files(pid) for pid in workers), 5,
             what='the workers to open the new error log')
    assert os.stat(log_path).st_uid == UID
    assert 'cannot reopen' not in log_path.read_text() + rotated.read_text()
    assert echo_roundtrip(port, b'still serving') == b'still serving'


@ROOT_ONLY
def test_a_worker_that_cannot_switch_user_fails_its_boot(tmp_path):
    """Without CAP_SETUID and CAP_SETGID (a root stripped of them), nothing serves."""
    if not shutil.which('setpriv'):
        pytest.skip('needs setpriv (util-linux) to drop capabilities')
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(f'workers: 1\nuser: {USER}\nlisteners:\n'
                    f'  - {{listen: "127.0.0.1:{free_port()}", upstream: ["127.0.0.1:9"]}}\n')
    result = subprocess.run(['setpriv', '--bounding-set', '-setuid,-setgid',
                             sys.executable, '-m', 'mpproxy', '-c', str(path)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr
    assert f'worker 0 could not start: cannot switch to user {USER}' in result.stderr
    assert 'setgroups: Operation not permitted' in result.stderr
    assert 'exited with code 3 before it was ready' in result.stderr
    assert 'Traceback' not in result.stderr


@ROOT_ONLY
def test_user_is_ignored_with_a_warning_when_the_master_is_not_root(proxies, tcp_echo, open_dir):
    """nginx's rule; run as `nobody` through setpriv, config in a directory it can read."""
    if not shutil.which('setpriv'):
        pytest.skip('needs setpriv (util-linux) to run mpproxy as another user')
    as_nobody = ['setpriv', '--reuid', str(UID), '--regid', str(GID), '--clear-groups']
    probe = subprocess.run([*as_nobody, sys.executable, '-c', 'import mpproxy'],
                           capture_output=True, timeout=20)
    if probe.returncode != 0:
        pytest.skip(f'{USER} cannot run this python: {probe.stderr[-200:]!r}')
    port = free_port()
    config = f"""
        workers: 1
        user: root
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: ["{tcp_echo.address}"]
    """
    proxy = proxies(config)
    proxy.config_path = open_dir / 'mpproxy.yaml'
    proxy.write_config(config)
    proxy.config_path.chmod(0o644)
    warning = (f"{proxy.config_path}: user 'root' ignored: switching the workers to another "
               f"user needs a master running as root (this one runs as uid {UID})")

    checked = subprocess.run([*as_nobody, *proxy.command('-t')], capture_output=True, text=True,
                             timeout=20, stdin=subprocess.DEVNULL)
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.splitlines() == [f'mpproxy: warning: {warning}']

    proxy.command = lambda *extra: [*as_nobody, *Proxy.command(proxy, *extra)]
    proxy.start(wait_workers=1)
    assert proxy.log().count(warning) == 1
    (worker,) = proxy.workers()
    assert ids(worker)['Uid'] == [UID] * 4 and ids(proxy.pid)['Uid'] == [UID] * 4
    assert echo_roundtrip(port, b'as nobody') == b'as nobody'


@pytest.mark.parametrize('text, line, message', [
    ('user: no-such-user-mpproxy\n', 1, "user: no such user 'no-such-user-mpproxy'"),
    (f'user: {USER}\ngroup: no-such-group-mpproxy\n', 2,
     "group: no such group 'no-such-group-mpproxy'"),
    ('group: nogroup\n', 1, 'group: needs user'),
    ('user: 5000000000\n', 1, 'user: must be an integer <= 4294967294'),
    ('user: "4000000"\n', 1, 'user: uid 4000000 has no passwd entry, so no primary group'),
])
def test_check_reports_an_unknown_user_or_group_with_file_and_line(tmp_path, text, line, message):
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(text + 'listeners: [{listen: "127.0.0.1:8000", upstream: ["127.0.0.1:9"]}]\n')
    result = run_cli('-t', '-c', str(path))
    assert result.returncode == 1
    assert f'{path}:{line}: {message}' in result.stderr.splitlines()[0], result.stderr
    assert 'Traceback' not in result.stderr


def test_worker_rlimit_nofile_sets_the_workers_limit(proxies, tcp_echo):
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(4321, hard)
    proxy = proxies(f"""
        workers: 2
        worker_rlimit_nofile: {want}
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: ["{tcp_echo.address}"]
    """).start(wait_workers=2)
    for pid in proxy.workers():
        assert nofile(pid) == (want, hard)
    assert nofile(proxy.pid) == (soft, hard)                 # the master keeps its own
    assert echo_roundtrip(port, b'limits') == b'limits'


def test_check_warns_when_udp_sessions_need_more_files_than_the_limit(proxies, udp_echo):
    port = free_port(socket.SOCK_DGRAM)
    config = with_keys(udp_config(port, udp_echo.address, workers=1,
                                  extra={'udp': {'max_sessions': 10_000_000}}),
                       worker_rlimit_nofile=1024)
    proxy = proxies(config)
    path = proxy.config_path
    result = run_cli('-t', '-c', str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'configuration ok'
    warning = (f'{path}: workers may need 10000033 open files (listeners[0].udp.max_sessions '
               f'10000000, listening sockets and the rest 33) but their limit is 1024; '
               f'raise worker_rlimit_nofile')
    assert result.stderr.splitlines() == [f'mpproxy: warning: {warning}']

    proxy.start(wait_workers=1)                  # a warning, not an error: it serves
    assert proxy.log().count(warning) == 1
    with client() as sock:
        assert roundtrip(sock, b'warned', ('127.0.0.1', port))[0] == b'warned'

    config['listeners'][0]['udp']['max_sessions'] = 500
    proxy.write_config(config)
    assert run_cli('-t', '-c', str(path)).stderr == ''
