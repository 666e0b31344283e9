"""The pytest fixtures every test directory shares; the helpers they use, and that tests
import, live in tests/helpers (see its docstring).

Everything a fixture starts is stopped by pid in its teardown, also when a test fails.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers.backends import HeaderEcho, TcpBackend, UdpEcho, echo_handler, tagged_backend
from helpers.faults import FullTmpfs, PidsCgroup
from helpers.proc import Proxy
from helpers.unit import ListHandler


@pytest.fixture
def proxies(tmp_path):
    """Factory: proxies(config) -> Proxy (not started), `config` a dict or YAML text; all
    are stopped at teardown."""
    made: list[Proxy] = []

    def make(config, name: str = 'mpproxy', args=(), env=None) -> Proxy:
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


@pytest.fixture
def pair():
    """Two TCP backends that answer each connection with their tag, b'A' and b'B'."""
    a, b = tagged_backend(b'A'), tagged_backend(b'B')
    yield a, b
    a.close()
    b.close()


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


@pytest.fixture
def header_echo():
    backend = HeaderEcho()
    yield backend
    backend.close()


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


# -- the fault suite's mechanisms (tests/faults), each skipping its test when the machine lacks it

@pytest.fixture
def pids_cgroup():
    """A `PidsCgroup`, removed at teardown (request it before `proxies` so that it is removed
    after the proxies are stopped)."""
    with PidsCgroup() as cgroup:
        yield cgroup


@pytest.fixture
def full_tmpfs(tmp_path):
    """A `FullTmpfs` (not filled yet), unmounted at teardown (request it before `proxies`)."""
    with FullTmpfs(tmp_path) as fs:
        yield fs
