"""QUIC passthrough by server name through the real `mpproxy`: aioquic clients reach the
aioquic server their server name routes to (each with its own certificate, which the client
checks), across one udp listener with sni_routes."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest

from helpers.net import free_port
from helpers.proc import assert_clean, run_cli
from helpers.quic import ALPN, quic_exchange, quic_server

pytest.importorskip('aioquic')

NAMES = ('a.example', 'b.example', 'default.example')


def quic_config(port: int, ports: dict, default: bool, workers: int = 2) -> str:
    ups = ''.join(f'  {n[0]}:\n    servers: ["127.0.0.1:{p}"]\n' for n, p in ports.items())
    routes = ('"a.example": a, "a.example alpn=other": b, "*.b.example": b, "b.example": b'
              + (', default: d' if default else ''))
    return (f'workers: {workers}\nupstreams:\n{ups}listeners:\n'
            f'  - listen: "127.0.0.1:{port}"\n    protocol: udp\n'
            f'    sni_routes: {{{routes}}}\n')


async def with_servers(body):
    """Run `body(ports)` with one aioquic server per name; the servers stop even on failure."""
    servers, ports = [], {}
    try:
        for name in NAMES:
            server, ports[name] = await quic_server(name)
            servers.append(server)
        return await body(ports)
    finally:
        for server in servers:
            server.close()


def through_proxy(proxies, body, default: bool = False, workers: int = 2):
    """mpproxy on a free port routing to one aioquic server per name (quic_config); runs
    `await body(proxy, port)` while both serve; returns the proxy."""
    port = free_port(socket.SOCK_DGRAM)
    holder = {}

    async def run(ports):
        proxy = holder['proxy'] = proxies(quic_config(port, ports, default, workers))
        proxy.start(wait_workers=workers)
        await body(proxy, port)
    asyncio.run(with_servers(run))
    return holder['proxy']


def test_quic_connections_reach_the_server_their_name_routes_to(proxies):
    async def body(proxy, port):
        for batch in range(10):         # 50 connections to each name, 10 at a time
            names = ['a.example', 'b.example'] * 5
            got = await asyncio.gather(*(quic_exchange(port, name, b'hello %d' % i)
                                         for i, name in enumerate(names)))
            for i, (name, (common, answer)) in enumerate(zip(names, got)):
                assert common == name, (batch, i, common)
                assert answer == name.encode() + b'|hello %d' % i
        assert (await quic_exchange(port, 'x.b.example', b'w'))[0] == 'b.example'
        # a name with no route and no default: no answer at all, the client gives up
        with pytest.raises((asyncio.TimeoutError, ConnectionError)):
            await quic_exchange(port, 'nobody.example', b'lost', timeout=1.0)
    proxy = through_proxy(proxies, body)
    proxy.wait_log("no route for server name 'nobody.example'")
    assert_clean(proxy)


def test_default_route_and_a_client_hello_over_several_initials(proxies):
    async def body(proxy, port):
        common, answer = await quic_exchange(port, 'nobody.example', b'x')
        assert (common, answer) == ('default.example', b'default.example|x')
        # a route that requires an ALPN the client offers wins over the name's plain route
        common, answer = await quic_exchange(port, 'a.example', b'y', alpn=('other', ALPN))
        assert (common, answer) == ('b.example', b'b.example|y')
        # ~2.2 KB of ALPN names: aioquic's ClientHello spans two or three Initial packets
        big = [ALPN] + [f'pad{i:02d}-' + 'x' * 200 for i in range(10)]
        for name in ('b.example', 'a.example'):
            common, answer = await quic_exchange(port, name, b'big', alpn=big)
            assert (common, answer) == (name, name.encode() + b'|big')
    assert_clean(through_proxy(proxies, body, default=True, workers=1))


def test_check_names_the_quic_extra_when_cryptography_is_missing(tmp_path):
    shadow = tmp_path / 'shadow' / 'cryptography'
    shadow.mkdir(parents=True)
    (shadow / '__init__.py').write_text('raise ImportError("hidden by the test")\n')
    config = tmp_path / 'q.yaml'
    config.write_text(quic_config(free_port(socket.SOCK_DGRAM), {'a.example': 9, 'b.example': 10},
                                  default=False))
    import os
    env = {**os.environ, 'PYTHONPATH': f'{tmp_path / "shadow"}:{os.environ.get("PYTHONPATH", "")}'}
    result = run_cli('-c', str(config), '-t', env=env)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'mpproxy[quic]' in lines[0], result.stderr
    assert 'listeners[0].sni_routes' in lines[0]


def test_a_quic_connection_keeps_exchanging_data_through_three_reloads(proxies):
    import ssl

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration

    async def body(proxy, port):
        loop = asyncio.get_running_loop()
        config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name='b.example',
                                   verify_mode=ssl.CERT_NONE, idle_timeout=10.0)
        async with connect('127.0.0.1', port, configuration=config) as client:
            answers = []
            stop = asyncio.Event()

            async def talk():
                i = 0
                while not stop.is_set():
                    reader, writer = await client.create_stream()
                    writer.write(b'%d' % i)
                    writer.write_eof()
                    answers.append(await asyncio.wait_for(reader.read(), 5.0))
                    i += 1
                    await asyncio.sleep(0.02)
            task = asyncio.ensure_future(talk())
            for generation in (2, 3, 4):
                before = len(answers)
                while len(answers) < before + 3 and not task.done():   # traffic flows first
                    await asyncio.sleep(0.02)
                before = len(answers)
                proxy.signal(signal.SIGHUP)
                await loop.run_in_executor(None, lambda g=generation: proxy.wait_log(
                    f'generation {g} active', timeout=10))
                while len(answers) < before + 5 and not task.done():   # bounded by talk()'s 5 s
                    await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(task, 6.0)
            assert answers == [b'b.example|%d' % i for i in range(len(answers))]
            assert len(answers) >= 15
    proxy = through_proxy(proxies, body)
    log = proxy.log()
    assert 'generation 4 active' in log
    assert log.count('handed 1 UDP session(s) to the new worker(s)') == 3, log   # one upstream
                                                                        # socket all along
    assert_clean(proxy)


def test_quic_routed_by_name_behind_another_proxy_that_sends_proxy_headers(proxies):
    """Two listeners of one mpproxy: a plain udp one sending v2 PROXY headers (the proxy in
    front) to an sni_routes one that accepts them: QUIC reaches the server its name routes to."""
    front, routed = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    holder = {}

    async def body(ports):
        ups = ''.join(f'  {n[0]}:\n    servers: ["127.0.0.1:{p}"]\n' for n, p in ports.items())
        proxy = holder['proxy'] = proxies(
            f'workers: 2\nupstreams:\n{ups}  behind:\n    servers: ["127.0.0.1:{routed}"]\n'
            f'listeners:\n'
            f'  - listen: "127.0.0.1:{front}"\n    protocol: udp\n    upstream: behind\n'
            f'    proxy_protocol: {{send: v2}}\n'
            f'  - listen: "127.0.0.1:{routed}"\n    protocol: udp\n'
            f'    sni_routes: {{"a.example": a, "b.example": b}}\n'
            f'    proxy_protocol: {{accept: true, trusted: ["127.0.0.1"]}}\n')
        proxy.start(wait_workers=2)
        names = ['a.example', 'b.example'] * 3
        got = await asyncio.gather(*(quic_exchange(front, name, b'via %d' % i)
                                     for i, name in enumerate(names)))
        assert [common for common, _ in got] == names
        assert [answer for _, answer in got] == [n.encode() + b'|via %d' % i
                                                 for i, n in enumerate(names)]
    asyncio.run(with_servers(body))
    assert_clean(holder['proxy'])
