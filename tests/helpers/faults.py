"""Real faults for the fault suite: fork() that fails, a full disk, no files, no memory.

Each mechanism is a small context manager that undoes itself on exit, also when the test
fails; the ones the machine may lack (a pids cgroup, a tmpfs mount) have a pytest fixture
that skips the test and says which mechanism is missing.

- `PidsCgroup`: a child cgroup of a pids hierarchy (cgroup v1 `pids`, or cgroup v2 with
  `pids` in the root's cgroup.controllers). `add(pid)` moves a process in (children it forks
  later are born in it; the ones it forked before stay where they are), `clamp()` sets
  pids.max to the tasks now in it so that any fork() or clone() fails with EAGAIN, `lift()`
  sets `max` again.
- `FullTmpfs`: a 1 MiB tmpfs; `fill()` writes a filler file until ENOSPC, `free()` removes it.
- `NofileClamp`: the soft RLIMIT_NOFILE of a running process (prlimit) at its lowest free fd,
  so its next open(), socket() or accept() fails with EMFILE.
- `AddressSpaceClamp`: the soft RLIMIT_AS of a running process at its VmSize plus a margin,
  so that a large allocation fails with MemoryError.

Their fixtures (`pids_cgroup`, `full_tmpfs`) are in tests/conftest.py. Plus the few
config and traffic helpers the scenarios share.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers.configs import listener
from helpers.proc import alive, cmdline, wait_for


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _write(path, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text)


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo (spaces and the like are written \\040)."""
    return re.sub(r'\\([0-7]{3})', lambda m: chr(int(m.group(1), 8)), field)


def _mounts():
    """(mount root, mount point, fs type, super options) of every mount of this process."""
    with open('/proc/self/mountinfo') as f:
        for line in f:
            fields = line.split()
            sep = fields.index('-')
            yield fields[3], _unescape(fields[4]), fields[sep + 1], fields[sep + 3]


# -- fork() fails: a pids cgroup ------------------------------------------------------------

