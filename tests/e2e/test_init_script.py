"""etc/init.d/mpproxy run by `sh` as an init system would, and etc/logrotate.d/mpproxy run by
logrotate, against the real mpproxy from this venv with files in the test's directory."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.backends import TcpBackend, echo_handler
from helpers.net import connect, echo_roundtrip, free_port, port_free
from helpers.proc import ROOT, alive, children, wait_for

INIT = ROOT / 'etc' / 'init.d' / 'mpproxy'
LOGROTATE = ROOT / 'etc' / 'logrotate.d' / 'mpproxy'


def mpproxy_command() -> str:
    script = Path(sys.executable).parent / 'mpproxy'
    return str(script) if script.exists() else f'{sys.executable} -m mpproxy'


class Service:
    """The init script with DAEMON from the environment and CONFIG/PIDFILE from a defaults
    file (both ways the script takes settings); every pid seen is killed at cleanup."""

    def __init__(self, tmp_path: Path, **env):
        self.dir = tmp_path
        self.config = tmp_path / 'mpproxy.yaml'
        self.pid_file = tmp_path / 'mpproxy.pid'
        self.log_file = tmp_path / 'error.log'
        defaults = tmp_path / 'default-mpproxy'
        defaults.write_text(f'CONFIG={self.config}\nPIDFILE={self.pid_file}\n')
        self.env = {**os.environ, 'DAEMON': mpproxy_command(), 'MPPROXY_DEFAULTS': str(defaults),
                    'STOP_TIMEOUT': '20', **env}
        self.seen: set[int] = set()

    def write(self, port: int, upstream: str, shutdown_timeout: str = '2s') -> None:
        self.config.write_text(
            f'workers: 1\npid_file: {self.pid_file}\nerror_log: {self.log_file}\n'
            f'shutdown_timeout: {shutdown_timeout}\n'
            f'listeners: [{{listen: "127.0.0.1:{port}", upstream: ["{upstream}"]}}]\n')

    def run(self, action: str, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(['sh', str(INIT), action], env=self.env, capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        self.pid()
        return result

    def pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError:
            return None
        if not text.isdigit():
            return None
        pid = int(text)
        self.seen.add(pid)
        self.seen.update(children(pid))
        return pid

    def processes(self, pid: int) -> list[int]:
        return [pid, *children(pid)]

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ''

    def cleanup(self) -> None:
        for pid in self.seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def service(tmp_path):
    made = Service(tmp_path)
    yield made
    made.cleanup()
    print(f'--- {made.log_file} ---\n{made.log()[-4000:]}')


def prefixed_echo(conn):
    conn.sendall(b'new:')
    echo_handler(conn)


def test_start_status_reload_restart_stop(service, tcp_echo):
    port = free_port()
    service.write(port, tcp_echo.address)
    result = service.run('status')
    assert result.returncode == 3 and 'not running' in result.stdout
    assert service.run('stop').returncode == 0                # stopping a stopped service is fine
    assert service.run('reload').returncode == 7              # LSB: program is not running
    result = service.run('configtest')
    assert result.returncode == 0 and 'configuration ok' in result.stdout

    result = service.run('start')
    assert result.returncode == 0, result.stderr
    pid = service.pid()
    assert pid and alive(pid) and f'started (pid {pid})' in result.stdout
    assert echo_roundtrip(port, b'started') == b'started'      # --daemon returned: it serves
    result = service.run('start')
    assert result.returncode == 0 and 'already running' in result.stdout
    assert service.pid() == pid
    result = service.run('status')
    assert result.returncode == 0 and f'running (pid {pid})' in result.stdout

    backend = TcpBackend(prefixed_echo)
    try:
        service.write(port, backend.address)
        result = service.run('reload')
        assert result.returncode == 0, result.stderr
        assert f'reloaded (pid {pid}): serving: generation 2 active' in result.stdout
        assert echo_roundtrip(port, b'x') == b'new:x'            # it had happened on return
        assert service.pid() == pid

        good = service.config.read_text()
        service.config.write_text('workers: 0\n')
        result = service.run('reload')
        assert result.returncode == 1 and 'workers' in result.stderr
        result = service.run('restart')                      # checked first: nothing stops
        assert result.returncode == 1
        assert service.pid() == pid and alive(pid)
        assert echo_roundtrip(port, b'y') == b'new:y'
        service.config.write_text(good)

        result = service.run('restart')
        assert result.returncode == 0, result.stderr
        new = service.pid()
        assert new != pid and not alive(pid)
        assert echo_roundtrip(port, b'z') == b'new:z'
    finally:
        backend.close()

    processes = service.processes(new)
    assert len(processes) == 2                                # the master and its worker
    result = service.run('stop')
    assert result.returncode == 0, result.stderr
    assert not any(alive(p) for p in processes)
    assert not service.pid_file.exists() and port_free(port)
    assert service.run('status').returncode == 3


def test_stale_pid_file_status_and_start(service, tcp_echo):
    port = free_port()
    service.write(port, tcp_echo.address)
    gone = subprocess.Popen(['true'])
    gone.wait()
    service.pid_file.write_text(f'{gone.pid}\n')
    result = service.run('status')
    assert result.returncode == 1 and 'not running' in result.stdout      # dead, pid file left
    assert service.run('start').returncode == 0
    pid = service.pid()
    assert pid != gone.pid and alive(pid)
    assert service.run('stop').returncode == 0
    wait_for(lambda: not alive(pid), 5, what='the master to exit')


def test_stop_turns_fast_after_stop_timeout(tmp_path, tcp_echo):
    service = Service(tmp_path, STOP_TIMEOUT='1')
    try:
        port = free_port()
        service.write(port, tcp_echo.address, shutdown_timeout='60s')
        assert service.run('start').returncode == 0
        pid = service.pid()
        processes = service.processes(pid)
        with connect(port) as held:                           # keeps the drain going
            held.sendall(b'held')
            assert held.recv(10) == b'held'
            result = service.run('stop')
        assert result.returncode == 0, result.stderr
        assert 'fast stop' in result.stderr
        assert not any(alive(p) for p in processes)
        log = service.log()
        assert log.index('graceful shutdown (QUIT)') < log.index('fast shutdown')
    finally:
        service.cleanup()


def test_start_failures(tmp_path, tcp_echo):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    service = Service(tmp_path)
    try:
        service.write(taken.getsockname()[1], tcp_echo.address)
        result = service.run('start')
        assert result.returncode == 1 and 'cannot bind' in result.stderr
        assert service.run('status').returncode == 3
        service.env['DAEMON'] = str(tmp_path / 'no-such-mpproxy')
        assert service.run('start').returncode == 5         # LSB: program is not installed
        assert service.run('bogus').returncode == 2
    finally:
        taken.close()
        service.cleanup()


def test_init_script_passes_shellcheck():
    tool = shutil.which('shellcheck')
    if tool is None:
        pytest.skip('shellcheck is not installed')
    result = subprocess.run([tool, '-s', 'sh', str(INIT)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout


# -- logrotate --------------------------------------------------------------------------------

def logrotate() -> str:
    tool = shutil.which('logrotate') or shutil.which('logrotate', path='/usr/sbin:/sbin')
    if tool is None:
        pytest.skip('logrotate is not installed')
    return tool


def test_logrotate_snippet_parses(tmp_path):
    result = subprocess.run([logrotate(), '-d', '-s', str(tmp_path / 'state'), str(LOGROTATE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'error' not in result.stderr.lower().replace('error_log', ''), result.stderr


def test_logrotate_rotates_and_mpproxy_reopens(service, tmp_path, tcp_echo):
    port = free_port()
    service.write(port, tcp_echo.address)
    assert service.run('start').returncode == 0
    pid = service.pid()
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    conf = tmp_path / 'logrotate.conf'
    conf.write_text(LOGROTATE.read_text()
                    .replace('/var/log/mpproxy/*.log', str(tmp_path / '*.log'))
                    .replace('/run/mpproxy.pid', str(service.pid_file))
                    .replace('create 0640 root adm', f'create 0640 {user} {group}'))
    result = subprocess.run([logrotate(), '-f', '-s', str(tmp_path / 'state'), str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rotated = tmp_path / 'error.log.1'
    assert 'mpproxy started' in rotated.read_text()
    wait_for(lambda: 'reopening log files' in rotated.read_text(), 5, what='USR1 from postrotate')
    os.kill(pid, signal.SIGHUP)                        # a line after the reopen: in the new file
    wait_for(lambda: 'reloading configuration' in service.log(), 5, what='the new error.log')
    assert 'reloading configuration' not in rotated.read_text()
    assert service.run('stop').returncode == 0
