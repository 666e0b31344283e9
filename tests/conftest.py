"""Shared test helpers: start the real `mpproxy` command, real backends, wait for conditions.

Everything started here is stopped by pid in the fixture's teardown, also when a
test fails; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from mpproxy.proxy.edge import proxy_header

ROOT = Path(__file__).resolve().parent.parent


def client_hello(server_name=None) -> bytes:
    """The ClientHello Python's ssl module sends for `server_name` (a real TLS client's)."""
    import ssl
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, what: str = 'condition'):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)


def free_port(kind=socket.SOCK_STREAM, host='127.0.0.1') -> int:
    """A port free for both TCP and UDP on `host` right now."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(family, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError('no free port')


def children(pid: int) -> list[int]:
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode().strip()
    except OSError:
        return ''


def alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        return state != 'Z'
    except OSError:
        return False


def port_free(port: int, host: str = '127.0.0.1') -> bool:
    """True when a TCP socket can bind `port` now (nothing holds it any more)."""
    try:
        with socket.socket() as s:
            s.bind((host, port))
        return True
    except OSError:
        return False


def fd_count(pid: int) -> int:
    return len(os.listdir(f'/proc/{pid}/fd'))


def rss_kib(pid: int) -> int:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


class Proxy:
    """A running `mpproxy` master started from the command line with a config file."""

    def __init__(self, tmp_path: Path, config: str, name: str = 'mpproxy', args=(), env=None):
        self.dir = tmp_path
        self.config_path = tmp_path / f'{name}.yaml'
        self.log_path = tmp_path / f'{name}.log'
        self.write_config(config)
        self.args = list(args)
        self.env = env                    # extra environment variables for the master
        self.proc: subprocess.Popen | None = None
        self.known_pids: set[int] = set()

    def write_config(self, text: str) -> None:
        self.config_path.write_text(textwrap.dedent(text))

    def command(self, *extra) -> list[str]:
        return [sys.executable, '-m', 'mpproxy', '-c', str(self.config_path), *extra]

    def start(self, wait_workers: int | None = None, timeout: float = 10.0) -> 'Proxy':
        self._log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(self.command(*self.args), stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL, cwd=self.dir,
                                     env={**os.environ, **self.env} if self.env else None)
        self.known_pids.add(self.proc.pid)
        wait_for(lambda: 'mpproxy started' in self.log() or self.proc.poll() is not None,
                 timeout, what='mpproxy to start')
        if self.proc.poll() is not None:
            raise AssertionError(f'mpproxy exited with {self.proc.returncode}:\n{self.log()}')
        if wait_workers:
            self.wait_ready(wait_workers, timeout)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')
        except FileNotFoundError:
            return ''

    def wait_log(self, text: str, timeout: float = 5.0, count: int = 1) -> str:
        wait_for(lambda: self.log().count(text) >= count, timeout, what=f'{text!r} in the log')
        return self.log()

    def workers(self) -> list[int]:
        pids = [p for p in children(self.pid) if cmdline(p).startswith('mpproxy: worker')]
        self.known_pids.update(pids)
        return pids

    def serving_workers(self) -> list[int]:
        return [p for p in self.workers() if 'draining' not in cmdline(p)]

    def wait_ready(self, n: int, timeout: float = 10.0) -> list[int]:
        """Wait until n workers serve and each has sent its readiness (they log nothing, so
        we check their listening sockets are being served: the title is set after boot)."""
        return wait_for(lambda: (lambda w: w if len(w) == n else None)(self.serving_workers()),
                        timeout, what=f'{n} serving workers')

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.workers()
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        for pid in self.known_pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


@pytest.fixture
def proxies(tmp_path):
    """Factory: proxies(config_text) -> Proxy (not started); all are stopped at teardown."""
    made: list[Proxy] = []

    def make(config: str, name: str = 'mpproxy', args=(), env=None) -> Proxy:
        proxy = Proxy(tmp_path, config, name=name, args=args, env=env)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.cleanup()
        print(f'--- {proxy.log_path} ---\n{proxy.log()[-4000:]}')   # shown when the test fails


