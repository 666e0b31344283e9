"""sd_notify without libsystemd: message format, socket addresses, and sends that never raise."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from mpproxy.master import notify


@pytest.fixture
def receiver(tmp_path, monkeypatch):
    """A datagram socket bound in tmp_path and named in NOTIFY_SOCKET."""
    path = tmp_path / 'notify.sock'
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv('NOTIFY_SOCKET', str(path))
    monkeypatch.setattr(notify, '_warned', False)
    yield sock
    sock.close()


def test_encode_keeps_order_one_line_per_field():
    data = notify.encode({'READY': 1, 'STATUS': 'serving: generation 1', 'MAINPID': 4242})
    assert data == b'READY=1\nSTATUS=serving: generation 1\nMAINPID=4242\n'


def test_encode_puts_a_value_on_one_line_and_bounds_it():
    assert notify.encode({'STATUS': 'reload failed:\nline 1\r\nline 2'}) == \
        b'STATUS=reload failed: line 1 line 2\n'
    long = notify.encode({'STATUS': 'x' * 5000})
    assert len(long) == len('STATUS=\n') + notify.VALUE_MAX and long.endswith(b'...\n')


def test_encode_never_fails_on_odd_text():
    assert notify.encode({'STATUS': 'bad \udcff byte'}) == b'STATUS=bad ? byte\n'


@pytest.mark.parametrize('value,expected', [
    ('/run/systemd/notify', '/run/systemd/notify'),
    ('@/org/freedesktop/systemd1/notify/123', b'\0/org/freedesktop/systemd1/notify/123'),
    ('', None),
    (None, None),
    ('vsock:2:1234', None),
    ('relative/path', None),
])
def test_address(value, expected):
    assert notify.address(value) == expected


def test_monotonic_usec_is_clock_monotonic_in_microseconds():
    before = int(time.monotonic() * 1e6)
    value = notify.monotonic_usec()
    after = int(time.monotonic() * 1e6)
    assert before - 1 <= value <= after + 1


def test_send_to_a_path_socket(receiver):
    assert notify.send(RELOADING=1, MONOTONIC_USEC=123, STATUS='reloading configuration')
    assert receiver.recv(4096) == b'RELOADING=1\nMONOTONIC_USEC=123\nSTATUS=reloading configuration\n'


def test_send_to_an_abstract_socket(monkeypatch):
    name = f'mpproxy-test-notify-{os.getpid()}-{time.monotonic_ns()}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind('\0' + name)
        sock.settimeout(2)
        monkeypatch.setenv('NOTIFY_SOCKET', '@' + name)
        assert notify.send(READY=1, MAINPID=os.getpid())
        assert sock.recv(4096) == f'READY=1\nMAINPID={os.getpid()}\n'.encode()


def test_unset_sends_nothing(monkeypatch):
    monkeypatch.delenv('NOTIFY_SOCKET', raising=False)
    assert notify.send(READY=1) is False
    monkeypatch.setenv('NOTIFY_SOCKET', '')
    assert notify.send(READY=1) is False


def test_a_dead_socket_never_raises_and_warns_once(tmp_path, monkeypatch, caplog):
    path = tmp_path / 'dead.sock'
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.close()                                   # the file stays, nobody reads: ECONNREFUSED
    monkeypatch.setenv('NOTIFY_SOCKET', str(path))
    monkeypatch.setattr(notify, '_warned', False)
    logger = logging.getLogger('mpproxy')
    monkeypatch.setattr(logger, 'propagate', True)
    with caplog.at_level(logging.WARNING, logger='mpproxy'):
        assert notify.send(READY=1) is False
        assert notify.send(STOPPING=1) is False
    warnings = [r for r in caplog.records if 'cannot notify systemd' in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize('value', ['/nonexistent/notify.sock', '/' + 'x' * 200, '@' + 'y' * 200])
def test_missing_or_impossible_addresses_never_raise(monkeypatch, value):
    monkeypatch.setenv('NOTIFY_SOCKET', value)
    monkeypatch.setattr(notify, '_warned', True)
    assert notify.send(READY=1) is False


def test_a_full_socket_drops_messages_instead_of_blocking(receiver):
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    started = time.monotonic()
    results = [notify.send(STATUS='x' * 1000) for _ in range(500)]   # nobody reads
    assert time.monotonic() - started < 5
    assert results[0] is True and False in results