class PidsCgroup:
    """A uniquely named pids cgroup; see the module docstring. Threads count as tasks."""

    def __init__(self):
        self.version, self.mount, self.mount_root = self._find()
        self.path: Path | None = None
        self.origins: dict[int, Path] = {}         # pid -> the cgroup it was moved from

    @staticmethod
    def _find() -> tuple[int, Path, str]:
        """(version, mount point, mount root) of a usable pids hierarchy; pytest.skip if none."""
        seen = []
        for root, point, fstype, options in _mounts():
            if fstype == 'cgroup2':
                try:
                    controllers = _read(Path(point) / 'cgroup.controllers').split()
                except OSError:
                    continue
                if 'pids' in controllers:
                    return 2, Path(point), root
                seen.append(f'cgroup2 at {point} has no pids controller '
                            f'(controllers: {" ".join(controllers) or "none"})')
            elif fstype == 'cgroup' and 'pids' in options.split(','):
                return 1, Path(point), root
        pytest.skip('fork-failure mechanism missing: no cgroup v1 `pids` hierarchy mounted and '
                    'no cgroup2 mount offering the pids controller'
                    + (f' ({"; ".join(seen)})' if seen else ''))

    def __enter__(self) -> 'PidsCgroup':
        parent = self.mount
        if self.version == 2:
            control = parent / 'cgroup.subtree_control'
            try:
                if 'pids' not in _read(control).split():
                    _write(control, '+pids')       # left enabled afterwards: harmless
            except OSError as exc:
                pytest.skip(f'fork-failure mechanism missing: cannot enable the pids controller '
                            f'in {control}: {exc.strerror}')
        path = parent / f'mpproxy-fault-{os.getpid()}-{uuid.uuid4().hex[:8]}'
        try:
            path.mkdir()
        except OSError as exc:
            pytest.skip(f'fork-failure mechanism missing: cannot create a pids cgroup in '
                        f'{parent}: {exc.strerror}')
        self.path = path
        if not (path / 'pids.max').exists():
            self.close()
            pytest.skip(f'fork-failure mechanism missing: {path} has no pids.max')
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _origin(self, pid: int) -> Path:
        """The directory of the pids cgroup `pid` is in now (the hierarchy root if unknown)."""
        try:
            lines = _read(f'/proc/{pid}/cgroup').splitlines()
        except OSError:
            return self.mount
        for line in lines:
            _, controllers, rel = line.split(':', 2)
            if (self.version == 2 and line.startswith('0::')) or \
                    (self.version == 1 and 'pids' in controllers.split(',')):
                if self.mount_root != '/' and rel.startswith(self.mount_root):
                    rel = rel[len(self.mount_root):]
                where = self.mount / rel.lstrip('/')
                return where if where.is_dir() else self.mount
        return self.mount

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the cgroup."""
        self.origins[pid] = self._origin(pid)
        _write(self.path / 'cgroup.procs', str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in _read(self.path / 'cgroup.procs').split()]
        except FileNotFoundError:
            return []

    def current(self) -> int:
        return int(_read(self.path / 'pids.current'))

    def clamp(self) -> int:
        """pids.max = the tasks now in the cgroup: the next fork() of any of them fails."""
        now = self.current()
        _write(self.path / 'pids.max', str(now))
        return now

    def lift(self) -> None:
        _write(self.path / 'pids.max', 'max')

    def close(self, timeout: float = 5.0) -> None:
        """Lift, move every process left back where it came from, remove the cgroup."""
        if self.path is None:
            return
        path, self.path = self.path, None
        try:
            _write(path / 'pids.max', 'max')
        except OSError:
            pass
        fallback = next(iter(self.origins.values()), self.mount)
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = [int(p) for p in _read(path / 'cgroup.procs').split()]
            except FileNotFoundError:
                return
            for pid in left:
                try:
                    _write(self.origins.get(pid, fallback) / 'cgroup.procs', str(pid))
                except OSError as exc:
                    if exc.errno != errno.ESRCH:          # it exited meanwhile: fine
                        try:
                            _write(self.mount / 'cgroup.procs', str(pid))
                        except OSError:
                            pass
            try:
                path.rmdir()
                return
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                    raise AssertionError(f'cannot remove the test cgroup {path}: {exc.strerror}; '
                                         f'processes left: {left}') from None
            time.sleep(0.05)          # polling interval: a zombie's charge goes when it is reaped


# -- ENOSPC: a small full tmpfs -------------------------------------------------------------

class FullTmpfs:
    """A tmpfs of `size` mounted on `<base>/tmpfs`; `fill()` it until ENOSPC, `free()` it."""

    def __init__(self, base: Path, size: str = '1m'):
        self.dir = Path(base) / 'tmpfs'
        self.size = size
        self.mounted = False
        self.filler = self.dir / '.filler'

    def __enter__(self) -> 'FullTmpfs':
        if os.geteuid() != 0:
            pytest.skip('disk-full mechanism missing: mounting a tmpfs needs root')
        if shutil.which('mount') is None:
            pytest.skip('disk-full mechanism missing: no `mount` command')
        self.dir.mkdir()
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={self.size},mode=0755',
                                 'mpproxy-faults', str(self.dir)],
                                capture_output=True, text=True, timeout=10)
        if result.returncode != 0:
            self.dir.rmdir()
            pytest.skip(f'disk-full mechanism missing: cannot mount a tmpfs on {self.dir}: '
                        f'{result.stderr.strip() or result.returncode}')
        self.mounted = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fill(self, top_up=()) -> int:
        """Write the filler until ENOSPC; then append newlines to each file in `top_up` until
        ENOSPC too (tmpfs allocates whole pages: a file's last page takes appends on a full
        disk until it is full). Returns the bytes written."""
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            written += _write_until_full(fd, b'\0')
        finally:
            os.close(fd)
        for path in top_up:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                written += _write_until_full(fd, b'\n')
            finally:
                os.close(fd)
        assert os.statvfs(self.dir).f_bavail == 0, 'the tmpfs is not full'
        return written

    def free(self) -> None:
        try:
            self.filler.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if not self.mounted:
            return
        self.mounted = False
        result = subprocess.run(['umount', str(self.dir)], capture_output=True, timeout=10)
        if result.returncode != 0:                 # still busy: detach it now, it goes later
            subprocess.run(['umount', '-l', str(self.dir)], capture_output=True, timeout=10)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def _write_until_full(fd: int, byte: bytes) -> int:
    written, chunk = 0, 1 << 20
    while chunk:
        try:
            n = os.write(fd, byte * chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            chunk //= 2
            continue
        written += n
        if n < chunk:
            chunk = n
    return written


# -- EMFILE: RLIMIT_NOFILE of a running process ---------------------------------------------

def open_fds(pid: int) -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f'/proc/{pid}/fd'))


def lowest_free_fd(pid: int) -> int:
    used = set(open_fds(pid))
    fd = 0
    while fd in used:
        fd += 1
    return fd


class RlimitClamp:
    """One resource limit of a running process (prlimit), put back by `restore()` and on exit;
    subclasses name the resource and say how `clamp()` lowers it."""

    RESOURCE: int

    def __init__(self, pid: int):
        self.pid = pid
        self.saved = resource.prlimit(pid, self.RESOURCE)

    def restore(self) -> None:
        try:
            resource.prlimit(self.pid, self.RESOURCE, self.saved)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class NofileClamp(RlimitClamp):
    """`clamp()`: the soft open-files limit of `pid` at its lowest free fd (the number of its
    open fds when they are numbered without gaps), so no new fd fits."""

    RESOURCE = resource.RLIMIT_NOFILE

    def clamp(self) -> int:
        limit = lowest_free_fd(self.pid)
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (limit, self.saved[1]))
        return limit


# -- MemoryError: RLIMIT_AS of a running process --------------------------------------------

def vm_size(pid: int) -> int:
    """The address space of `pid`, bytes."""
    for line in _read(f'/proc/{pid}/status').splitlines():
        if line.startswith('VmSize:'):
            return int(line.split()[1]) * 1024
    raise AssertionError(f'no VmSize for pid {pid}')


class AddressSpaceClamp(RlimitClamp):
    """`clamp(margin)`: the soft RLIMIT_AS of `pid` at its VmSize now plus `margin` bytes."""

    RESOURCE = resource.RLIMIT_AS

    def clamp(self, margin: int = 30 << 20) -> int:
        limit = vm_size(self.pid) + margin
        hard = self.saved[1]
        if hard != resource.RLIM_INFINITY and limit > hard:
            limit = hard
        resource.prlimit(self.pid, resource.RLIMIT_AS, (limit, hard))
        return limit


# -- config and traffic helpers -------------------------------------------------------------

def config(ports_upstreams, workers: int = 2, **top) -> dict:
    """A config with one TCP listener per (port, upstream address); `top`: more top-level
    keys."""
    return {'workers': workers, 'shutdown_timeout': '2s', **top,
            'listeners': [listener(port, [upstream]) for port, upstream in ports_upstreams]}


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(('127.0.0.1', port), timeout=timeout)


def echo_roundtrip(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send `payload`, half-close, read to EOF (small payloads: no sender thread needed)."""
    with connect(port, timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b''.join(chunks)
            chunks.append(data)


def serves(port: int, times: int = 1) -> bool:
    """`times` echo connections in a row through `port` all come back intact."""
    for i in range(times):
        payload = b'fault suite %d' % i
        got = echo_roundtrip(port, payload)
        assert got == payload, (payload, got)
    return True


def refuses(port: int) -> bool:
    """Nothing listens on `port`: a connection to it is refused."""
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def first_byte(port: int) -> bytes:
    with connect(port) as sock:
        return sock.recv(1)


def worker_slot(pid: int) -> int:
    match = re.match(r'mpproxy: worker (\d+) ', cmdline(pid))
    assert match, cmdline(pid)
    return int(match.group(1))


def stop_pid(pid: int | None, timeout: float = 5.0) -> None:
    """TERM a process that is not our child (a new master from USR2), then KILL it."""
    if not pid or not alive(pid):
        return
    try:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), timeout, what=f'pid {pid} to stop')
    except ProcessLookupError:
        return
    except AssertionError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the master and its log -----------------------------------------------------------------

def expect_log(proxy, pattern: str, timeout: float = 10.0, count: int = 1) -> str:
    """Wait until the regex `pattern` matches `count` times in `proxy`'s log; the log. Fails
    at once, with the log's tail, if the master exits first."""
    rx = re.compile(pattern)

    def seen():
        text = proxy.log()
        if len(rx.findall(text)) >= count:
            return text
        if proxy.proc.poll() is not None:
            raise AssertionError(f'the master exited (code {proxy.proc.returncode}) before '
                                 f'{pattern!r} was logged; log tail:\n{text[-3000:]}')
        return None
    return wait_for(seen, timeout, what=f'{pattern!r} in the log')


def assert_alive(proxy) -> None:
    assert proxy.proc.poll() is None, (f'the master exited (code {proxy.proc.returncode}); '
                                       f'log tail:\n{proxy.log()[-3000:]}')
