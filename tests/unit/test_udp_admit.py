"""UdpService's listener side (admit.py) in-process: proxy_protocol over UDP and the
per-IP limit over the table shared by all workers. A uvloop loop, real sockets on
127.0.0.1 / ::1 (the Env, EchoUpstream and CountingLimit of test_udp_service.py)."""

from __future__ import annotations

import logging
import os

import pytest
from helpers.udp_unit import V4, V6, CountingLimit, EchoUpstream, Env

from helpers.unit import serve_env
from mpproxy.config.schema import (Address, Config, Listener, ProxyProtocol, Server, UdpOptions,
                                   Upstream)
from mpproxy.proxy.edge import proxy_header
from mpproxy.proxy.udp.admit import MAX_PAYLOAD, _unmapped
from mpproxy.proxy.udp.service import UdpService
from mpproxy.proxy.udp.session import GateLimit
from mpproxy.shared import limits
from mpproxy.upstream.pool import UpstreamPool

FRONT = ('203.0.113.7', 4000)             # the real client a proxy in front names
FRONT_DST = ('198.51.100.1', 53)          # ... and the address that client sent to


@pytest.fixture
def env():
    yield from serve_env(Env())


def service(env, upstream_addr, family=V4, host='127.0.0.1', send='none', accept=False,
            trusted=('127.0.0.1/32',), per_ip=None, deny=(), v6only=True, idle=30.0,
            start=True):
    lsock = env.udp(family, (host, 0), reuseport=True, v6only=v6only)
    port = lsock.getsockname()[1]
    up = Upstream(name='u', servers=(Server(address=Address(upstream_addr[0], upstream_addr[1])),))
    pp = ProxyProtocol(accept=accept, trusted=tuple(trusted) if accept else (), send=send)
    listener = Listener(name='test', listen=Address(host, port), protocol='udp', upstream='u',
                        idle_timeout=idle, proxy_protocol=pp, deny=tuple(deny),
                        ipv6only=v6only, udp=UdpOptions())
    svc = UdpService(env.loop, listener, lsock, UpstreamPool(up), env.log, per_ip=per_ip)
    env.services.append(svc)
    if start:
        svc.start()
    return svc, port


def split(datagram: bytes):
    """(header, payload) of a datagram the upstream got with send: v2."""
    state, header, used, reason = proxy_header.parse(datagram)
    assert state == proxy_header.DONE, reason
    return header, datagram[used:]


def messages(env, level=logging.DEBUG):
    return [r.getMessage() for r in env.handler.records if r.levelno >= level]


# -- send: v2 ------------------------------------------------------------------------------

@pytest.mark.parametrize('family,host,fam_byte', [(V4, '127.0.0.1', 0x12), (V6, '::1', 0x22)])
def test_send_v2_prefixes_every_datagram_and_replies_come_back_bare(env, family, host, fam_byte):
    up = EchoUpstream(env, family, host)
    svc, port = service(env, up.addr, family, host, send='v2')
    c = env.udp(family, (host, 0))
    for i in range(3):
        c.sendto(b'data-%d' % i, (host, port))
        data, src = env.recv(c)
        assert src[:2] == (host, port)
        header, payload = split(data)           # the echo upstream sends it all back
        assert payload == b'data-%d' % i
    raws = [d for d, _ in up.got]
    assert len(set(r[:len(r) - 6] for r in raws)) == 1      # one header, built once
    header, _ = split(raws[0])
    assert (header.version, header.local, header.transport) == (2, False, 'udp')
    assert header.source == c.getsockname()[:2]
    assert header.destination == (host, port)
    assert raws[0][12:14] == bytes((0x21, fam_byte))         # PROXY; INET(6) + DGRAM
    assert (svc.stats.too_big, svc.stats.dropped, svc.stats.sessions_created) == (0, 0, 1)


def test_send_v2_wildcard_names_the_address_the_client_sent_to(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, host='0.0.0.0', send='v2')
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'to-2', ('127.0.0.2', port))
    data, src = env.recv(c)
    assert src == ('127.0.0.2', port)
    header, payload = split(data)
    assert (header.source, header.destination, payload) == \
        (c.getsockname(), ('127.0.0.2', port), b'to-2')


