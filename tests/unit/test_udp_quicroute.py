"""sni_routes on a UDP listener (udp/quicroute.py), in-process: a UdpService with a router
of three echo upstreams, clients sending real aioquic Initials or ones sealed here."""

from __future__ import annotations

import os

import pytest

from helpers.quic import client_hello, send_initials, split_initials
from helpers.udp_unit import V4, Clock, EchoUpstream, Env
from helpers.unit import serve_env
from mpproxy.config.schema import Address, Listener, Server, UdpOptions, Upstream
from mpproxy.proxy.edge.sni import SniRouter
from mpproxy.proxy.udp import quicroute
from mpproxy.proxy.udp.service import UdpService
from mpproxy.upstream.pool import UpstreamPool


@pytest.fixture
def env():
    env = Env()
    yield from serve_env(env)


def routed(env, default=True, idle=0.4, clock=None, ups=None, host='127.0.0.1'):
    """A service routing a.example → A, *.b.example and b.example → B, else D (or none);
    the echo upstreams `ups` (by name), or new ones."""
    ups = ups or {name: EchoUpstream(env) for name in 'ABD'}
    pools = {name: UpstreamPool(Upstream(name=name, servers=(
        Server(address=Address(*up.addr)),))) for name, up in ups.items()}
    routes = [('a.example', 'A'), ('*.b.example', 'B'), ('b.example', 'B')]
    router = SniRouter([(pattern, pools[name]) for pattern, name in
                        (routes + [('default', 'D')] if default else routes)])
    lsock = env.udp(V4, (host, 0), reuseport=True)
    port = lsock.getsockname()[1]
    listener = Listener(name='quic', listen=Address(host, port), protocol='udp',
                        upstream='D', idle_timeout=idle, udp=UdpOptions())
    svc = UdpService(env.loop, listener, lsock, pools['D'], env.log, clock=clock or Clock(),
                     router=router)
    env.services.append(svc)
    svc.start()
    return svc, ('127.0.0.1', port), ups


def sent(up):
    return [data for data, _ in up.got]


def test_each_name_reaches_its_upstream_with_every_datagram_in_order(env):
    svc, addr, ups = routed(env)
    clients = {}
    for name, want in (('a.example', 'A'), ('x.b.example', 'B'), ('b.example', 'B')):
        c, initials = send_initials(env, addr, name)
        clients[name] = (c, initials, want)
    env.run_until(lambda: len(ups['A'].got) + len(ups['B'].got) >= 3, what='routing')
    for name, (c, initials, want) in clients.items():
        assert [d for d, src in ups[want].got if d in initials] == initials
        assert env.recv(c)[0] == initials[0]            # the session relays replies
        c.sendto(b'later', addr)                        # then the flow goes on as any session
    env.run_until(lambda: sent(ups['A']).count(b'later') == 1
                  and sent(ups['B']).count(b'later') == 2, what='later datagrams')
    assert ups['D'].got == []
    st = svc.stats
    assert (st.sessions_created, st.quic_unrouted, st.dropped) == (3, 0, 0)
    assert svc._admission.pending == {}


def test_an_unknown_name_goes_to_default_or_is_dropped(env):
    svc, addr, ups = routed(env)
    c, initials = send_initials(env, addr, 'nobody.example')
    env.run_until(lambda: len(ups['D'].got) == len(initials), what='default')
    assert svc.stats.quic_unrouted == 0                 # routed by its name: to default

    svc2, addr2, ups2 = routed(env, default=False)
    c2 = env.udp(V4, ('127.0.0.1', 0))
    for d in initials:
        c2.sendto(d, addr2)
    env.run_until(lambda: svc2.stats.quic_unrouted == 1, what='unrouted')
    env.nothing(c2)                                     # nothing is ever sent to the client
    assert all(up.got == [] for up in ups2.values())
    st = svc2.stats
    assert (st.sessions_created, st.dropped, len(svc2._admission.pending)) == \
        (0, len(initials), 0)
    assert any("no route for server name 'nobody.example'" in r.getMessage()
               for r in env.handler.records)


def test_not_quic_goes_to_default_or_is_dropped(env):
    svc, addr, ups = routed(env)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'plain dns-ish', addr)
    c.sendto(b'second', addr)
    env.run_until(lambda: sent(ups['D']) == [b'plain dns-ish', b'second'], what='default')
    assert svc.stats.quic_unrouted == 1                 # counted once: the flow
    svc2, addr2, ups2 = routed(env, default=False)
    c2 = env.udp(V4, ('127.0.0.1', 0))
    c2.sendto(b'plain', addr2)
    env.run_until(lambda: svc2.stats.quic_unrouted == 1, what='unrouted')
    assert (svc2.stats.dropped, svc2.stats.sessions_created) == (1, 0)
    env.nothing(c2)


