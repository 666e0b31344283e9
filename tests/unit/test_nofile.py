"""The open-files estimate, the limit workers get from worker_rlimit_nofile, and `user` as non-root."""

import resource

import pytest

from mpproxy.config.accounts import user_ignored
from mpproxy.config.nofile import BASE_FILES, files_needed, nofile_target, nofile_warning
from mpproxy.config.schema import (Address, Config, HealthCheck, Listener, Server, UdpOptions,
                                   Upstream)

WEB = Upstream('web', (Server(Address('127.0.0.1', 9000)), Server(Address('127.0.0.1', 9001))))


def tcp(port, max_connections=0):
    return Listener(f'tcp{port}', Address('127.0.0.1', port), 'tcp', 'web',
                    max_connections=max_connections)


def udp(port, max_sessions=10000):
    return Listener(f'udp{port}', Address('127.0.0.1', port), 'udp', 'web',
                    udp=UdpOptions(max_sessions=max_sessions))


def config(*listeners, upstream=WEB):
    return Config(path='/etc/mpproxy.yaml', upstreams={'web': upstream}, listeners=listeners)


def test_tcp_without_max_connections_counts_only_its_socket():
    assert files_needed(config(tcp(1), tcp(2))) == (
        BASE_FILES + 2, [f'listening sockets and the rest {BASE_FILES + 2}'])


def test_tcp_max_connections_count_twice_and_udp_sessions_once():
    total, parts = files_needed(config(tcp(1, max_connections=500), udp(2, 7000), udp(3)))
    assert total == 2 * 500 + 7000 + 10000 + BASE_FILES + 3
    assert parts == ['2 × listeners[0].max_connections 1000', 'listeners[1].udp.max_sessions 7000',
                     'listeners[2].udp.max_sessions 10000',
                     f'listening sockets and the rest {BASE_FILES + 3}']


def test_health_checked_servers_count_one_each():
    checked = Upstream('web', WEB.servers, health_check=HealthCheck())
    assert files_needed(config(tcp(1), upstream=checked))[0] == BASE_FILES + 1 + 2


@pytest.mark.parametrize('limit, warned', [(10033, False), (10032, True), (1024, True),
                                           (resource.RLIM_INFINITY, False)])
def test_warning_only_past_the_limit(limit, warned):
    warning = nofile_warning(config(udp(1)), limit)          # needs 10000 + 33
    assert (warning is not None) == warned
    if warned:
        assert warning == (f'/etc/mpproxy.yaml: workers may need 10033 open files '
                           f'(listeners[0].udp.max_sessions 10000, listening sockets and the '
                           f'rest 33) but their limit is {limit}; raise worker_rlimit_nofile')


@pytest.mark.parametrize('want, soft, hard, privileged, target', [
    (None, 1024, 4096, True, (1024, 4096)),            # not set: inherited as it is
    (2000, 1024, 4096, False, (2000, 4096)),           # within the hard limit: anyone may
    (9000, 1024, 4096, False, (4096, 4096)),           # not root: soft up to the hard limit
    (9000, 1024, 4096, True, (9000, 9000)),            # root: the hard limit is raised too
    (500, 1024, 4096, True, (500, 4096)),              # lowering is what was asked for
    (2_000_000, 1024, 4096, True, (1 << 20, 1 << 20)),  # never past the kernel's fs.nr_open
])
def test_nofile_target(want, soft, hard, privileged, target):
    assert nofile_target(want, soft, hard, privileged, 1 << 20) == target


def test_user_is_ignored_only_when_not_root():
    assert user_ignored(None, 1000) is None
    assert user_ignored('nobody', 0) is None
    assert user_ignored('nobody', 1000) == (
        "user 'nobody' ignored: switching the workers to another user needs a master running "
        "as root (this one runs as uid 1000)")
