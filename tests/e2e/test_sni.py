"""Routing by TLS SNI through the real `mpproxy`: the ClientHello of Python's ssl module
reaches the upstream its server name routes to, whole and unaltered."""

from __future__ import annotations

import socket
import time

from helpers.backends import TcpBackend
from helpers.net import client_hello, free_port
from helpers.proc import wait_for


class Recorder:
    """A backend that records everything it receives on each connection."""

    def __init__(self):
        self.received: list[bytes] = []
        self.backend = TcpBackend(self._handle)
        self.address = self.backend.address

    def _handle(self, conn):
        conn.settimeout(5)
        chunks = []
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        self.received.append(b''.join(chunks))

    def close(self):
        self.backend.close()


def sni_config(port, routes: dict, default_upstream: str, extra_upstreams: dict) -> str:
    ups = ''.join(f'  {name}:\n    servers: ["{addr}"]\n' for name, addr in extra_upstreams.items())
    route_lines = ''.join(f'      "{k}": {v}\n' for k, v in routes.items())
    upstream = f'    upstream: {default_upstream}\n' if default_upstream else ''
    return (f'workers: 1\nupstreams:\n{ups}listeners:\n  - listen: "127.0.0.1:{port}"\n'
            f'{upstream}    sni_routes:\n{route_lines}')


def send_and_close(port: int, data: bytes) -> None:
    with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass


def test_sni_routes_to_the_right_upstream_with_hello_unaltered(proxies):
    www, wild, other = Recorder(), Recorder(), Recorder()
    try:
        port = free_port()
        proxies(sni_config(port, {'www.example.com': 'www', '*.example.com': 'wild',
                                  'default': 'other'}, 'other',
                           {'www': www.address, 'wild': wild.address, 'other': other.address})
                ).start(wait_workers=1)
        cases = [('www.example.com', www), ('shop.example.com', wild), ('example.org', other)]
        for name, backend in cases:
            hello = client_hello(name)
            send_and_close(port, hello + b'after the hello')
            wait_for(lambda: backend.received, 5, what=f'{name} to reach its upstream')
            assert backend.received.pop() == hello + b'after the hello'
        send_and_close(port, b'GET / HTTP/1.0\r\n\r\n')          # not TLS: the default route
        wait_for(lambda: other.received, 5, what='non-TLS to reach the default')
        assert other.received.pop() == b'GET / HTTP/1.0\r\n\r\n'
        assert not www.received and not wild.received
    finally:
        for r in (www, wild, other):
            r.close()



def test_a_route_may_require_an_alpn_protocol(proxies):
    h2, plain, other = Recorder(), Recorder(), Recorder()
    try:
        port = free_port()
        proxies(sni_config(port, {'api.example.com alpn=h2': 'h2', 'api.example.com': 'plain',
                                  'default alpn=h2': 'h2', 'default': 'other'}, None,
                           {'h2': h2.address, 'plain': plain.address, 'other': other.address})
                ).start(wait_workers=1)
        cases = [('api.example.com', ('http/1.1', 'h2'), h2),       # offers h2: the h2 route
                 ('api.example.com', ('http/1.1',), plain),         # the name's plain route
                 ('api.example.com', (), plain),
                 ('www.example.org', ('h2',), h2),                  # default's h2 route
                 ('www.example.org', (), other)]
        for name, alpn, backend in cases:
            hello = client_hello(name, alpn)
            send_and_close(port, hello)
            wait_for(lambda: backend.received, 5, what=f'{name} {alpn} to reach its upstream')
            assert backend.received.pop() == hello
        send_and_close(port, b'not tls')                        # unreadable: default, no ALPN
        wait_for(lambda: other.received, 5, what='non-TLS to reach the plain default')
        assert other.received.pop() == b'not tls'
        assert not (h2.received or plain.received or other.received)
    finally:
        for r in (h2, plain, other):
            r.close()

def test_fragmented_hello_routed_and_slow_unknown_or_non_tls_clients_closed(proxies):
    www, other = Recorder(), Recorder()
    try:
        port = free_port()
        proxy = proxies(sni_config(port, {'www.example.com': 'www'}, None,
                                   {'www': www.address, 'other': other.address})).start(wait_workers=1)
        hello = client_hello('www.example.com')
        with socket.create_connection(('127.0.0.1', port), timeout=5) as s:   # byte by byte
            for i in range(0, len(hello), 100):
                s.sendall(hello[i:i + 100])
                time.sleep(0.005)   # pacing the fragments is the point of this client
            s.shutdown(socket.SHUT_WR)
            while s.recv(100):
                pass
        wait_for(lambda: www.received, 5, what='the fragmented hello to be routed')
        assert www.received.pop() == hello
        with socket.create_connection(('127.0.0.1', port), timeout=10) as s:  # a half hello, then silence
            s.sendall(hello[:50])
            start = time.monotonic()
            assert s.recv(10) == b''
            assert 4 < time.monotonic() - start < 8
        for first in (b'GET / HTTP/1.0\r\n\r\n', client_hello('unknown.example.org')):
            with socket.create_connection(('127.0.0.1', port), timeout=5) as s:
                s.sendall(first)                  # no `default` route: closed, not forwarded
                assert s.recv(10) == b''
        proxy.wait_log('no default route')
        assert not other.received and not www.received
    finally:
        www.close()
        other.close()