def test_send_v2_dual_stack_writes_an_ipv4_client_as_ipv4(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, V6, '::', send='v2', v6only=False)
    c4 = env.udp(V4, ('127.0.0.1', 0))
    c4.sendto(b'four', ('127.0.0.3', port))
    data, _ = env.recv(c4)
    assert data[13] == 0x12                                  # AF_INET + DGRAM, not INET6
    header, payload = split(data)
    assert (header.source, header.destination, payload) == \
        (c4.getsockname(), ('127.0.0.3', port), b'four')
    c6 = env.udp(V6, ('::1', 0))
    c6.sendto(b'six', ('::1', port))
    header, payload = split(env.recv(c6)[0])
    assert (header.source, header.destination, payload) == \
        (c6.getsockname()[:2], ('::1', port), b'six')


def test_unmapped_only_when_both_ends_are_ipv4_mapped():
    assert _unmapped(('::ffff:10.0.0.1', 1, 0, 0), ('::ffff:10.0.0.2', 2)) == \
        (('10.0.0.1', 1), ('10.0.0.2', 2))
    assert _unmapped(('::ffff:10.0.0.1', 1), ('::1', 2)) == (('::ffff:10.0.0.1', 1), ('::1', 2))
    assert _unmapped(('2001:db8::1', 1), ('::ffff:10.0.0.2', 2)) == \
        (('2001:db8::1', 1), ('::ffff:10.0.0.2', 2))


@pytest.mark.parametrize('family,host', [(V4, '127.0.0.1'), (V6, '::1')])
def test_send_v2_a_datagram_without_room_for_the_header_is_dropped(env, family, host):
    up = EchoUpstream(env, family, host, copies=0)
    svc, port = service(env, up.addr, family, host, send='v2')
    c = env.udp(family, (host, 0))
    head = 28 if family == V4 else 52
    fits = MAX_PAYLOAD[family] - head                        # 65479 / 65475
    for size in (fits + 1, MAX_PAYLOAD[family], fits, 100, fits + 1):
        c.sendto(b'x' * size, (host, port))
    env.run_until(lambda: len(up.got) == 2 and svc.stats.datagrams_in == 5, 5.0, 'the datagrams')
    env.run_for(0.05)
    assert [len(d) - head for d, _ in up.got] == [fits, 100]
    assert split(up.got[0][0])[1] == b'x' * fits
    st = svc.stats
    assert (st.too_big, st.dropped, st.sessions_active) == (3, 3, 1)
    lines = [m for m in messages(env, logging.WARNING) if 'does not fit' in m]
    assert len(lines) == 1 and str(fits + 1) in lines[0], lines   # rate-limited


@pytest.mark.parametrize('send,accept,proxied', [('none', False, False), ('v2', False, True),
                                                 ('none', True, True)])
def test_only_a_listener_with_proxy_protocol_gets_the_proxied_reader(env, send, accept,
                                                                     proxied):
    up = EchoUpstream(env)
    calls = []
    svc, port = service(env, up.addr, send=send, accept=accept, start=False)
    for name in ('_on_listener', '_on_listener_proxied'):
        method = getattr(svc._admission, name)
        setattr(svc._admission, name, lambda m=method, n=name: (calls.append(n), m()))
    svc.start()
    c = env.udp(V4, ('127.0.0.1', 0))
    head = proxy_header.v2(FRONT, FRONT_DST, 'udp') if accept else b''
    c.sendto(head + b'x', ('127.0.0.1', port))
    env.recv(c)
    assert set(calls) == {'_on_listener_proxied' if proxied else '_on_listener'}


# -- accept: true --------------------------------------------------------------------------

def test_accept_strips_each_header_and_the_real_client_drives_send(env):
    up = EchoUpstream(env)
    limit = CountingLimit(5)
    svc, port = service(env, up.addr, accept=True, send='v2', per_ip=limit)
    front = env.udp(V4, ('127.0.0.1', 0))
    incoming = proxy_header.v2(FRONT, FRONT_DST, 'udp')
    for i in range(3):
        front.sendto(incoming + b'q%d' % i, ('127.0.0.1', port))
        data, src = env.recv(front)
        assert src == ('127.0.0.1', port)                    # replies go to the sender
        header, payload = split(data)                        # (the echo of what we sent)
        assert (header.source, header.destination, payload) == (FRONT, FRONT_DST, b'q%d' % i)
    # a later header with extra TLVs is parsed and cut off too; the session keeps its client
    other = proxy_header.v2(('192.0.2.99', 1), FRONT_DST, 'udp', tlvs=b'\x04\x00\x01x')
    front.sendto(other + b'tlv', ('127.0.0.1', port))
    header, payload = split(env.recv(front)[0])
    assert (header.source, payload) == (FRONT, b'tlv')
    assert limit.held == {FRONT[0]: 1}                       # the real client is counted
    [sess] = svc._sessions.values()
    assert (sess.client, sess.addr) == (FRONT, front.getsockname())
    assert (svc.stats.sessions_created, svc.stats.bad_headers) == (1, 0)