def test_a_hello_over_three_initials_out_of_order_routes_when_whole(env):
    svc, addr, ups = routed(env)
    dcid = os.urandom(8)
    parts = split_initials(dcid, client_hello('a.example', (b'h3',), padding=2500), 3)
    c = env.udp(V4, ('127.0.0.1', 0))
    order = [parts[2], parts[0], parts[1]]
    for d in order[:2]:
        c.sendto(d, addr)
    env.run_until(lambda: svc.stats.datagrams_in == 2, what='both read')
    env.run_for(0.1)                                    # (time to forward them, were it wrong)
    assert all(up.got == [] for up in ups.values())     # held
    assert len(svc._admission.pending) == 1
    c.sendto(order[2], addr)
    env.run_until(lambda: len(ups['A'].got) == 3, what='routing')
    assert sent(ups['A']) == order
    assert (svc.stats.quic_unrouted, svc._admission.pending) == (0, {})


def test_a_flow_held_past_the_deadline_goes_to_default_or_is_dropped(env):
    for default in (True, False):
        clock = Clock()
        svc, addr, ups = routed(env, default=default, clock=clock)
        parts = split_initials(os.urandom(8), client_hello('a.example', padding=2500), 3)
        c = env.udp(V4, ('127.0.0.1', 0))
        c.sendto(parts[0], addr)
        env.run_until(lambda: len(svc._admission.pending) == 1, what='held')
        env.run_for(3 * svc._period)
        assert len(svc._admission.pending) == 1         # the clock has not moved
        clock.advance(quicroute.HOLD)
        env.run_until(lambda: not svc._admission.pending, what='the deadline')
        assert svc.stats.quic_unrouted == 1
        if default:
            env.run_until(lambda: sent(ups['D']) == [parts[0]], what='default')
            assert env.recv(c)[0] == parts[0]           # a session now: replies relayed
        else:
            assert svc.stats.dropped == 1
            env.nothing(c, 0.05)
        assert ups['A'].got == []


def test_bounds_pending_flows_and_held_datagrams(env, monkeypatch):
    monkeypatch.setattr(quicroute, 'MAX_PENDING', 2)
    svc, addr, ups = routed(env, default=False)
    parts = split_initials(os.urandom(8), client_hello('a.example', padding=2500), 3)
    clients = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(3)]
    for c in clients:
        c.sendto(parts[0], addr)
    env.run_until(lambda: svc.stats.datagrams_in == 3, what='datagrams')
    assert (len(svc._admission.pending), svc.stats.quic_unrouted) == (2, 1)
    # the first flow sends datagrams the reader ignores: at MAX_HELD it is given up on
    for _ in range(quicroute.MAX_HELD - 1):
        clients[0].sendto(b'\x40junk', addr)
    env.run_until(lambda: len(svc._admission.pending) == 1, what='the bound')
    assert svc.stats.quic_unrouted == 2
    assert all(up.got == [] for up in ups.values())


def test_close_and_hand_over_forget_held_flows(env):
    svc, addr, ups = routed(env)
    parts = split_initials(os.urandom(8), client_hello('a.example', padding=2500), 3)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(parts[0], addr)
    env.run_until(lambda: len(svc._admission.pending) == 1, what='held')
    assert svc.export_sessions() == []
    assert svc._admission.pending == {}
    svc.start()
    c.sendto(parts[0], addr)
    env.run_until(lambda: len(svc._admission.pending) == 1, what='held again')
    svc.close()
    assert svc._admission.pending == {}
    assert svc.stats.dropped == 2
    env.run_for(0.1)
    assert all(up.got == [] for up in ups.values())


def test_a_routed_session_handed_over_keeps_its_upstream_and_pool(env):
    old, addr, ups = routed(env)
    c, initials = send_initials(env, addr, 'a.example')
    assert env.recv(c)[0] == initials[0]
    out = old.export_sessions()
    assert [meta['p'] for meta, _ in out] == ['A']
    fds = [os.dup(sock.fileno()) for _, sock in out]
    for _, sock in out:
        sock.close()
    new, addr2, _ = routed(env, ups=ups)
    assert new.adopt_sessions([meta for meta, _ in out], fds) == 1
    sess = next(iter(new._sessions.values()))
    assert sess.pool is new._routed['A']
    new.start()
    c.sendto(b'after the reload', addr2)            # (the new listener socket: a test stand-in)
    env.run_until(lambda: b'after the reload' in sent(ups['A']), what='the adopted session')
    assert ups['A'].source_of(b'after the reload') == ups['A'].source_of(initials[0])


def test_a_wildcard_listener_routes_and_answers_from_the_address_used(env):
    svc, (_, port), ups = routed(env, host='0.0.0.0')
    c = env.udp(V4, ('127.0.0.1', 0))
    parts = split_initials(os.urandom(8), client_hello('b.example', padding=2500), 3)
    for d in parts:
        c.sendto(d, ('127.0.0.2', port))
    env.run_until(lambda: len(ups['B'].got) == 3, what='routing')
    assert sent(ups['B']) == parts
    assert env.recv(c) == (parts[0], ('127.0.0.2', port))
