"""mpproxy as a systemd service inside a `nspawn.Container` (tests/systemd).

`Installed.install()` does what the README's "Install" and "As a systemd service" say:
a venv in /opt/mpproxy with `pip install` of the checkout (offline: the wheels of its
dependencies are bind-mounted), `ln -s` to /usr/local/bin/mpproxy, etc/mpproxy.service
copied to /etc/systemd/system and enabled. The rest are the operator's commands: `systemctl`,
`journalctl`, `kill`, and `inside.py` (tests/systemd/inside.py) for traffic and probes.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from pathlib import Path

from helpers.nspawn import Container
from helpers.proc import ROOT, wait_for

UNIT = 'mpproxy'
ECHO_A = 9001            # backends inside the container: answers 'a:' + data
ECHO_B = 9002            # answers 'b:' + data
DNS = 5300               # answers backend.check -> 127.0.0.1, after DNS_DELAY seconds
DNS_DELAY = 1.5          # under the resolver's 2s per try
CONFIG = '/etc/mpproxy/mpproxy.yaml'
PID_FILE = '/run/mpproxy.pid'
RUN = '/srv/mpproxy-check'                 # the run directory, bind-mounted
WHEELS = '/srv/wheels'
INSIDE = Path(__file__).resolve().parents[1] / 'systemd' / 'inside.py'
SOURCE = ('pyproject.toml', 'README.md', 'mpproxy', 'etc')
CAPABILITIES = (            # capability(7) numbers, in order
    'CHOWN', 'DAC_OVERRIDE', 'DAC_READ_SEARCH', 'FOWNER', 'FSETID', 'KILL', 'SETGID', 'SETUID',
    'SETPCAP', 'LINUX_IMMUTABLE', 'NET_BIND_SERVICE', 'NET_BROADCAST', 'NET_ADMIN', 'NET_RAW',
    'IPC_LOCK', 'IPC_OWNER', 'SYS_MODULE', 'SYS_RAWIO', 'SYS_CHROOT', 'SYS_PTRACE', 'SYS_PACCT',
    'SYS_ADMIN', 'SYS_BOOT', 'SYS_NICE', 'SYS_RESOURCE', 'SYS_TIME', 'SYS_TTY_CONFIG', 'MKNOD',
    'LEASE', 'AUDIT_WRITE', 'AUDIT_CONTROL', 'SETFCAP', 'MAC_OVERRIDE', 'MAC_ADMIN', 'SYSLOG',
    'WAKE_ALARM', 'BLOCK_SUSPEND', 'AUDIT_READ', 'PERFMON', 'BPF', 'CHECKPOINT_RESTORE')


def capability_mask(names: str) -> int:
    """`CAP_A CAP_B ...` (a unit's CapabilityBoundingSet=) as the bit mask /proc shows."""
    return sum(1 << CAPABILITIES.index(name.removeprefix('CAP_')) for name in names.split())


def unit_value(key: str) -> str:
    """The value of `key` in etc/mpproxy.service (the last one, as systemd takes it)."""
    values = [line.split('=', 1)[1].strip() for line in
              (ROOT / 'etc' / 'mpproxy.service').read_text().splitlines()
              if line.strip().startswith(f'{key}=')]
    assert values, f'etc/mpproxy.service has no {key}='
    return values[-1]


def requirements() -> list[str]:
    """What `pip install` of the checkout needs: its dependencies and its build backend."""
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())
    return [*project['project']['dependencies'], *project['build-system']['requires']]


def prepare(run: Path) -> None:
    """The run directory: a copy of the checkout (pip builds in it) and inside.py."""
    for name in SOURCE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, run / 'src' / name,
                            ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            (run / 'src').mkdir(exist_ok=True)
            shutil.copy2(source, run / 'src' / name)
    shutil.copy2(INSIDE, run / 'inside.py')


