"""The access log writer (observe/access.py): both line formats, the buffer, pipes, errors,
reopen, and `prepare` (the master's part). Real files, pipes and /dev/full; a fake loop
whose timers the test fires."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import stat
from pathlib import Path

import pytest

from mpproxy.observe import access
from mpproxy.proxy.io.ratelog import RateLimitedLog

# 2026-11-25 12:00:00.1235 UTC (milliseconds are cut, not rounded)
NOW = 1795608000.1235


class FakeLoop:
    def __init__(self):
        self.timers = []
        self.writers = {}

    def call_later(self, delay, callback, *args):
        timer = Timer(delay, callback, args)
        self.timers.append(timer)
        return timer

    def add_writer(self, fd, callback):
        self.writers[fd] = callback

    def remove_writer(self, fd):
        return self.writers.pop(fd, None) is not None

    def fire(self):
        """Run the timers due and the writers (as if their fd were writable)."""
        timers, self.timers = self.timers, []
        for timer in timers:
            if not timer.cancelled:
                timer.callback(*timer.args)
        for callback in list(self.writers.values()):
            callback()


class Timer:
    def __init__(self, delay, callback, args):
        self.delay, self.callback, self.args, self.cancelled = delay, callback, args, False

    def cancel(self):
        self.cancelled = True


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


class Errors(RateLimitedLog):
    """The worker's rate-limited error log, its lines kept in `lines`."""

    __slots__ = ('lines',)


@pytest.fixture
def errors():
    handler = ListHandler()
    logger = logging.getLogger('test.access.%d' % id(handler))
    logger.propagate = False
    logger.addHandler(handler)
    rl = Errors(logger)
    rl.lines = handler.lines
    return rl


@pytest.fixture
def frozen(monkeypatch):
    monkeypatch.setattr(access.time, 'time', lambda: NOW)


def make(path, fmt='json', errors=None, loop=None):
    return access.AccessLog(str(path), fmt, loop or FakeLoop(), errors or RateLimitedLog(
        logging.getLogger('test.access.quiet')))


def tcp_ok(log):
    log.write('web', 'tcp', ('10.0.0.1', 5555), ('127.0.0.1', 8080), 'ok', 123, 456, 0.0012,
              1.2344)


def test_json_line_of_a_tcp_connection(tmp_path, frozen):
    log = make(tmp_path / 'a.log')
    tcp_ok(log)
    log.close()
    text = (tmp_path / 'a.log').read_text()
    assert text == ('{"time":"2026-11-25T12:00:00.123Z","listener":"web","protocol":"tcp",'
                    '"client":"10.0.0.1:5555","upstream":"127.0.0.1:8080","status":"ok",'
                    '"bytes_in":123,"bytes_out":456,"connect_time":0.001,"duration":1.234}\n')
    assert list(json.loads(text)) == ['time', 'listener', 'protocol', 'client', 'upstream',
                                      'status', 'bytes_in', 'bytes_out', 'connect_time',
                                      'duration']


def test_json_line_of_a_udp_session_and_of_a_refused_client(tmp_path, frozen):
    log = make(tmp_path / 'a.log')
    log.write('dns', 'udp', ('::1', 53000, 0, 0), ('::1', 53, 0, 0), 'ok', 30, 90, None, 2.5,
              (3, 2))
    log.refused('web', 'tcp', ('192.0.2.9', 1), 'denied')
    log.close()
    udp, refused = [json.loads(l) for l in (tmp_path / 'a.log').read_text().splitlines()]
    assert udp == {'time': '2026-11-25T12:00:00.123Z', 'listener': 'dns', 'protocol': 'udp',
                   'client': '[::1]:53000', 'upstream': '[::1]:53', 'status': 'ok',
                   'bytes_in': 30, 'bytes_out': 90, 'datagrams_in': 3, 'datagrams_out': 2,
                   'connect_time': None, 'duration': 2.5}
    assert refused['upstream'] is None and refused['connect_time'] is None
    assert (refused['status'], refused['bytes_in'], refused['bytes_out'],
            refused['duration']) == ('denied', 0, 0, 0.0)
    assert 'datagrams_in' not in refused


def test_text_line_is_nginx_like_with_fixed_columns(tmp_path, frozen):
    log = make(tmp_path / 'a.log', 'text')
    tcp_ok(log)
    log.write('dns', 'udp', ('10.0.0.2', 4000), ('10.0.0.3', 53), 'limit', 5, 6, None, 0.5, (1, 2))
    log.refused('web', 'tcp', ('10.0.0.4', 1), 'limit')
    log.close()
    assert (tmp_path / 'a.log').read_text().splitlines() == [
        '10.0.0.1:5555 [25/Nov/2026:12:00:00 +0000] tcp web 127.0.0.1:8080 ok 123 456 0.001 1.234 - -',
        '10.0.0.2:4000 [25/Nov/2026:12:00:00 +0000] udp dns 10.0.0.3:53 limit 5 6 - 0.500 1 2',
        '10.0.0.4:1 [25/Nov/2026:12:00:00 +0000] tcp web - limit 0 0 - 0.000 - -',
    ]


@pytest.mark.parametrize('fmt', ['json', 'text'])
def test_a_listener_name_with_spaces_quotes_and_non_ascii_is_escaped(tmp_path, frozen, fmt):
    log = make(tmp_path / 'a.log', fmt)
    name = 'my "web" é\tx'
    log.refused(name, 'tcp', ('10.0.0.1', 1), 'denied')
    log.close()
    line = (tmp_path / 'a.log').read_text()
    if fmt == 'json':
        assert json.loads(line)['listener'] == name
    else:
        assert line.split(' ')[4] == r'my\x20\x22web\x22\x20\xC3\xA9\x09x'
        assert len(line.split(' ')) == 13


