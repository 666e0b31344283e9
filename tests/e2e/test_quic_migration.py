"""QUIC connections that follow their client (issue 16, point 3) through the real `mpproxy`:
an aioquic client whose NAT rebinds it — the same connection, sent from a new local port —
keeps its connection, through the same upstream socket, whether its new flow reaches the
same worker or the other one; also after a reload handed its session over."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl

import pytest

from helpers.net import free_port, metric_total
from helpers.proc import assert_clean, wait_for
from helpers.quic import ALPN, quic_server
from mpproxy.shared.steer import slot_of

pytest.importorskip('aioquic')

WORKERS = 2


def config(port: int, server_port: int, admin: int) -> str:
    return (f'workers: {WORKERS}\nadmin:\n  listen: "127.0.0.1:{admin}"\n'
            f'upstreams:\n  q:\n    servers: ["127.0.0.1:{server_port}"]\n'
            f'listeners:\n  - listen: "127.0.0.1:{port}"\n    protocol: udp\n'
            f'    sni_routes: {{"q.example": q}}\n')         # no default: a lost flow is dropped


def port_in_slot(slot: int) -> socket.socket:
    """A client socket (dual-stack, as aioquic's) on a free port whose flow the master's
    steering program sends to worker `slot`."""
    for _ in range(200):
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(('::', 0))
        if slot_of(('127.0.0.1', sock.getsockname()[1]), WORKERS) == slot:
            return sock
        sock.close()
    raise AssertionError(f'no free port for slot {slot}')


async def rebind(loop, client, slot: int):
    """The NAT gives the client a new port (its flow now reaching worker `slot`): the same
    QUIC connection goes on from a new socket, with the same connection ID."""
    old = client._transport
    await loop.create_datagram_endpoint(lambda: client, sock=port_in_slot(slot))
    old.close()
    return client._transport.get_extra_info('sockname')[1]


async def ask(client, message: bytes) -> bytes:
    reader, writer = await client.create_stream()
    writer.write(message)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), 5.0)


def run_moves(proxies, moves, reload_first: bool = False):
    """Connect, then for each of `moves` ('same' or 'other' worker) rebind and talk;
    returns (the proxy, admin port, the addresses the server saw, the answers)."""
    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration
    port, admin = free_port(socket.SOCK_DGRAM), free_port()
    seen, answers, holder = [], [], {}

    async def body():
        server, server_port = await quic_server('q.example', seen=seen)
        try:
            proxy = holder['proxy'] = proxies(config(port, server_port, admin))
            proxy.start(wait_workers=WORKERS)
            loop = asyncio.get_running_loop()
            cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                    server_name='q.example', verify_mode=ssl.CERT_NONE,
                                    idle_timeout=10.0)
            first = port_in_slot(0)
            local = first.getsockname()[1]
            first.close()
            async with connect('127.0.0.1', port, configuration=cfg, local_port=local) as client:
                answers.append(await ask(client, b'hello'))
                if reload_first:
                    proxy.signal(signal.SIGHUP)
                    await loop.run_in_executor(None, lambda: proxy.wait_log(
                        'generation 2 active', timeout=10))
                    answers.append(await ask(client, b'reloaded'))
                slot = 0
                for i, move in enumerate(moves):
                    slot = slot if move == 'same' else 1 - slot
                    await rebind(loop, client, slot)
                    answers.append(await ask(client, b'moved %d' % i))
        finally:
            server.close()
    asyncio.run(asyncio.wait_for(body(), 60))
    return holder['proxy'], admin, seen, answers


def test_a_client_that_moves_to_new_ports_keeps_its_connection_on_either_worker(proxies):
    proxy, admin, seen, answers = run_moves(proxies, ['same', 'other', 'other', 'same'])
    assert answers == [b'q.example|hello'] + [b'q.example|moved %d' % i for i in range(4)]
    assert len(set(seen)) == 1, f'the server saw the connection from {set(seen)}'
    moved = lambda: metric_total(admin, 'mpproxy_udp_quic_moved_total')   # noqa: E731
    wait_for(lambda: moved() >= 4, 5, what='4 moves counted (workers publish each second)')
    assert moved() == 4
    assert metric_total(admin, 'mpproxy_udp_sessions_created_total') == 1
    assert metric_total(admin, 'mpproxy_udp_quic_unrouted_total') == 0
    log = proxy.log()
    assert 'moved to' in log and '(another worker)' in log, log
    assert_clean(proxy)


def test_a_connection_handed_over_on_reload_still_follows_its_client(proxies):
    proxy, admin, seen, answers = run_moves(proxies, ['other', 'same'], reload_first=True)
    assert answers == [b'q.example|hello', b'q.example|reloaded', b'q.example|moved 0',
                       b'q.example|moved 1']
    assert len(set(seen)) == 1, f'the server saw the connection from {set(seen)}'
    wait_for(lambda: metric_total(admin, 'mpproxy_udp_quic_moved_total') >= 2, 5,
             what='2 moves counted')
    assert metric_total(admin, 'mpproxy_udp_quic_moved_total') == 2
    assert_clean(proxy)
