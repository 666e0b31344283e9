"""A real systemd as PID 1: a Debian rootfs made by debootstrap, booted by systemd-nspawn,
with mpproxy installed in it the way the README says (tests/systemd).

- `why_not()`: why this machine cannot boot a container at all (not root, no tools), or None.
- `rootfs()`: the Debian tree, made once and kept under CACHE, keyed by the debootstrap
  command; `wheels()`: mpproxy's dependencies for the container's Python, from the package
  registry through this interpreter's pip, kept there too (the container has no network).
- `Container`: boots that tree with `--volatile=overlay` (the cached tree is never written:
  every change lands in a tmpfs that goes with the container) and `--private-network` (its
  own loopback), runs commands inside it with `nsenter`, and stops it by pid.

The boot needs the unified cgroup hierarchy inside the container
(SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1, also on a host that mounts the hybrid one), and, on a
host whose PID 1 is not systemd, `--keep-unit --register=no` (nothing to register with).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.proc import children

CACHE = Path(os.environ.get('MPPROXY_SYSTEMD_CACHE', '/var/cache/mpproxy-systemd'))
SUITE = 'bookworm'
PACKAGES = ('systemd', 'systemd-sysv', 'dbus', 'python3', 'python3-venv')
DEBOOTSTRAP = ['debootstrap', '--variant=minbase', '--include=' + ','.join(PACKAGES), SUITE]
CONTAINER_PYTHON = '3.11'           # bookworm's python3
TOOLS = ('debootstrap', 'systemd-nspawn', 'nsenter')
INSIDE_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
BOOT_TIMEOUT = 60.0


class CannotBoot(Exception):
    """This machine cannot boot the container (not a failure of what is tested)."""


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path='/usr/sbin:/sbin')


def why_not() -> str | None:
    if not sys.platform.startswith('linux'):
        return 'not Linux'
    if os.geteuid() != 0:
        return 'systemd-nspawn needs root'
    missing = [name for name in TOOLS if _tool(name) is None]
    if missing:
        return f'{", ".join(missing)} not installed (Debian: apt-get install debootstrap ' \
               f'systemd-container)'
    return None


def _key(*parts: str) -> str:
    return hashlib.sha256('\0'.join(parts).encode()).hexdigest()[:16]


def _locked(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / f'{name}.lock', 'w')
    fcntl.flock(lock, fcntl.LOCK_EX)          # another run making the same thing waits
    return lock


def rootfs(log) -> Path:
    """The cached Debian tree; made by debootstrap (about a minute) when missing."""
    key = _key(*DEBOOTSTRAP, os.uname().machine)
    root = CACHE / f'rootfs-{key}'
    if (root / '.complete').exists():
        return root
    with _locked(f'rootfs-{key}'):
        if (root / '.complete').exists():
            return root
        work = CACHE / f'rootfs-{key}.partial'
        shutil.rmtree(work, ignore_errors=True)
        log(f'making the Debian rootfs: {" ".join(DEBOOTSTRAP)} (about a minute, once)')
        started = time.monotonic()
        result = subprocess.run([_tool('debootstrap'), *DEBOOTSTRAP[1:], str(work)],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=900)
        if result.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f'debootstrap failed ({result.returncode}):\n'
                               f'{(result.stdout + result.stderr)[-3000:]}')
        (work / '.complete').write_text(' '.join(DEBOOTSTRAP) + '\n')
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
        log(f'rootfs made in {time.monotonic() - started:.0f}s: {root}')
    return root


def wheels(requirements: list[str], log) -> Path:
    """Wheels of `requirements` for the container's CPython, downloaded once."""
    arch = os.uname().machine
    platforms = [f'manylinux2014_{arch}', f'manylinux_2_28_{arch}']
    key = _key(CONTAINER_PYTHON, *platforms, *requirements)
    where = CACHE / f'wheels-{key}'
    if (where / '.complete').exists():
        return where
    with _locked(f'wheels-{key}'):
        if (where / '.complete').exists():
            return where
        shutil.rmtree(where, ignore_errors=True)
        log(f'downloading wheels for Python {CONTAINER_PYTHON}: {" ".join(requirements)}')
        args = [sys.executable, '-m', 'pip', 'download', '--quiet', '--disable-pip-version-check',
                '--only-binary=:all:', '--python-version', CONTAINER_PYTHON,
                '--implementation', 'cp', '--abi', f'cp{CONTAINER_PYTHON.replace(".", "")}',
                '-d', str(where)]
        for platform in platforms:
            args += ['--platform', platform]
        result = subprocess.run(args + requirements, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            shutil.rmtree(where, ignore_errors=True)
            raise RuntimeError(f'pip download failed ({result.returncode}):\n'
                               f'{(result.stdout + result.stderr)[-3000:]}')
        (where / '.complete').write_text('\n'.join(requirements) + '\n')
    return where


def _comm(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/comm') as f:
            return f.read().strip()
    except OSError:
        return ''


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (nspawn's orderly halt) should this process die."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Container:
    """`root` booted with systemd as PID 1; `binds`: (host path, container path, read-only)."""

    def __init__(self, root: Path, binds: list[tuple[str, str, bool]], log_path: Path):
        self.root = root
        self.binds = binds
        self.log_path = log_path
        self.name = f'mpproxy-check-{os.getpid()}'
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None          # the container's PID 1, as the host sees it

    def boot(self) -> str:
        """Boot; returns `systemctl is-system-running` once the boot is over. Raises
        CannotBoot when nspawn exits or systemd does not come up within BOOT_TIMEOUT."""
        args = [_tool('systemd-nspawn'), '--quiet', '-D', str(self.root), '--boot',
                '--volatile=overlay', '--private-network', f'--machine={self.name}',
                '--register=no']
        if not os.path.exists('/run/systemd/system'):     # the host's PID 1 is not systemd
            args.append('--keep-unit')
        for host, inside, read_only in self.binds:
            args.append(f'--bind{"-ro" if read_only else ""}={host}:{inside}')
        env = {**os.environ, 'SYSTEMD_NSPAWN_UNIFIED_HIERARCHY': '1'}
        with open(self.log_path, 'wb') as log:
            self.nspawn = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=_die_with_parent)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise CannotBoot(f'systemd-nspawn exited with code {self.nspawn.returncode}:\n'
                                 f'{self.console()}')
            if self.leader is None:
                kids = [p for p in children(self.nspawn.pid) if _comm(p) == 'systemd']
                self.leader = kids[0] if kids else None
            if self.leader is not None:
                state = self.run('systemctl', 'is-system-running', '--wait', check=False,
                                 timeout=max(1.0, deadline - time.monotonic()))
                if state.stdout.strip() in ('running', 'degraded'):
                    return state.stdout.strip()
            time.sleep(0.2)
        raise CannotBoot(f'systemd did not finish booting within {BOOT_TIMEOUT:g}s:\n'
                         f'{self.console()}')

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors='replace')[-3000:]
        except OSError:
            return ''

    def _argv(self, argv) -> list[str]:
        assert self.leader is not None, 'the container is not booted'
        return [_tool('nsenter'), f'--target={self.leader}', '--all', '--',
                'env', '-i', f'PATH={INSIDE_PATH}', 'LANG=C.UTF-8', *map(str, argv)]

    def run(self, *argv, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `argv` in the container (all its namespaces, its root); text output."""
        result = subprocess.run(self._argv(argv), input=input, capture_output=True, text=True,
                                timeout=timeout, stdin=None if input is not None else
                                subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise AssertionError(f'in the container: {" ".join(map(str, argv))} exited with '
                                 f'{result.returncode}:\n{result.stdout}{result.stderr}')
        return result

    def popen(self, *argv) -> subprocess.Popen:
        """`argv` in the container, with pipes for stdin and stdout (text, line-buffered)."""
        return subprocess.Popen(self._argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)

    def stop(self, timeout: float = 20.0) -> None:
        """Halt (SIGTERM to nspawn: an orderly shutdown), SIGKILL past `timeout`; both by pid."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        self.nspawn.send_signal(signal.SIGTERM)
        try:
            self.nspawn.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        if self.leader is not None:
            try:
                os.kill(self.leader, signal.SIGKILL)     # ends the container's pid namespace
            except ProcessLookupError:
                pass
        self.nspawn.kill()
        self.nspawn.wait(10)