def test_accept_without_send_forwards_the_bare_payload(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, accept=True)
    front = env.udp(V4, ('127.0.0.1', 0))
    front.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp') + b'bare', ('127.0.0.1', port))
    assert env.recv(front)[0] == b'bare'
    front.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp'), ('127.0.0.1', port))
    assert env.recv(front)[0] == b''                         # a header and 0 bytes: passes
    assert [d for d, _ in up.got] == [b'bare', b'']


def test_accept_local_header_keeps_the_sender_as_client(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, accept=True, send='v2')
    front = env.udp(V4, ('127.0.0.1', 0))
    front.sendto(proxy_header.v2(None, None) + b'health', ('127.0.0.1', port))
    header, payload = split(env.recv(front)[0])
    assert (header.source, header.destination, payload) == \
        (front.getsockname(), ('127.0.0.1', port), b'health')


@pytest.mark.parametrize('datagram, reason', [
    (b'garbage', 'not a PROXY protocol header'),
    (proxy_header.v1(FRONT, FRONT_DST) + b'x', 'a v1 PROXY header (UDP takes v2 only)'),
    (proxy_header.v2(FRONT, FRONT_DST, 'udp')[:20], 'ends inside its PROXY protocol header'),
    (b'', 'ends inside its PROXY protocol header'),
])
def test_accept_drops_datagrams_without_a_valid_v2_header(env, datagram, reason):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, accept=True)
    front = env.udp(V4, ('127.0.0.1', 0))
    front.sendto(datagram, ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.bad_headers == 1, 5.0, 'the bad header')
    assert (svc.stats.sessions_created, up.got) == (0, [])
    assert any(reason in m for m in messages(env, logging.WARNING)), messages(env)
    front.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp') + b'good', ('127.0.0.1', port))
    assert env.recv(front)[0] == b'good'
    front.sendto(datagram, ('127.0.0.1', port))              # an open session: still dropped
    env.run_until(lambda: svc.stats.bad_headers == 2, 5.0, 'the second bad header')
    env.nothing(front, 0.05)
    assert [d for d, _ in up.got] == [b'good']


def test_accept_drops_untrusted_senders(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, accept=True)
    stranger = env.udp(V4, ('127.0.0.2', 0))
    for _ in range(3):
        stranger.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp') + b'x', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.untrusted == 3, 5.0, 'the untrusted datagrams')
    env.nothing(stranger, 0.05)
    assert (up.got, svc.stats.sessions_created, svc.stats.dropped) == ([], 0, 0)
    lines = [m for m in messages(env) if 'not in proxy_protocol.trusted' in m]
    assert len(lines) == 1 and '127.0.0.2' in lines[0]


def test_accept_allow_deny_checks_the_real_client(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, accept=True, deny=('203.0.113.0/24',))
    front = env.udp(V4, ('127.0.0.1', 0))
    front.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp') + b'no', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.denied == 1, 5.0, 'the denial')
    front.sendto(proxy_header.v2(('192.0.2.1', 9), FRONT_DST, 'udp') + b'yes', ('127.0.0.1', port))
    assert env.recv(front)[0] == b'yes'
    assert [d for d, _ in up.got] == [b'yes']
    assert any("('203.0.113.7', 4000) via ('127.0.0.1'" in m and 'denied' in m
               for m in messages(env)), messages(env)


def test_accept_per_ip_limit_counts_real_clients_not_the_sender(env):
    up = EchoUpstream(env)
    limit = CountingLimit(1)
    svc, port = service(env, up.addr, accept=True, per_ip=limit)
    fronts = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(3)]
    for f, client in zip(fronts, (FRONT, ('192.0.2.1', 1), (FRONT[0], 4001))):
        f.sendto(proxy_header.v2(client, FRONT_DST, 'udp') + b'hi', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.datagrams_in == 3, 5.0, 'the datagrams')
    assert env.recv(fronts[0])[0] == b'hi' and env.recv(fronts[1])[0] == b'hi'
    env.nothing(fronts[2], 0.05)
    assert svc.stats.sessions_refused_per_ip == 1
    assert limit.held == {FRONT[0]: 1, '192.0.2.1': 1}