@pytest.fixture
def open_dir():
    """A directory everyone can reach but only root may write (pytest's tmp_path is
    root's alone): for files that a process running as nobody must read."""
    path = Path(tempfile.mkdtemp(prefix='mpproxy-open-'))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_cli(*args, timeout: float = 20.0, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'mpproxy', *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


# -- backends ------------------------------------------------------------------------------

class TcpBackend:
    """A threaded TCP server on loopback; `handler(conn)` runs per connection in a thread."""

    def __init__(self, handler, host='127.0.0.1', port=0):
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.handler = handler
        self.peers: list[tuple] = []
        self.conns: list[socket.socket] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f'[{self.host}]:{self.port}' if ':' in self.host else f'{self.host}:{self.port}'

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def echo_handler(conn: socket.socket):
    """Echo until the client's FIN, then FIN back."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class HeaderEcho(TcpBackend):
    """Reads a PROXY header (if any) off each connection, records it, echoes the rest."""

    def __init__(self, host='127.0.0.1'):
        self.headers: list = []             # (ProxyHeader or None, the raw bytes)
        super().__init__(self._handle, host)

    def _handle(self, conn: socket.socket):
        conn.settimeout(5)
        data = b''
        while True:
            state, header, used, _ = proxy_header.parse(data)
            if state != proxy_header.MORE:
                break
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        if state == proxy_header.DONE:
            self.headers.append((header, data[:used]))
            data = data[used:]
        else:
            self.headers.append((None, b''))
        if data:
            conn.sendall(data)
        echo_handler(conn)


@pytest.fixture
def header_echo():
    backend = HeaderEcho()
    yield backend
    backend.close()



class UdpServer:
    """A UDP server in a thread: `answer(data, addr)` returns the reply, or None for none."""

    def __init__(self, host='127.0.0.1', port=0):
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f'[{self.host}]:{self.port}' if ':' in self.host else f'{self.host}:{self.port}'

    def answer(self, data: bytes, addr) -> bytes | None:
        raise NotImplementedError

    def _run(self):
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self.answer(data, addr)
            if reply is not None:
                try:
                    self.sock.sendto(reply, addr)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


class UdpEcho(UdpServer):
    """A UDP echo server; records the source address of every datagram.

    `tag_source`: each reply starts with `<source port>|`, so a client can tell which
    upstream socket (session) carried its datagram.
    """

    def __init__(self, host='127.0.0.1', prefix=b'', port=0, tag_source=False):
        self.prefix = prefix
        self.tag_source = tag_source
        self.sources: list[tuple] = []
        super().__init__(host, port)

    def answer(self, data: bytes, addr) -> bytes:
        self.sources.append(addr)
        tag = b'%d|' % addr[1] if self.tag_source else b''
        return tag + self.prefix + data


@pytest.fixture
def tcp_echo():
    backend = TcpBackend(echo_handler)
    yield backend
    backend.close()


@pytest.fixture
def udp_echo():
    backend = UdpEcho()
    yield backend
    backend.close()


class ListHandler(logging.Handler):
    """Keeps every log record (unit tests of code that logs)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def log_records():
    """Every record mpproxy's logger emits during the test, at any level."""
    from mpproxy.observe import log as logmod
    handler = ListHandler()
    logmod.log.addHandler(handler)
    old = logmod.log.level
    logmod.log.setLevel(logging.DEBUG)
    yield handler.records
    logmod.log.removeHandler(handler)
    logmod.log.setLevel(old)


def run_loop_until(loop, cond, timeout: float = 5.0, what: str = 'condition',
                   step: float = 0.001) -> None:
    """Run `loop` until `cond()` holds (checked every `step` s); AssertionError after `timeout`."""
    async def wait():
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError('timed out waiting for ' + what)
            await asyncio.sleep(step)
    loop.run_until_complete(wait())


def serve_env(env):
    """The body of a unit test's `env` fixture (`yield from serve_env(Env())`): yields it,
    closes it, then fails the test if its loop reported an error."""
    try:
        yield env
    finally:
        errors = env.loop_errors
        env.close()
    assert not errors, errors
