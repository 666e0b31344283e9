"""The real `mpproxy` command and its processes: `Proxy` (a master started from the command
line with a config file), `run_cli`, `wait_for` (every wait has a deadline) and what /proc
tells about a process: its children, title, liveness, fds, memory, sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers.configs import render

ROOT = Path(__file__).resolve().parents[2]          # the repository


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


def workers_of(pid: int) -> list[int]:
    """The worker processes of master `pid` now."""
    return [p for p in children(pid) if cmdline(p).startswith('mpproxy: worker')]


def alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        return state != 'Z'
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


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            target = os.readlink(f'/proc/{pid}/fd/{fd}')
        except OSError:
            continue
        if target.startswith('socket:['):
            inodes.add(target[8:-1])
    return inodes


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (from /proc/net/tcp)."""
    with open('/proc/net/tcp') as f:
        rows = [r.split() for r in f.read().splitlines()[1:]]
    return {r[9] for r in rows if r[3] == '0A' and int(r[1].split(':')[1], 16) == port}


def read_pid(path) -> int | None:
    """The pid in a pid file, or None when there is none (yet)."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class Proxy:
    """A running `mpproxy` master started from the command line with a config file.

    `config` is a dict (rendered to YAML, see helpers.configs) or the YAML text itself.
    """

    def __init__(self, tmp_path: Path, config, name: str = 'mpproxy', args=(), env=None):
        self.dir = tmp_path
        self.config_path = tmp_path / f'{name}.yaml'
        self.log_path = tmp_path / f'{name}.log'
        self.write_config(config)
        self.args = list(args)
        self.env = env                    # extra environment variables for the master
        self.proc: subprocess.Popen | None = None
        self.known_pids: set[int] = set()

    def write_config(self, config) -> None:
        text = render(config) if isinstance(config, dict) else textwrap.dedent(config)
        self.config_path.write_text(text)

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
        pids = workers_of(self.pid)
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

    def upgrade(self, pid_file, workers: int = 0, timeout: float = 10.0) -> int:
        """USR2: the new master's pid, once it wrote `pid_file` and logged that it started
        (with `workers`, once that many of its workers run). Its pid and its workers' are
        known: `cleanup` kills what is left of them; `stop_master` stops it gracefully."""
        old, started = self.pid, self.log().count('mpproxy started')
        self.signal(signal.SIGUSR2)
        new = wait_for(lambda: (lambda p: p if p not in (None, old) else None)(read_pid(pid_file)),
                       timeout, what='the new master to write the pid file')
        self.known_pids.add(new)
        self.wait_log('mpproxy started', count=started + 1, timeout=timeout)
        if workers:
            self.known_pids.update(wait_for(lambda: (lambda w: w if len(w) == workers else None)(
                workers_of(new)), timeout,
                what=f"the new master's {workers} workers"))
        return new

    @staticmethod
    def stop_master(pid: int | None, sig: int | None = None, timeout: float = 15.0) -> None:
        """Stop another master (a binary upgrade's new one) with `sig` (QUIT), if it runs;
        SIGKILL after `timeout` (a cleanup: it never hides the test's own failure)."""
        if not pid or not alive(pid):
            return
        try:
            os.kill(pid, signal.SIGQUIT if sig is None else sig)
            wait_for(lambda: not alive(pid), timeout, what=f'master {pid} to stop')
        except ProcessLookupError:
            pass
        except AssertionError:
            os.kill(pid, signal.SIGKILL)

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


def assert_clean(proxy: Proxy) -> None:
    """The proxy's log shows no traceback, unexpected error or crash."""
    log = proxy.log()
    assert 'Traceback' not in log and 'unexpected error' not in log and 'crashed' not in log, log


def run_cli(*args, timeout: float = 20.0, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'mpproxy', *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