class Installed:
    def __init__(self, container: Container):
        self.container = container
        self.start_cursor: str | None = None     # the journal's end when a test began

    def run(self, *argv, **kw):
        return self.container.run(*argv, **kw)

    def install(self) -> str:
        """Install as the README says; returns `mpproxy -V`."""
        self.run('python3', '-m', 'venv', '/opt/mpproxy', timeout=120)
        self.run('/opt/mpproxy/bin/pip', 'install', '--quiet', '--disable-pip-version-check',
                 '--no-index', '--find-links', WHEELS, f'{RUN}/src', timeout=300)
        self.run('ln', '-s', '/opt/mpproxy/bin/mpproxy', '/usr/local/bin/mpproxy')
        self.run('mkdir', '-p', '/etc/mpproxy')
        self.run('cp', f'{RUN}/src/etc/mpproxy.service', '/etc/systemd/system/')
        self.run('systemctl', 'daemon-reload')
        self.run('systemctl', 'enable', UNIT)        # its [Install]; started by each test
        enabled = self.run('systemctl', 'is-enabled', UNIT).stdout.strip()
        assert enabled == 'enabled', enabled
        return self.run('mpproxy', '-V').stdout.strip()

    # -- what an operator types -----------------------------------------------------------
    def systemctl(self, *args, check: bool = False, timeout: float = 90.0):
        return self.run('systemctl', *args, check=check, timeout=timeout)

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        out = self.run('systemctl', 'show', unit, '-p', ','.join(props)).stdout
        return dict(line.split('=', 1) for line in out.splitlines() if '=' in line)

    def main_pid(self) -> int:
        return int(self.show('MainPID')['MainPID'])

    def write_config(self, text: str) -> None:
        self.run('sh', '-c', f'cat > {CONFIG}', input=text)

    def kill(self, sig: str, pid: int) -> None:
        self.run('sh', '-c', f'kill -{sig} {pid}')         # the shell's kill, as the README

    def alive(self, pid: int) -> bool:
        state = self.run('sh', '-c', f'cat /proc/{pid}/stat 2>/dev/null', check=False).stdout
        return bool(state) and state.rsplit(')', 1)[1].split()[0] != 'Z'

    def read(self, path: str) -> str:
        return self.run('cat', path).stdout

    def status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status, as {field: value}."""
        return dict(line.split(':\t', 1) for line in self.read(f'/proc/{pid}/status').splitlines()
                    if ':\t' in line)

    def ppid(self, pid: int) -> int:
        return int(self.read(f'/proc/{pid}/stat').rsplit(')', 1)[1].split()[1])

    def cursor(self) -> str:
        """The journal's current end, for `journal(after=...)`."""
        out = self.run('journalctl', '-n', '1', '--show-cursor', '-q', '-o', 'cat').stdout
        return out.rsplit('-- cursor: ', 1)[1].strip()

    def journal(self, after: str | None = None) -> str:
        """`journalctl -u mpproxy`: the unit's log (its processes' and systemd's about it)."""
        args = ['journalctl', '-u', UNIT, '--no-pager', '-q', '-o', 'cat']
        if after:
            args.append(f'--after-cursor={after}')
        return self.run(*args).stdout

    def wait_journal(self, text: str, after: str | None = None, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            log = self.journal(after)
            if text in log:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError(f'{text!r} not in journalctl -u {UNIT} within {timeout:g}s:'
                                     f'\n{log[-3000:]}')
            time.sleep(0.1)

    # -- inside.py ------------------------------------------------------------------------
    def inside(self, *args, timeout: float = 60.0) -> str:
        return self.run('python3', f'{RUN}/inside.py', *args, timeout=timeout).stdout.strip()

    def inside_json(self, *args, timeout: float = 60.0):
        return json.loads(self.inside(*args, timeout=timeout))

    def start_backends(self) -> None:
        self.background('check-echo-a', 'echo', ECHO_A, 'a:')
        self.background('check-echo-b', 'echo', ECHO_B, 'b:')
        self.background('check-dns', 'dns', DNS, DNS_DELAY, 'backend.check=127.0.0.1')
        for port, prefix in ((ECHO_A, 'a:'), (ECHO_B, 'b:')):
            wait_for(lambda: self.roundtrip(port, 'up') == f'{prefix}up', 10, interval=0.1,
                     what=f'the echo backend on {port} to start')

    def roundtrip(self, port: int, data: str, timeout: float = 5.0) -> str:
        """One connection to 127.0.0.1:port inside: the answer, or `error <errno name>`."""
        return self.inside('roundtrip', port, data, timeout)

    def children(self, pid: int) -> list[int]:
        return json.loads(self.inside('children', pid))

    def background(self, name: str, *args) -> None:
        """inside.py as a transient service of the container's systemd."""
        self.run('systemd-run', f'--unit={name}', '--quiet', 'python3', f'{RUN}/inside.py',
                 *args)

    def hold(self, port: int) -> 'Held':
        return Held(self.container.popen('python3', f'{RUN}/inside.py', 'hold', port))


class Held:
    """One client connection kept open inside the container (inside.py hold)."""

    def __init__(self, proc):
        self.proc = proc
        line = proc.stdout.readline().strip()
        assert line == 'connected', line

    def send(self, data: str) -> str:
        self.proc.stdin.write(f'send {data}\n')
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('close\n')
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, ValueError):
                self.proc.kill()
                self.proc.wait(10)