def test_lines_wait_for_the_timer_or_the_buffer_size(tmp_path):
    loop = FakeLoop()
    path = tmp_path / 'a.log'
    log = make(path, loop=loop)
    tcp_ok(log)
    tcp_ok(log)
    assert path.read_text() == ''                 # buffered
    assert [t.delay for t in loop.timers] == [access.FLUSH_INTERVAL]   # one timer, not one a line
    loop.fire()
    assert len(path.read_text().splitlines()) == 2
    size = len(path.read_text()) // 2
    for _ in range(access.BUFFER // size + 1):     # past BUFFER: written at once, no timer needed
        tcp_ok(log)
    assert len(path.read_text().splitlines()) == 2 + access.BUFFER // size + 1
    log.close()


def test_a_full_pipe_keeps_the_lines_then_drops_past_the_cap(tmp_path, errors):
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    loop = FakeLoop()
    try:
        log = make(fifo, errors=errors, loop=loop)
        assert log.piece == select.PIPE_BUF
        line_size = 0
        written = 0
        while not log.dropped:
            tcp_ok(log)
            written += 1
            line_size = line_size or log.size
        pending = log.size + len(log.carry)
        assert access.MAX_PENDING - line_size <= pending <= access.MAX_PENDING
        assert log.blocked and list(loop.writers) == [log.fd]   # waits for the pipe, no retries
        assert any('line(s) dropped' in l for l in errors.lines), errors.lines
        for _ in range(1000):                      # the flood goes on: memory does not
            tcp_ok(log)
        assert log.size + len(log.carry) == pending and log.dropped == 1001
        got = b''
        while True:                                # the reader catches up; the timer retries
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                chunk = b''
            got += chunk
            if not chunk:
                if not log.carry and not log.lines:
                    break
                loop.fire()
        log.close()
        lines = got.decode().splitlines()
        assert len(lines) == written - 1           # every kept line, whole and in order
        assert all(json.loads(l)['bytes_in'] == 123 for l in lines)
    finally:
        os.close(reader)


def test_pipe_writes_end_at_line_ends_within_pipe_buf(tmp_path):
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        log = make(f'/proc/self/fd/{w}')
        for _ in range(200):
            tcp_ok(log)
        log.flush()
        sizes = []
        data = b''
        while True:
            try:
                chunk = os.read(r, select.PIPE_BUF)
            except BlockingIOError:
                break
            sizes.append(len(chunk))
            data += chunk
        log.close()
        assert len(data.splitlines()) == 200
        # each write() is whole lines and at most PIPE_BUF (a read may join two writes)
        assert all(chunk_size <= select.PIPE_BUF for chunk_size in sizes)
    finally:
        os.close(r)
        os.close(w)


def test_a_write_error_drops_the_lines_and_is_logged_not_raised(errors):
    log = make('/dev/full', errors=errors)
    assert log.piece == select.PIPE_BUF           # a character device: written like a pipe
    for _ in range(3):
        tcp_ok(log)
    log.flush()                                   # ENOSPC
    tcp_ok(log)
    log.close()
    assert log.dropped == 4
    assert errors.lines[0] == ('access log /dev/full: No space left on device; 3 line(s) '
                               'dropped (3 in all)')
    assert any('1 similar suppressed' in l for l in errors.lines), errors.lines


def test_reopen_writes_the_pending_lines_to_the_old_file_first(tmp_path):
    path = tmp_path / 'a.log'
    log = make(path)
    tcp_ok(log)
    os.rename(path, tmp_path / 'a.log.1')
    log.reopen()
    log.refused('web', 'tcp', ('10.0.0.9', 1), 'denied')
    log.close()
    assert json.loads((tmp_path / 'a.log.1').read_text())['status'] == 'ok'
    assert json.loads(path.read_text())['status'] == 'denied'


def test_a_failed_reopen_keeps_the_old_file(tmp_path, errors):
    directory = tmp_path / 'd'
    directory.mkdir()
    path = directory / 'a.log'
    log = make(path, errors=errors)
    os.rename(directory, tmp_path / 'gone')       # the path cannot be created any more
    log.reopen()
    tcp_ok(log)
    log.close()
    assert errors.lines[0].startswith(f'cannot reopen access log {path}: ')
    assert json.loads((tmp_path / 'gone' / 'a.log').read_text())['status'] == 'ok'


def test_prepare_creates_the_file_for_the_workers_user(tmp_path):
    path = tmp_path / 'a.log'
    access.prepare(str(path), None)
    assert path.exists() and path.stat().st_size == 0
    path.write_text('kept\n')
    path.chmod(0o000)
    access.prepare(str(path), os.getuid())        # exists: kept, owner can write again
    assert path.read_text() == 'kept\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        access.prepare(str(path), 65534)
        assert path.stat().st_uid == 65534


def test_prepare_leaves_a_fifo_alone(tmp_path):
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo, 0o600)
    access.prepare(str(fifo), 65534 if os.geteuid() == 0 else None)   # no reader: no block
    assert fifo.stat().st_uid == os.getuid()


def test_the_readme_documents_exactly_the_statuses():
    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text()
    table = readme.split('| status | TCP | UDP |', 1)[1].split('\n\n', 1)[0]
    documented = re.findall(r'^\| `([a-z_]+)` \|', table, re.M)
    assert tuple(documented) == access.STATUSES
