"""`mpproxy -s reload` waits for the reload it asked for and reports its outcome, as
systemd's READY=1 does: exit 0 and `serving: generation N active`, or exit 1 and the
master's `reload failed, keeping the running configuration: <cause>` line."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from helpers.backends import DnsServer
from helpers.configs import dns_config, listener, tcp_config, with_pid_file
from helpers.net import echo_roundtrip, free_port
from helpers.proc import run_cli, wait_for

NOBODY = 65534


def pid_file(config: dict, tmp_path) -> dict:
    """`config` with the pid file `mpproxy -s` finds the master by."""
    return with_pid_file(config, tmp_path / 'mpproxy.pid')


def test_s_reload_reports_the_new_generation(proxies, tmp_path, tcp_echo):
    port = free_port()
    proxy = proxies(pid_file(tcp_config(port, tcp_echo.address, workers=2), tmp_path))
    proxy.start(wait_workers=2)
    done = run_cli('-c', str(proxy.config_path), '-s', 'reload')
    assert (done.returncode, done.stdout, done.stderr) == (
        0, 'mpproxy: serving: generation 2 active\n', '')
    assert 'generation 2 active' in proxy.log()          # it had happened when -s returned
    assert echo_roundtrip(port, b'ok') == b'ok'


def test_s_reload_with_pid_needs_no_pid_file(proxies, tcp_echo):
    """etc/mpproxy.service's ExecReload: `-s reload --pid $MAINPID`, whatever the config."""
    port = free_port()
    proxy = proxies(tcp_config(port, tcp_echo.address, workers=1)).start(wait_workers=1)
    done = run_cli('-c', str(proxy.config_path), '-s', 'reload')
    assert done.returncode == 1
    assert done.stderr == f'mpproxy: -s needs pid_file set in {proxy.config_path}, or --pid\n'
    done = run_cli('-c', str(proxy.config_path), '-s', 'reload', '--pid', str(proxy.pid))
    assert (done.returncode, done.stdout) == (0, 'mpproxy: serving: generation 2 active\n')
    assert echo_roundtrip(port, b'ok') == b'ok'


def test_pid_names_the_process_it_could_not_find(tmp_path):
    config = tmp_path / 'mpproxy.yaml'
    config.write_text('listeners: [{listen: "127.0.0.1:9", upstream: ["127.0.0.1:9"]}]\n')
    child = subprocess.Popen(['true'])
    child.wait()                                       # a pid that no process has now
    done = run_cli('-c', str(config), '-s', 'quit', '--pid', str(child.pid))
    assert (done.returncode, done.stderr) == (
        1, f'mpproxy: no process with pid {child.pid} (from --pid)\n')
    for args in (['--pid', '1'], ['-s', 'quit', '--pid', '0']):
        done = run_cli('-c', str(config), *args)
        assert done.returncode == 2 and '--pid' in done.stderr, done   # usage errors


def test_s_reload_reports_a_reload_the_master_could_not_bind(proxies, tmp_path, tcp_echo):
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    try:
        port, busy = free_port(), taken.getsockname()[1]
        proxy = proxies(pid_file(tcp_config(port, tcp_echo.address), tmp_path))
        proxy.start(wait_workers=2)
        config = tcp_config(port, tcp_echo.address)
        config['listeners'].append(listener(busy, [tcp_echo.address], protocol=None))
        proxy.write_config(pid_file(config, tmp_path))
        done = run_cli('-c', str(proxy.config_path), '-s', 'reload')
        assert done.returncode == 1
        assert done.stderr == ('mpproxy: reload failed, keeping the running configuration: '
                               f'cannot bind tcp 127.0.0.1:{busy}: Address already in use\n')
        assert echo_roundtrip(port, b'still') == b'still'
    finally:
        taken.close()


def test_s_reload_waits_for_new_workers_that_cannot_start(proxies, tmp_path):
    dns = DnsServer({'backend.test': ['127.0.0.1']})
    try:
        port = free_port()
        proxy = proxies(pid_file(dns_config(port, dns.port, 'backend.test:9', resolve=None),
                                      tmp_path)).start(wait_workers=1)
        del dns.records['backend.test']                  # the new worker cannot resolve it
        done = run_cli('-c', str(proxy.config_path), '-s', 'reload')
        assert done.returncode == 1, done
        assert done.stderr.startswith(
            'mpproxy: reload failed, keeping the running configuration: generation 2: '
            'worker 0 exited with code 3 before it was ready'), done.stderr
    finally:
        dns.close()


def test_a_user_who_may_not_signal_the_master_cannot_reload_it(proxies, tmp_path, tcp_echo):
    """The control socket checks its client's uid (SO_PEERCRED), as kill(2) would."""
    if os.geteuid() != 0:
        pytest.skip('needs root to be another user')
    port = free_port()
    proxy = proxies(pid_file(tcp_config(port, tcp_echo.address), tmp_path))
    proxy.start(wait_workers=2)
    pid = os.fork()
    if pid == 0:                      # as nobody: connect, ask, expect to be closed on
        code = 2
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(b'\0mpproxy/%d/control' % proxy.pid)
                try:
                    sock.sendall(b'reload\n')
                    code = 0 if sock.recv(100) == b'' else 1
                except (BrokenPipeError, ConnectionResetError):
                    code = 0              # closed on before or while it asked
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(lambda: 'refused a client that may not signal the master' in proxy.log(), 5,
             what='the refusal in the log')
    assert 'reloading configuration' not in proxy.log()
    done = run_cli('-c', str(proxy.config_path), '-s', 'reload')    # root may
    assert done.returncode == 0, done
