"""upload_rate / download_rate: per-connection bandwidth limits (nginx's proxy_upload_rate).

Each test moves 600 KB through a listener limited to 200 KB/s in one direction: it must
take about 3 s (the first read goes at once, so at least 2 s), while the same transfer
unlimited takes a fraction of a second on loopback, and the bytes arrive unaltered.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from helpers.backends import TcpBackend
from helpers.configs import tcp_config
from helpers.net import connect, echo_roundtrip, free_port, recv_all

SIZE = 600_000
RATE = 200_000


def sink_handler(received: list):
    def handle(conn: socket.socket):
        received.append(recv_all(conn))
        conn.shutdown(socket.SHUT_WR)
    return handle


def source_handler(payload: bytes):
    def handle(conn: socket.socket):
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)
    return handle


def timed_upload(port: int, payload: bytes) -> float:
    start = time.monotonic()
    with connect(port, timeout=15) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b''
    return time.monotonic() - start


def timed_download(port: int) -> tuple[bytes, float]:
    start = time.monotonic()
    with connect(port, timeout=15) as s:
        s.shutdown(socket.SHUT_WR)
        data = recv_all(s)
    return data, time.monotonic() - start


def start(proxies, backend: TcpBackend, key: str, limited: bool) -> int:
    port = free_port()
    extra = {key: RATE} if limited else {}
    proxies(tcp_config(port, backend.address, workers=1, extra=extra)).start(wait_workers=1)
    return port


def assert_took(elapsed: float, limited: bool) -> None:
    if limited:
        assert 2.0 <= elapsed <= 6.0, elapsed   # 600 KB at 200 KB/s, the first read at once
    else:
        assert elapsed < 1.5, elapsed


@pytest.mark.parametrize('limited', [False, True])
def test_upload_rate_limits_reading_from_the_client(proxies, limited):
    received: list = []
    backend = TcpBackend(sink_handler(received))
    try:
        port = start(proxies, backend, 'upload_rate', limited)
        payload = os.urandom(SIZE)
        elapsed = timed_upload(port, payload)
        assert received == [payload]
        assert_took(elapsed, limited)
    finally:
        backend.close()


@pytest.mark.parametrize('limited', [False, True])
def test_download_rate_limits_reading_from_the_upstream(proxies, limited):
    payload = os.urandom(SIZE)
    backend = TcpBackend(source_handler(payload))
    try:
        port = start(proxies, backend, 'download_rate', limited)
        data, elapsed = timed_download(port)
        assert data == payload
        assert_took(elapsed, limited)
    finally:
        backend.close()


def test_rate_limited_connections_are_limited_each_not_together(proxies, tcp_echo):
    port = free_port()
    proxies(tcp_config(port, tcp_echo.address, workers=1,
                       extra={'upload_rate': RATE})).start(wait_workers=1)
    payloads = [os.urandom(SIZE // 2) for _ in range(4)]
    results: list = [None] * 4

    def run(i):
        results[i] = echo_roundtrip(port, payloads[i])

    start = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    elapsed = time.monotonic() - start
    assert results == payloads
    assert 1.0 <= elapsed <= 4.5, elapsed       # ~1.5 s each, side by side, not 6 s in a row
