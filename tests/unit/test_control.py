"""The master's control socket (`-s reload`): its client state machine over real sockets,
driven by a selector as the arbiter drives it."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import time

import pytest

from helpers.proc import wait_for
from mpproxy.master import control


@pytest.fixture
def endpoint():
    selector = selectors.DefaultSelector()
    asked = []
    ep = control.ControlEndpoint(selector, lambda: asked.append(1), logging.getLogger('test'))
    ep.open()
    assert ep.sock is not None
    ep.asked = asked

    def turn(cond, what):
        def step():
            for key, _ in selector.select(0.01):
                key.data()
            ep.tick()
            return cond()
        wait_for(step, 5, interval=0, what=what)
    ep.turn = turn
    yield ep
    ep.close()
    selector.close()


def client(request: bytes | None = b'reload\n') -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(control.address(os.getpid()))
    if request:
        sock.sendall(request)
    return sock


def reply(sock: socket.socket) -> bytes:
    data = b''
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


def test_a_request_waits_for_the_outcome_of_the_reload_that_takes_it(endpoint):
    c = client()
    endpoint.turn(lambda: endpoint.waiting() == 1, 'the request')
    assert endpoint.asked == [1]
    endpoint.answer(1, True, 'serving: generation 2 active')    # no reload took it yet
    assert endpoint.waiting() == 1
    endpoint.starting(1)
    endpoint.answer(1, False, 'reload failed, keeping the running configuration: x\ny')
    assert reply(c) == b'failed reload failed, keeping the running configuration: x y\n'
    assert endpoint.clients == {}


def test_a_superseded_reload_is_answered_by_the_one_that_replaced_it(endpoint):
    first = client()
    endpoint.turn(lambda: endpoint.waiting() == 1, 'the first request')
    endpoint.starting(1)
    second = client()
    endpoint.turn(lambda: endpoint.waiting() == 2, 'the second request')
    endpoint.starting(2)
    endpoint.supersede(1, 2)
    endpoint.answer(2, True, 'serving: generation 3 active')
    assert reply(first) == reply(second) == b'ok serving: generation 3 active\n'


def test_junk_a_long_line_and_silence_are_closed_without_a_reload(endpoint, monkeypatch):
    monkeypatch.setattr(control, 'READ_TIMEOUT', 0.05)
    junk, long, silent = client(b'stop\n'), client(b'x' * control.MAX_REQUEST), client(None)
    for sock in (junk, long, silent):
        endpoint.turn(lambda: reply_ready(sock), 'the connection to be closed')
        assert reply(sock) == b''
    assert endpoint.asked == []


def reply_ready(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b''
    except BlockingIOError:
        return False
    finally:
        sock.setblocking(True)
        sock.settimeout(5)


def test_stopping_tells_every_waiting_client(endpoint):
    a, b = client(), client()
    endpoint.turn(lambda: endpoint.waiting() == 2, 'both requests')
    endpoint.starting(7)
    endpoint.abandon('the master is stopping; no reload')
    assert reply(a) == reply(b) == b'failed the master is stopping; no reload\n'


def test_past_max_clients_new_ones_wait_in_the_backlog(endpoint, monkeypatch):
    monkeypatch.setattr(control, 'MAX_CLIENTS', 2)
    endpoint._update()
    a, b = client(), client()
    endpoint.turn(lambda: endpoint.waiting() == 2, 'two requests')
    assert not endpoint.accepting
    c = client()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        endpoint.turn(lambda: True, 'a turn')
    assert endpoint.waiting() == 2                # the third is not read
    endpoint.starting(1)
    endpoint.answer(1, True, 'ok')
    endpoint.turn(lambda: endpoint.waiting() == 1, 'the third request once there is room')
    for sock in (a, b, c):
        sock.close()


def test_request_reload_says_when_nothing_listens():
    assert control.request_reload(2 ** 22 + 12345, 1) is None
