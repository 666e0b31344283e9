"""The command line as a user types it: -t, -T, -V, -s, --daemon, pid file locking."""

from __future__ import annotations

import os
import signal

import pytest
import yaml

from helpers.configs import render, tcp_config, with_keys, with_pid_file
from helpers.net import echo_roundtrip, free_port
from helpers.proc import ROOT, alive, run_cli, wait_for

BROKEN = [
    # (config text, expected line number, expected key path and message fragment)
    ('workers: 0\n', 1, 'workers:'),
    ('workers: 2\ncolour: blue\n', 2, 'colour: unknown key'),
    ('listeners:\n  - listen: 127.0.0.1:70000\n    upstream: [127.0.0.1:1]\n', 2,
     'listeners[0].listen: port must be 1-65535'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: nowhere\n', 3,
     "listeners[0].upstream: unknown upstream 'nowhere'"),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n    protocol: sctp\n', 4,
     'listeners[0].protocol:'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n    connect_timeout: soon\n',
     4, 'listeners[0].connect_timeout:'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n    backlog: "many"\n', 4,
     'listeners[0].backlog:'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n    backlog: 99999999999\n',
     4, 'listeners[0].backlog:'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n'
     '  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n', 4, 'duplicate listener'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n    colour: red\n', 4,
     'listeners[0].colour: unknown key'),
    ('listeners:\n  - listen: 127.0.0.1:8000\n    upstream: [127.0.0.1:1]\n'
     '    proxy_protocol: {accept: true}\n', 4, 'listeners[0].proxy_protocol'),
    ('admin: {listen: 127.0.0.1:99999}\n', 1, 'admin.listen: port must be 1-65535'),
    ('admin: {}\n', 1, 'admin.listen: missing'),
    ('upstreams:\n  web:\n    servers: []\n', 3, 'upstreams.web.servers'),
    ('workers: 1\n  bad: indent\n', 2, 'YAML syntax error'),
    ('upstreams:\n  web:\n    servers: [127.0.0.1:80]\n    balance: fastest\n', 4,
     'upstreams.web.balance'),
    ('shutdown_timeout: true\n', 1, 'shutdown_timeout:'),
]


@pytest.mark.parametrize('text,line,fragment', BROKEN)
def test_check_reports_file_line_and_key(tmp_path, text, line, fragment):
    path = tmp_path / 'broken.yaml'
    path.write_text(text)
    result = run_cli('-t', '-c', str(path))
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert any(l.startswith(f'{path}:{line}: ') and fragment in l for l in lines), result.stderr


def test_check_missing_file(tmp_path):
    result = run_cli('-t', '-c', str(tmp_path / 'nope.yaml'))
    assert result.returncode == 1
    assert 'cannot read' in result.stderr and 'Traceback' not in result.stderr


def test_check_ok_and_example_config():
    result = run_cli('-t', '-c', str(ROOT / 'etc' / 'mpproxy.yaml'))
    assert result.returncode == 0, result.stderr
    assert 'configuration ok' in result.stdout


def test_config_from_environment(tmp_path):
    path = tmp_path / 'env.yaml'
    path.write_text('workers: 1\nlisteners: [{listen: "127.0.0.1:8000", upstream: ["127.0.0.1:9000"]}]\n')
    result = run_cli('-t', env={**os.environ, 'MPPROXY_CONFIG': str(path)})
    assert result.returncode == 0 and 'configuration ok' in result.stdout


def test_dump_prints_effective_config_with_defaults(tmp_path):
    path = tmp_path / 'c.yaml'
    path.write_text('workers: 3\nlisteners:\n  - listen: 127.0.0.1:8000\n    protocol: udp\n'
                    '    upstream: [127.0.0.1:53]\n')
    result = run_cli('-T', '-c', str(path))
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective['workers'] == 3
    assert effective['shutdown_timeout'] in ('30s', 30)
    listener = effective['listeners'][0]
    assert listener['idle_timeout'] in ('30s', 30)        # the udp default
    assert listener['backlog'] == 511
    assert listener['udp']['max_sessions'] == 10000
    again = tmp_path / 'again.yaml'
    again.write_text(result.stdout)
    assert run_cli('-t', '-c', str(again)).returncode == 0