def test_adopted_sessions_keep_their_real_client_and_follow_the_new_send(env):
    up = EchoUpstream(env)
    old, port = service(env, up.addr, accept=True)
    front = env.udp(V4, ('127.0.0.1', 0))
    front.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp') + b'one', ('127.0.0.1', port))
    assert env.recv(front)[0] == b'one'
    out = old.export_sessions()
    fds = [os.dup(sock.fileno()) for _, sock in out]
    for _, sock in out:
        sock.close()
    limit = CountingLimit(0)                                 # a limit lowered to nothing
    new, _ = service(env, up.addr, accept=True, send='v2', per_ip=limit)
    assert new.adopt_sessions([meta for meta, _ in out], fds) == 1
    assert limit.held == {FRONT[0]: 1}                       # adopted: counted anyway
    [sess] = new._sessions.values()
    assert (sess.client, sess.told) == (FRONT, FRONT_DST)
    header, payload = split(sess.head + b'two')
    assert (header.source, header.destination) == (FRONT, FRONT_DST)
    up.sock.sendto(b'reply', up.got[0][1])                   # the same upstream socket
    assert env.recv(front)[0] == b'reply'


# -- udp.max_sessions_per_ip over the shared limits table -----------------------------------

def test_gate_limit_counts_in_the_shared_table(env):
    table = limits.LimitTable.allocate(4)
    lis = Listener(name='l', listen=Address('127.0.0.1', 1), protocol='udp', upstream='u',
                   udp=UdpOptions(max_sessions_per_ip=2))
    index = table.assign(_config(lis))
    one, two = (table.area(table.take_slot()) for _ in range(2))
    a, b = GateLimit(one.gate_for(lis, index)), GateLimit(two.gate_for(lis, index))
    assert a.acquire('127.0.0.1') and b.acquire('::ffff:127.0.0.1')   # the same IP, 2 workers
    assert not a.acquire('127.0.0.1') and not b.acquire('127.0.0.1')
    assert a.gate.try_acquire(limits.ip_key('127.0.0.1')) == 'max_sessions_per_ip'
    assert b.acquire('127.0.0.2')
    a.adopt('127.0.0.1')                                     # over the limit: counted anyway
    assert table.per_ip(index[lis.key], limits.ip_key('127.0.0.1')) == 3
    a.release('127.0.0.1')
    a.release('127.0.0.1')
    assert b.acquire('127.0.0.1')
    assert table.per_ip(index[lis.key], limits.ip_key('127.0.0.1')) == 2


def _config(*listeners):
    return Config(path='test.yaml', listeners=listeners)


def test_service_with_gate_limit_refuses_past_the_shared_count(env):
    up = EchoUpstream(env)
    table = limits.LimitTable.allocate(2)
    lis = Listener(name='l', listen=Address('127.0.0.1', 1), protocol='udp', upstream='u',
                   udp=UdpOptions(max_sessions_per_ip=1))
    index = table.assign(_config(lis))
    other = table.area(table.take_slot()).gate_for(lis, index)
    other.try_acquire(limits.ip_key('127.0.0.1'))            # another worker holds one session
    gate = table.area(table.take_slot()).gate_for(lis, index)
    svc, port = service(env, up.addr, per_ip=GateLimit(gate), idle=0.3)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'x', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.sessions_refused_per_ip == 1, 5.0, 'the refusal')
    assert any('udp.max_sessions_per_ip' in m for m in messages(env, logging.WARNING))
    other.release(limits.ip_key('127.0.0.1'))                # that one ended
    c.sendto(b'y', ('127.0.0.1', port))
    assert env.recv(c)[0] == b'y'
    assert table.per_ip(index[lis.key], limits.ip_key('127.0.0.1')) == 1
    env.run_until(lambda: svc.stats.sessions_expired == 1, 5.0, 'expiry')
    assert table.per_ip(index[lis.key], limits.ip_key('127.0.0.1')) == 0


def test_accept_hashes_on_the_real_client(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, accept=True)
    asked = []
    pool = svc._pool

    class Recording:
        needs_client = True

        def candidates(self, client, tries):
            asked.append(client)
            return pool.candidates(client, tries)

        def __getattr__(self, name):
            return getattr(pool, name)
    svc._pool = Recording()
    front = env.udp(V4, ('127.0.0.1', 0))
    front.sendto(proxy_header.v2(FRONT, FRONT_DST, 'udp') + b'h', ('127.0.0.1', port))
    assert env.recv(front)[0] == b'h'
    assert asked == [FRONT]
