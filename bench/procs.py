"""Processes of the benchmark: start (optionally pinned with taskset), wait for ports, stop by pid.

The pids of the processes started here that still run are kept in `<workdir>/pids`, so
scripts/bench can still stop what this Python process could not (it is killed itself, say).
A stopped process leaves the file at once, so no pid there can have been reused by another
program. Nothing is ever stopped by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


class Procs:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.live: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], cpu: str | None = None, **kw) -> subprocess.Popen:
        """Start `argv` (on CPUs `cpu` when given); stdout/stderr go to <workdir>/<name>.log."""
        if cpu is not None:
            argv = ['taskset', '-c', cpu] + argv
        log = open(self.workdir / f'{name}.log', 'ab')
        kw.setdefault('stdout', log)
        kw.setdefault('stderr', log)
        kw.setdefault('stdin', subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        log.close()
        proc.bench_name = name
        self.live.append(proc)
        self._record()
        return proc

    def _record(self) -> None:
        tmp = self.workdir / 'pids.tmp'
        tmp.write_text(''.join(f'{p.pid}\n' for p in self.live))
        os.replace(tmp, self.workdir / 'pids')

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> None:
        """TERM, wait up to `timeout`, then KILL. Only ever the pid we started."""
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except ProcessLookupError:
                pass
        if proc in self.live:
            self.live.remove(proc)
            self._record()

    def stop_all(self) -> None:
        for proc in reversed(list(self.live)):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 8) -> str:
        path = self.workdir / f'{name}.log'
        if not path.exists():
            return ''
        return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:])


def port_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT leftovers are fine
    try:
        s.bind(('127.0.0.1', port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def listening(port: int) -> bool:
    """True when a TCP socket listens on 127.0.0.1:port (read from /proc, no connection made)."""
    want = f'0100007F:{port:04X}'
    for table in ('/proc/net/tcp',):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want and fields[3] == '0A':
                    return True
    return False


def wait_tcp(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None,
             connect: bool = True) -> bool:
    """True once 127.0.0.1:port listens (and, with `connect`, accepts a connection)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if not connect:
                if listening(port):
                    return True
            else:
                socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def udp_ping(port: int, timeout: float = 5.0, payload: bytes = b'ping') -> bool:
    """True once a datagram to 127.0.0.1:port comes back unchanged."""
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(('127.0.0.1', port))
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            try:
                s.send(payload)
                if s.recv(2048) == payload:
                    return True
            except OSError:
                time.sleep(0.05)
        return False
    finally:
        s.close()


def http_get(port: int, timeout: float = 3.0) -> bytes:
    """One HTTP/1.1 GET to 127.0.0.1:port; the raw response (until the peer closes)."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as s:
        s.sendall(b'GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n')
        data = b''
        while chunk := s.recv(65536):
            data += chunk
        return data


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid`."""
    out = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f'/proc/{entry}/stat').read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(')') + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def rss_kib(pid: int) -> int:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
    raise RuntimeError(f'no VmRSS for pid {pid}')


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f'/proc/{pid}/stat').read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(')') + 2:].split()
        total += int(fields[11]) + int(fields[12])          # utime, stime
    return total / os.sysconf('SC_CLK_TCK')


def cmdline(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode().strip()
    except OSError:
        return ''
