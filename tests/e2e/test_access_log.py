"""The access log end to end: the real `mpproxy`, real clients, the file it writes.

One line per TCP connection and per UDP session when it ends (observe/access.py has the
fields); each status is produced here the way an operator meets it. Lines reach the file
within a second (or at reopen / exit), so every check waits for them with a deadline.
"""

from __future__ import annotations

import datetime
import json
import os
import pwd
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from helpers.backends import TcpBackend, UdpEcho
from helpers.net import free_port, recv_all
from helpers.proc import rss_kib, run_cli, socket_inodes, wait_for
from mpproxy.proxy.edge import proxy_header

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0,
                               reason='switching users needs the tests to run as root')
JSON_TIME = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
TEXT = re.compile(r'^(\S+) \[(\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000)\] (\S+) (\S+) (\S+) '
                  r'(\S+) (\d+) (\d+) (\S+) (\d+\.\d{3}) (\S+) (\S+)$')


def config(path, *listeners: dict, fmt: str = 'json', workers: int = 2, **top) -> dict:
    """The access log at `path` in `fmt`, the `listeners`, and `top`: more top-level keys."""
    return {'workers': workers, 'access_log': {'path': str(path), 'format': fmt}, **top,
            'listeners': list(listeners)}


def listener(port: int, upstream: str, name: str = 'web', protocol: str = 'tcp',
             **keys) -> dict:
    """The listener `name` on 127.0.0.1:`port` in front of `upstream`; `keys`: more keys."""
    return {'name': name, 'listen': f'127.0.0.1:{port}', 'protocol': protocol,
            'upstream': [upstream], **keys}


def lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def wait_lines(path: Path, n: int = 1, where=lambda line: True, timeout: float = 5.0) -> list[dict]:
    """The lines of `path` that match `where`, once there are at least `n` of them."""
    return wait_for(lambda: (lambda got: got if len(got) >= n else None)(
        [line for line in lines(path) if where(line)]), timeout, what=f'{n} access log line(s)')