def test_version():
    result = run_cli('-V')
    assert result.returncode == 0 and 'mpproxy' in result.stdout


def daemon_config(tmp_path, port, backend) -> tuple[str, str]:
    pid_file = tmp_path / 'mpproxy.pid'
    log_file = tmp_path / 'error.log'
    config = with_keys(tcp_config(port, backend), pid_file=str(pid_file), error_log=str(log_file))
    path = tmp_path / 'daemon.yaml'
    path.write_text(render(config))
    return str(path), str(pid_file)


def test_second_instance_with_same_pid_file_refuses(proxies, tmp_path, tcp_echo):
    port = free_port()
    pid_file = tmp_path / 'one.pid'
    proxy = proxies(with_pid_file(tcp_config(port, tcp_echo.address), pid_file)).start(
        wait_workers=2)
    assert pid_file.read_text().strip() == str(proxy.pid)
    other_port = free_port()
    second = proxies(with_pid_file(tcp_config(other_port, tcp_echo.address), pid_file),
                     name='second')
    result = run_cli('-c', str(second.config_path), timeout=10)
    assert result.returncode == 1
    assert f'another mpproxy (pid {proxy.pid})' in result.stderr
    assert pid_file.read_text().strip() == str(proxy.pid)


def test_daemon_and_signals_by_name(tmp_path, tcp_echo):
    port = free_port()
    config, pid_file = daemon_config(tmp_path, port, tcp_echo.address)
    result = run_cli('--daemon', '-c', config, timeout=15)
    assert result.returncode == 0, result.stderr
    pid = int(open(pid_file).read())
    try:
        assert alive(pid) and os.getppid() != pid
        assert os.getsid(pid) != os.getsid(0)                 # detached: its own session
        assert echo_roundtrip(port, b'daemon') == b'daemon'
        log_path = tmp_path / 'error.log'
        assert run_cli('-s', 'reload', '-c', config).returncode == 0
        wait_for(lambda: 'generation 2 active' in log_path.read_text(), 10, what='reload')
        os.rename(log_path, tmp_path / 'error.log.1')
        assert run_cli('-s', 'reopen', '-c', config).returncode == 0
        wait_for(lambda: log_path.exists() and 'reopening' in (tmp_path / 'error.log.1').read_text(),
                 5, what='log reopened')
        assert run_cli('-s', 'quit', '-c', config).returncode == 0
        wait_for(lambda: not alive(pid), 10, what='the daemon to exit')
        assert not os.path.exists(pid_file)
        result = run_cli('-s', 'stop', '-c', config)
        assert result.returncode == 1 and 'pid file' in result.stderr
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_daemon_reports_startup_failure(tmp_path, tcp_echo):
    import socket
    taken = socket.socket()
    taken.bind(('127.0.0.1', 0))
    taken.listen(1)
    try:
        config, _ = daemon_config(tmp_path, taken.getsockname()[1], tcp_echo.address)
        result = run_cli('--daemon', '-c', config, timeout=15)
        assert result.returncode == 1
        assert 'cannot bind' in result.stderr
    finally:
        taken.close()


def test_stop_signal_by_name(tmp_path, tcp_echo):
    port = free_port()
    config, pid_file = daemon_config(tmp_path, port, tcp_echo.address)
    assert run_cli('--daemon', '-c', config, timeout=15).returncode == 0
    pid = int(open(pid_file).read())
    try:
        assert run_cli('-s', 'stop', '-c', config).returncode == 0
        wait_for(lambda: not alive(pid), 3, what='fast stop')
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_check_reports_a_server_name_that_does_not_resolve(tmp_path):
    path = tmp_path / 'dns.yaml'
    config = {'upstreams': {'web': {'servers': ['missing.invalid:80', 'localhost:81']}},
              'listeners': [{'listen': '127.0.0.1:8000', 'upstream': 'web'}]}
    path.write_text(render(config))
    result = run_cli('-t', '-c', str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'upstreams.web.servers[0]: cannot resolve missing.invalid' in lines[0]
    config['upstreams']['web']['resolve'] = '30s'
    path.write_text(render(config))
    assert run_cli('-t', '-c', str(path)).returncode == 0      # with resolve it may start empty
