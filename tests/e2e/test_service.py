"""Under systemd: sd_notify to a fake NOTIFY_SOCKET from the real master, the unit checked.

The socket records every message with its sender's pid (SCM_CREDENTIALS, as systemd
reads it), so each test checks who said what, in which order.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from helpers.backends import DnsServer
from helpers.configs import dns_config, tcp_config, upgrade_config, with_keys
from helpers.net import echo_roundtrip, free_port
from helpers.proc import ROOT, alive, read_pid, run_cli, wait_for

UNIT = ROOT / 'etc' / 'mpproxy.service'
RELOADING = ['RELOADING', 'MONOTONIC_USEC', 'STATUS']


class Message:
    def __init__(self, data: bytes, pid: int | None):
        self.pid = pid
        self.lines = data.decode().splitlines()
        self.keys = [line.split('=', 1)[0] for line in self.lines]
        self.fields = dict(line.split('=', 1) for line in self.lines)

    def __repr__(self):
        return f'<from {self.pid}: {self.lines}>'


class NotifySocket:
    """A fake $NOTIFY_SOCKET: a datagram socket in the test's directory."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    @property
    def env(self) -> dict:
        return {'NOTIFY_SOCKET': self.path}

    def next(self, timeout: float = 10.0) -> Message:
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            raise AssertionError(f'no notify message within {timeout}s') from None
        pid = None
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack('3i', value[:12])[0]
        return Message(data, pid)

    def quiet_for(self, seconds: float) -> list[Message]:
        """The messages that arrive within `seconds` (a test expects none)."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.next(left))
            except AssertionError:
                break
        return got

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(tmp_path / 'notify.sock')
    yield sock
    sock.close()


def monotonic_us() -> int:
    return int(time.monotonic() * 1e6)


def expect_ready(note: NotifySocket, pid: int) -> Message:
    ready = note.next()
    assert ready.pid == pid, ready
    assert ready.lines == ['READY=1', 'STATUS=serving: generation 1', f'MAINPID={pid}'], ready
    return ready


def test_ready_then_reloads_then_stopping(proxies, tcp_echo, notify_socket):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address), env=notify_socket.env).start()
    expect_ready(notify_socket, proxy.pid)
    assert 'mpproxy started' in proxy.log()           # sent once every worker serves
    assert echo_roundtrip(port, b'ready') == b'ready'

    before = monotonic_us()
    proxy.signal(signal.SIGHUP)
    reloading = notify_socket.next()
    assert reloading.keys == RELOADING and reloading.pid == proxy.pid, reloading
    assert before <= int(reloading.fields['MONOTONIC_USEC']) <= monotonic_us()
    ready = notify_socket.next()
    assert ready.lines == ['READY=1', 'STATUS=serving: generation 2 active'], ready
    assert 'generation 2 active' in proxy.log()

    proxy.write_config('workers: 2\nlisteners: [{listen: "127.0.0.1:99999"}]\n')
    proxy.signal(signal.SIGHUP)
    assert notify_socket.next().keys == RELOADING
    failed = notify_socket.next()
    assert failed.keys == ['READY', 'STATUS'], failed
    assert failed.fields['STATUS'].startswith('reload failed, keeping the running configuration: ')
    assert 'port must be 1-65535' in failed.fields['STATUS']
    assert echo_roundtrip(port, b'old generation') == b'old generation'

    proxy.signal(signal.SIGQUIT)
    stopping = notify_socket.next()
    assert stopping.lines == ['STOPPING=1', 'STATUS=graceful shutdown (QUIT): draining'], stopping
    assert stopping.pid == proxy.pid
    assert proxy.wait_exit(15) == 0
    assert notify_socket.quiet_for(0.3) == []


def test_reload_whose_workers_cannot_start_is_ready_again(proxies, notify_socket):
    dns = DnsServer({'backend.test': ['127.0.0.1']})
    try:
        port = free_port()
        proxy = proxies(dns_config(port, dns.port, 'backend.test:9', resolve=None),
                        env=notify_socket.env).start(wait_workers=1)
        expect_ready(notify_socket, proxy.pid)
        del dns.records['backend.test']              # the new worker cannot resolve it
        proxy.signal(signal.SIGHUP)
        assert notify_socket.next().keys == RELOADING
        failed = notify_socket.next(20)
        assert failed.keys == ['READY', 'STATUS'], failed
        assert failed.fields['STATUS'].startswith(
            'reload failed, keeping the running configuration: generation 2: worker 0 exited '
            'with code 3 before it was ready'), failed
        assert 'reload failed, keeping the running configuration: generation 2:' in proxy.log()
    finally:
        dns.close()


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_fast_stop_sends_stopping(proxies, tcp_echo, notify_socket, sig):
    proxy = proxies(tcp_config(free_port(), tcp_echo.address, workers=1),
                    env=notify_socket.env).start()
    expect_ready(notify_socket, proxy.pid)
    proxy.signal(sig)
    assert notify_socket.next().lines == ['STOPPING=1', 'STATUS=fast shutdown']
    assert proxy.wait_exit(10) == 0


def test_quit_with_shutdown_grace_says_stopping_at_once_then_draining(proxies, tcp_echo,
                                                                    notify_socket):
    port = free_port()
    config = with_keys(tcp_config(port, tcp_echo.address, workers=1), shutdown_grace='1s')
    proxy = proxies(config, env=notify_socket.env).start()
    expect_ready(notify_socket, proxy.pid)
    proxy.signal(signal.SIGQUIT)
    assert notify_socket.next().lines == [
        'STOPPING=1', 'STATUS=graceful shutdown (QUIT): not ready, accepting for 1s more '
        '(shutdown_grace)']
    assert notify_socket.next().lines == [
        'STOPPING=1', 'STATUS=graceful shutdown (QUIT): draining']      # the grace is over
    assert proxy.wait_exit(10) == 0


def test_usr2_new_master_takes_mainpid_and_old_one_stays_silent(proxies, tmp_path, tcp_echo,
                                                                 notify_socket):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    proxy = proxies(upgrade_config(tmp_path, port, tcp_echo.address),
                    env=notify_socket.env).start(wait_workers=2)
    old = proxy.pid
    expect_ready(notify_socket, old)
    new = None
    try:
        proxy.signal(signal.SIGUSR2)
        starting = notify_socket.next()
        new = wait_for(lambda: (lambda p: p if p not in (None, old) else None)(read_pid(pid_file)),
                       10, what='the new master to write the pid file')
        proxy.known_pids.add(new)
        assert starting.pid == old
        assert starting.lines == [f'STATUS=binary upgrade: new master pid {new} starting']
        expect_ready(notify_socket, new)              # READY=1, MAINPID=<new>: systemd follows
        assert 'listening sockets inherited' in proxy.log()
        # While the new master lives the old one says nothing: no RELOADING=1 on HUP, and
        # above all no STOPPING=1 when the operator retires it with QUIT.
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active', timeout=10)
        proxy.signal(signal.SIGQUIT)
        assert proxy.wait_exit(15) == 0
        assert notify_socket.quiet_for(0.3) == []
        assert echo_roundtrip(port, b'new master') == b'new master'
        os.kill(new, signal.SIGQUIT)
        stopping = notify_socket.next()
        assert stopping.pid == new and stopping.keys == ['STOPPING', 'STATUS'], stopping
        wait_for(lambda: not alive(new), 10, what='the new master to exit')
    finally:
        if new and alive(new):
            os.kill(new, signal.SIGKILL)


def test_failed_usr2_gives_the_service_back_to_the_old_master(proxies, tmp_path, tcp_echo,
                                                              notify_socket):
    port = free_port()
    proxy = proxies(upgrade_config(tmp_path, port, tcp_echo.address),
                    env=notify_socket.env).start(wait_workers=2)
    expect_ready(notify_socket, proxy.pid)
    proxy.config_path.write_text('workers: [broken\n')     # the new master cannot load it
    proxy.signal(signal.SIGUSR2)
    starting = notify_socket.next()
    assert starting.keys == ['STATUS'] and starting.pid == proxy.pid, starting
    back = notify_socket.next()
    assert back.pid == proxy.pid
    assert back.lines == ['READY=1', 'STATUS=binary upgrade failed; serving from this master',
                          f'MAINPID={proxy.pid}'], back
    assert echo_roundtrip(port, b'old master') == b'old master'


def test_backing_out_of_usr2_gives_the_service_back(proxies, tmp_path, tcp_echo, notify_socket):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    proxy = proxies(upgrade_config(tmp_path, port, tcp_echo.address),
                    env=notify_socket.env).start(wait_workers=2)
    expect_ready(notify_socket, proxy.pid)
    proxy.signal(signal.SIGUSR2)
    assert notify_socket.next().keys == ['STATUS']
    new = wait_for(lambda: (lambda p: p if p not in (None, proxy.pid) else None)(read_pid(pid_file)),
                   10, what='the new master to write the pid file')
    proxy.known_pids.add(new)
    expect_ready(notify_socket, new)
    os.kill(new, signal.SIGQUIT)                          # the operator backs out
    back = notify_socket.next()                  # and the new master said no STOPPING=1
    assert back.pid == proxy.pid and back.fields['MAINPID'] == str(proxy.pid), back
    assert back.keys == ['READY', 'STATUS', 'MAINPID']
    assert back.fields['STATUS'] == 'binary upgrade backed out; serving from this master'
    wait_for(lambda: read_pid(pid_file) == proxy.pid, 5, what='the pid file back')
    assert 'binary upgrade backed out: the new master' in proxy.log()
    assert '[error]' not in proxy.log()                  # an operator's choice, not an error
    assert not os.path.exists(f'{pid_file}.oldbin')
    assert echo_roundtrip(port, b'old master') == b'old master'


def test_daemon_names_its_own_pid(tmp_path, tcp_echo, notify_socket):
    port = free_port()
    pid_file = tmp_path / 'mpproxy.pid'
    config = tmp_path / 'daemon.yaml'
    config.write_text(f'workers: 1\npid_file: {pid_file}\nerror_log: {tmp_path}/error.log\n'
                      f'listeners: [{{listen: "127.0.0.1:{port}", upstream: ["{tcp_echo.address}"]}}]\n')
    result = run_cli('--daemon', '-c', str(config), env={**os.environ, **notify_socket.env})
    assert result.returncode == 0, result.stderr
    pid = read_pid(pid_file)
    try:
        expect_ready(notify_socket, pid)              # the daemon, not the process that forked it
        assert run_cli('-s', 'quit', '-c', str(config)).returncode == 0
        assert notify_socket.next().keys == ['STOPPING', 'STATUS']
        wait_for(lambda: not alive(pid), 10, what='the daemon to exit')
    finally:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_without_notify_socket_nothing_changes(proxies, tcp_echo):
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=1),
                    env={'NOTIFY_SOCKET': ''}).start(wait_workers=1)
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    assert echo_roundtrip(port, b'no notify') == b'no notify'
    assert 'cannot notify systemd' not in proxy.log()
    proxy.signal(signal.SIGQUIT)
    assert proxy.wait_exit(10) == 0


# -- the systemd unit -------------------------------------------------------------------------

def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values]}} of a unit file (keys may repeat)."""
    sections: dict = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in '#;':
            continue
        if line.startswith('['):
            current = sections.setdefault(line.strip('[]'), {})
            continue
        key, _, value = line.partition('=')
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_has_the_directives_mpproxy_needs():
    unit = unit_directives(UNIT.read_text())
    service = unit['Service']
    assert service['Type'] == ['notify']
    assert service['NotifyAccess'] == ['all']                 # the USR2 master's MAINPID=
    assert service['ExecStart'] == ['/usr/local/bin/mpproxy -c /etc/mpproxy/mpproxy.yaml']
    assert service['ExecStartPre'] == ['/usr/local/bin/mpproxy -t -c /etc/mpproxy/mpproxy.yaml']
    # The reload's outcome, from the main process (the new master after USR2): see
    # tests/systemd for what a real systemd does with these.
    assert service['ExecReload'] == [
        '/usr/local/bin/mpproxy -s reload --pid $MAINPID -c /etc/mpproxy/mpproxy.yaml']
    assert service['KillSignal'] == ['SIGQUIT'] and service['KillMode'] == ['control-group']
    assert service['Restart'] == ['on-failure']
    assert int(service['LimitNOFILE'][0]) >= 65536
    # The stop deadline outlasts the master's own: shutdown_grace, shutdown_timeout, then
    # close and kill slack.
    from mpproxy.config.loader import load
    from mpproxy.master.table import CLOSE_SLACK
    from mpproxy.master.table import KILL_GRACE
    sample = load(str(ROOT / 'etc' / 'mpproxy.yaml'))
    stop = sample.shutdown_grace + sample.shutdown_timeout + CLOSE_SLACK + KILL_GRACE
    assert int(service['TimeoutStopSec'][0].rstrip('s')) > stop
    assert 'shutdown_grace + shutdown_timeout' in UNIT.read_text(), 'the note on TimeoutStopSec'
    caps = service['CapabilityBoundingSet'][0].split()
    for cap in ('CAP_NET_BIND_SERVICE', 'CAP_SETUID', 'CAP_SETGID', 'CAP_KILL', 'CAP_CHOWN'):
        assert cap in caps
    assert 'AF_UNIX' in service['RestrictAddressFamilies'][0]    # sd_notify, control sockets
    assert '--daemon' not in ' '.join(service['ExecStart'])
    assert unit['Install']['WantedBy'] == ['multi-user.target']


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which('systemd-analyze')
    if tool is None:
        pytest.skip('systemd-analyze is not installed')
    mpproxy = os.path.join(os.path.dirname(sys.executable), 'mpproxy')
    unit = tmp_path / 'mpproxy.service'       # verify wants the ExecStart program to exist
    unit.write_text(UNIT.read_text().replace('/usr/local/bin/mpproxy', mpproxy))
    result = subprocess.run([tool, 'verify', '--man=no', str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    about_unit = [line for line in (result.stdout + result.stderr).splitlines()
                  if 'mpproxy.service' in line]       # e.g. "Unknown key ..., ignoring" (rc 0)
    assert not about_unit, about_unit