def local(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f'{host}:{port}'


def from_source(port: int, source: str, data: bytes = b'') -> str:
    """Connect from `source`, send `data`, half-close, read to EOF or reset; our address."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source, 0))
        address = local(s)
        try:
            s.connect(('127.0.0.1', port))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            recv_all(s)
        except OSError:
            pass
        return address


class Answer(TcpBackend):
    """Reads to the client's FIN, then sends `size` bytes and closes."""

    def __init__(self, size: int):
        self.size = size
        super().__init__(self._handle)

    def _handle(self, conn):
        conn.settimeout(5)
        while conn.recv(65536):
            pass
        conn.sendall(b'a' * self.size)


@pytest.fixture
def answer():
    backend = Answer(70_000)
    yield backend
    backend.close()


def exchange(port: int, sent: int, pause: float = 0.0) -> tuple[str, int]:
    """`sent` bytes up, half-close after `pause`, read the answer: (our address, bytes got)."""
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        address = local(s)
        s.sendall(b'x' * sent)
        time.sleep(pause)                        # the connection's duration, as a client
        s.shutdown(socket.SHUT_WR)
        return address, len(recv_all(s))


# -- TCP ----------------------------------------------------------------------------------

def test_a_tcp_connection_gives_one_json_line_with_exact_counts(proxies, tmp_path, answer):
    path = tmp_path / 'access.log'
    port = free_port()
    proxies(config(path, listener(port, answer.address))).start(wait_workers=2)
    before = datetime.datetime.now(datetime.timezone.utc)
    address, got = exchange(port, 100_000, pause=0.3)
    assert got == 70_000
    (line,) = wait_lines(path)
    assert list(line) == ['time', 'listener', 'protocol', 'client', 'upstream', 'status',
                          'bytes_in', 'bytes_out', 'connect_time', 'duration']
    assert {k: line[k] for k in ('listener', 'protocol', 'client', 'upstream', 'status',
                                 'bytes_in', 'bytes_out')} == {
        'listener': 'web', 'protocol': 'tcp', 'client': address, 'upstream': answer.address,
        'status': 'ok', 'bytes_in': 100_000, 'bytes_out': 70_000}
    assert 0 <= line['connect_time'] < 1
    assert 0.3 <= line['duration'] < 5
    assert JSON_TIME.match(line['time'])
    when = datetime.datetime.fromisoformat(line['time'].replace('Z', '+00:00'))
    assert before - datetime.timedelta(seconds=1) <= when <= before + datetime.timedelta(seconds=6)


def test_the_text_format_has_the_documented_columns(proxies, tmp_path, answer):
    path = tmp_path / 'access.log'
    port = free_port()
    proxies(config(path, listener(port, answer.address), fmt='text')).start(wait_workers=2)
    address, got = exchange(port, 1234)
    assert got == 70_000
    text = wait_for(lambda: path.exists() and path.read_text(), 5, what='the line')
    match = TEXT.match(text.rstrip('\n'))
    assert match, text
    client, when, protocol, name, upstream, status, bytes_in, bytes_out, connect, _, dg_in, dg_out = \
        match.groups()
    assert (client, protocol, name, upstream, status, bytes_in, bytes_out, dg_in, dg_out) == (
        address, 'tcp', 'web', answer.address, 'ok', '1234', '70000', '-', '-')
    assert float(connect) < 1
    datetime.datetime.strptime(when, '%d/%b/%Y:%H:%M:%S %z')


def full_backlog():
    """A listening socket that takes no more connections: its accept queue is full, so the
    kernel drops further SYNs and a connect to it times out. Returns what to close."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(0)
    fillers = []
    for _ in range(16):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(server.getsockname())
        fillers.append(s)
        time.sleep(0.05)                  # pacing: each handshake lands before the next
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(server.getsockname())
        pytest.skip('this kernel answers SYNs past a full accept queue')
    except socket.timeout:
        pass
    finally:
        probe.close()
    return server, fillers


def test_refused_and_timed_out_connects(proxies, tmp_path):
    path = tmp_path / 'access.log'
    dead, slow = free_port(), free_port()
    server, fillers = full_backlog()
    try:
        black = '%s:%d' % server.getsockname()
        dead_address = f'127.0.0.1:{free_port()}'          # nothing listens there
        proxies(config(path, listener(dead, dead_address, name='dead'),
                       listener(slow, black, name='slow', connect_timeout='500ms'))).start(
            wait_workers=2)
        from_source(dead, '127.0.0.1', b'hello')
        (line,) = wait_lines(path, where=lambda l: l['listener'] == 'dead')
        assert (line['status'], line['upstream'], line['connect_time'], line['bytes_out']) == (
            'upstream_refused', dead_address, None, 0)
        assert line['bytes_in'] in (0, 5)                   # read or not before the refusal
        start = time.monotonic()
        from_source(slow, '127.0.0.1', b'hello')
        assert time.monotonic() - start >= 0.4
        (line,) = wait_lines(path, where=lambda l: l['listener'] == 'slow')
        assert (line['status'], line['upstream'], line['connect_time']) == ('timeout', black, None)
        assert 0.5 <= line['duration'] < 3
    finally:
        for s in fillers + [server]:
            s.close()


def test_idle_timeout(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxies(config(path, listener(port, tcp_echo.address, idle_timeout='1s'))).start(
        wait_workers=2)
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(b'ping')
        assert s.recv(10) == b'ping'
        assert recv_all(s) == b''                           # the proxy closes it when idle
    (line,) = wait_lines(path)
    assert (line['status'], line['bytes_in'], line['bytes_out']) == ('idle_timeout', 4, 4)
    assert 1.0 <= line['duration'] < 3


def test_denied_and_limited_clients_get_a_line_each(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxies(config(path, listener(port, tcp_echo.address, deny=['127.0.0.2/32'],
                                  max_connections_per_ip=1))).start(wait_workers=2)
    denied = from_source(port, '127.0.0.2', b'no')
    with socket.create_connection(('127.0.0.1', port), timeout=5) as held:
        held.sendall(b'ping')
        assert held.recv(10) == b'ping'                     # 127.0.0.1 holds its one connection
        limited = from_source(port, '127.0.0.1', b'no')
        found = wait_lines(path, 2)
    by_client = {line['client']: line for line in found}
    assert by_client[denied]['status'] == 'denied'
    assert by_client[limited]['status'] == 'limit'
    for line in (by_client[denied], by_client[limited]):
        assert (line['upstream'], line['bytes_in'], line['bytes_out'], line['connect_time'],
                line['duration']) == (None, 0, 0, None, 0.0)
    assert len(tcp_echo.peers) == 1


def test_the_real_client_behind_a_trusted_proxy_and_a_bad_header(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxies(config(path, listener(port, tcp_echo.address, proxy_protocol={
        'accept': True, 'trusted': ['127.0.0.1/32']}))).start(wait_workers=2)
    header = proxy_header.v1(('192.0.2.7', 4242), ('127.0.0.1', port))
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(header + b'payload')
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b'payload'
    (line,) = wait_lines(path)
    assert (line['client'], line['status'], line['bytes_in'], line['bytes_out']) == (
        '192.0.2.7:4242', 'ok', len(header) + 7, 7)
    bad = from_source(port, '127.0.0.1', b'GET / HTTP/1.0\r\n\r\n')
    (line,) = wait_lines(path, where=lambda l: l['client'] == bad)
    assert (line['status'], line['upstream']) == ('bad_header', None)


def test_sni_without_a_route(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxies(f"""
        workers: 1
        access_log: {{path: "{path}"}}
        upstreams:
          web: {{servers: ["{tcp_echo.address}"]}}
        listeners:
          - listen: "127.0.0.1:{port}"
            sni_routes: {{"www.example.com": web}}
    """).start(wait_workers=1)
    client = from_source(port, '127.0.0.1', b'not a ClientHello')
    (line,) = wait_lines(path)
    assert (line['client'], line['status'], line['upstream'], line['bytes_in']) == (
        client, 'no_route', None, 17)


# -- UDP ----------------------------------------------------------------------------------

def test_a_udp_session_gives_one_line_when_it_expires(proxies, tmp_path):
    path = tmp_path / 'access.log'
    port = free_port(socket.SOCK_DGRAM)
    upstream = UdpEcho(prefix=b'>>')
    try:
        proxies(config(path, listener(port, upstream.address, protocol='udp', name='dns',
                                      idle_timeout='1s', deny=['127.0.0.2/32']))).start(
            wait_workers=2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as denied:
            c.settimeout(3)
            c.bind(('127.0.0.1', 0))
            denied.bind(('127.0.0.2', 0))
            for size in (10, 200, 3000):
                c.sendto(b'q' * size, ('127.0.0.1', port))
                assert c.recv(5000) == b'>>' + b'q' * size
            for _ in range(3):                              # refused datagrams: no line
                denied.sendto(b'no', ('127.0.0.1', port))
            address = local(c)
            (line,) = wait_lines(path, timeout=6)
        assert line == {**line, 'listener': 'dns', 'protocol': 'udp', 'client': address,
                        'upstream': upstream.address, 'status': 'ok', 'bytes_in': 3210,
                        'bytes_out': 3216, 'datagrams_in': 3, 'datagrams_out': 3,
                        'connect_time': None}
        assert 1.0 <= line['duration'] < 4
        time.sleep(1.5)             # an observation window: nothing more may be written
        assert len(lines(path)) == 1
    finally:
        upstream.close()


def test_udp_sessions_ended_by_the_upstream_or_for_a_new_client(proxies, tmp_path, udp_echo):
    path = tmp_path / 'access.log'
    dead, full = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    dead_address = f'127.0.0.1:{free_port(socket.SOCK_DGRAM)}'      # nothing listens there
    proxies(config(path, listener(dead, dead_address, protocol='udp', name='dead'),
                   listener(full, udp_echo.address, protocol='udp', name='full',
                            idle_timeout='4s', udp={'max_sessions': 1}),
                   workers=1)).start(wait_workers=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        for s in (a, b):
            s.bind(('127.0.0.1', 0))
            s.settimeout(3)
        a.sendto(b'anyone?', ('127.0.0.1', dead))            # ICMP port unreachable ends it
        (line,) = wait_lines(path, where=lambda l: l['listener'] == 'dead')
        assert (line['client'], line['upstream'], line['status'], line['datagrams_in'],
                line['datagrams_out']) == (local(a), dead_address, 'upstream_refused', 1, 0)
        a.sendto(b'first', ('127.0.0.1', full))
        assert a.recv(100) == b'first'
        # the test: 2.5 s of silence, so a's session is no longer talking (a reply within
        # 2 s) and not yet idle (4 s)
        time.sleep(2.5)
        b.sendto(b'second', ('127.0.0.1', full))            # the table is full: a's ends
        assert b.recv(100) == b'second'
        (line,) = wait_lines(path, where=lambda l: l['listener'] == 'full')
        assert (line['client'], line['status'], line['bytes_in'], line['bytes_out']) == (
            local(a), 'limit', 5, 5)


def test_a_udp_session_handed_over_on_reload_gives_one_line_with_all_its_counts(
        proxies, tmp_path, udp_echo):
    path = tmp_path / 'access.log'
    port = free_port(socket.SOCK_DGRAM)
    proxy = proxies(config(path, listener(port, udp_echo.address, protocol='udp',
                                          idle_timeout='2s'), workers=1)).start(wait_workers=1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.bind(('127.0.0.1', 0))
        c.settimeout(3)
        for payload in (b'one', b'two'):
            c.sendto(payload, ('127.0.0.1', port))
            assert c.recv(100) == payload
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active', timeout=10)
        proxy.wait_log('took over 1 UDP session(s)', timeout=10)
        c.sendto(b'three', ('127.0.0.1', port))
        assert c.recv(100) == b'three'
        (line,) = wait_lines(path, timeout=8)
        client = local(c)
    assert len(set(udp_echo.sources)) == 1                  # one session all along
    assert (line['client'], line['status'], line['datagrams_in'], line['datagrams_out'],
            line['bytes_in'], line['bytes_out']) == (client, 'ok', 3, 3, 11, 11)
    assert line['duration'] >= 2.0
    time.sleep(1.0)                   # an observation window: nothing more may be written
    assert len(lines(path)) == 1                            # the old worker wrote none


# -- reopen -------------------------------------------------------------------------------

def worker_files(proxy) -> set[str]:
    found = set()
    for pid in proxy.workers():
        for fd in os.listdir(f'/proc/{pid}/fd'):
            try:
                found.add(os.readlink(f'/proc/{pid}/fd/{fd}'))
            except OSError:
                pass
    return found


def all_workers_opened(proxy, path: Path) -> bool:
    """Every worker has the file now at `path` open (and not only a renamed one)."""
    inode = os.stat(path).st_ino
    for pid in proxy.workers():
        inodes = set()
        for fd in os.listdir(f'/proc/{pid}/fd'):
            try:
                inodes.add(os.stat(f'/proc/{pid}/fd/{fd}').st_ino)
            except OSError:
                pass
        if inode not in inodes:
            return False
    return True


def test_s_reopen_moves_new_lines_to_a_new_file_and_loses_none(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxy = proxies(config(path, listener(port, tcp_echo.address),
                           pid_file=str(tmp_path / 'mpproxy.pid'))).start(wait_workers=2)
    idle = {pid: socket_inodes(pid) for pid in proxy.workers()}
    before = [from_source(port, '127.0.0.1', b'before %d' % i) for i in range(4)]
    # their relays are gone (each worker holds the sockets it held before them); their
    # lines wait in the buffer (1 s)
    wait_for(lambda: all(socket_inodes(w) <= idle[w] for w in idle), 5,
             what='the relays of the connections to close')
    rotated = tmp_path / 'access.log.1'
    os.rename(path, rotated)
    result = run_cli('-c', str(proxy.config_path), '-s', 'reopen')
    assert result.returncode == 0, result.stderr
    wait_for(lambda: path.exists() and all_workers_opened(proxy, path), 5,
             what='the workers to open the new file')
    after = [from_source(port, '127.0.0.1', b'after %d' % i) for i in range(4)]
    wait_lines(path, 4)
    assert sorted(l['client'] for l in lines(rotated)) == sorted(before)
    assert sorted(l['client'] for l in lines(path)) == sorted(after)
    assert 'cannot reopen' not in proxy.log()


@ROOT_ONLY
def test_usr1_reopen_with_workers_as_nobody(proxies, open_dir, tcp_echo):
    """As nginx: the master creates the new file and gives it to the workers' user."""
    uid = pwd.getpwnam('nobody').pw_uid
    path = open_dir / 'access.log'
    port = free_port()
    proxy = proxies(config(path, listener(port, tcp_echo.address), user='nobody'))
    proxy.start(wait_workers=2)
    assert os.stat(path).st_uid == uid                      # made by the master before the fork
    first = from_source(port, '127.0.0.1', b'first')
    wait_lines(path)
    rotated = open_dir / 'access.log.1'
    os.rename(path, rotated)
    proxy.signal(signal.SIGUSR1)
    wait_for(lambda: path.exists() and all_workers_opened(proxy, path), 5,
             what='the workers to open the new file')
    assert os.stat(path).st_uid == uid
    second = from_source(port, '127.0.0.1', b'second')
    (line,) = wait_lines(path)
    assert line['client'] == second
    assert [l['client'] for l in lines(rotated)] == [first]
    assert 'cannot reopen' not in proxy.log()


# -- stopping -----------------------------------------------------------------------------

def test_no_line_is_lost_at_quit(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxy = proxies(config(path, listener(port, tcp_echo.address),
                           shutdown_timeout='10s')).start(wait_workers=2)
    done = [from_source(port, '127.0.0.1', b'x' * i) for i in range(30)]
    open_ones = [socket.create_connection(('127.0.0.1', port), timeout=5) for _ in range(3)]
    still_open = [local(s) for s in open_ones]
    for s in open_ones:
        s.sendall(b'ping')
        assert s.recv(10) == b'ping'
    proxy.signal(signal.SIGQUIT)
    proxy.wait_log('graceful shutdown')
    for s in open_ones:                                     # they finish during the drain
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b''
        s.close()
    assert proxy.wait_exit(15) == 0
    found = lines(path)
    assert sorted(l['client'] for l in found) == sorted(done + still_open)
    assert all(l['status'] == 'ok' for l in found)


def test_no_line_is_lost_at_term_for_connections_cut_open(proxies, tmp_path, tcp_echo):
    path = tmp_path / 'access.log'
    port = free_port()
    proxy = proxies(config(path, listener(port, tcp_echo.address))).start(wait_workers=2)
    held = []
    for _ in range(6):
        s = socket.create_connection(('127.0.0.1', port), timeout=5)
        s.sendall(b'ping')
        assert s.recv(10) == b'ping'
        held.append(s)
    try:
        proxy.signal(signal.SIGTERM)
        assert proxy.wait_exit(10) == 0
        found = lines(path)
        assert sorted(l['client'] for l in found) == sorted(local(s) for s in held)
        assert all((l['bytes_in'], l['bytes_out']) == (4, 4) for l in found)
    finally:
        for s in held:
            s.close()


# -- floods -------------------------------------------------------------------------------

def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the TCP listener on 127.0.0.1:`port`."""
    out = subprocess.run(['ss', '-ltnH', f'sport = :{port}'], capture_output=True,
                         text=True).stdout
    return int(out.split()[1])                              # Recv-Q of a listener


def denied_flood(port: int, count: int) -> None:
    linger = struct.pack('ii', 1, 0)
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)   # no TIME_WAIT here
        s.settimeout(5)
        try:
            s.connect(('127.0.0.1', port))
        except OSError:
            pass
        s.close()


def test_a_flood_of_denied_clients_to_a_stuck_log_keeps_memory_bounded(proxies, tmp_path,
                                                                       tcp_echo):
    """The log is a FIFO whose reader reads nothing: lines wait up to 1 MiB, then are dropped
    (counted, rate-logged); the worker's memory stops growing and it goes on serving."""
    fifo = tmp_path / 'access.fifo'
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        port = free_port()
        proxy = proxies(config(fifo, listener(port, tcp_echo.address, deny=['127.0.0.1/32']),
                               workers=1)).start(wait_workers=1)
        (worker,) = proxy.workers()
        denied_flood(port, 8000)        # ~1.6 MB of lines: the pipe and the 1 MiB buffer fill
        proxy.wait_log('line(s) dropped', timeout=10)
        before = rss_kib(worker)
        denied_flood(port, 16000)       # ~3 MB more
        wait_for(lambda: accept_queue(port) == 0, 10,       # the worker takes the last of
                 what='the accept queue to drain')          # the backlog
        grown = rss_kib(worker) - before
        assert grown < 1024, f'the worker grew by {grown} KiB'
        data = b''
        quiet_since = time.monotonic()
        deadline = quiet_since + 15
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 1.5:
            try:                                            # the reader catches up: the
                chunk = os.read(reader, 1 << 16)            # worker writes as fast as it reads
            except BlockingIOError:
                chunk = b''
            if chunk:
                data += chunk
                quiet_since = time.monotonic()
            else:
                time.sleep(0.02)                            # the reader's polling interval
        got = [json.loads(line) for line in data.splitlines()]   # whole lines only
        assert all(l['status'] == 'denied' for l in got)
        assert 5000 < len(got) < 24000                      # about 1 MiB + the pipe's 64 KiB
        assert 'Traceback' not in proxy.log()
    finally:
        os.close(reader)
