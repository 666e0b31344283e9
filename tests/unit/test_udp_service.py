"""UdpService in-process: a uvloop loop, real sockets on 127.0.0.1 / ::1.

Each test builds a listener socket, a small UDP upstream living in the same
loop, and clients that are polled from inside the loop. Every wait has a
deadline; every socket is closed in teardown; no exception may reach the
loop's exception handler.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest

from helpers.udp_unit import V4, V6, Clock, CountingLimit, EchoUpstream, Env
from helpers.unit import ListHandler, serve_env
from mpproxy.config.schema import Address, Listener, Server, UdpOptions, Upstream
from mpproxy.proxy.io.ratelog import RateLimitedLog
from mpproxy.proxy.udp.service import UdpService
from mpproxy.upstream.pool import UpstreamPool


@pytest.fixture(params=['plain', 'proxied'])
def env(request):
    """Every test here runs through both listener readers: the plain one, and the one of a
    listener with proxy_protocol (here with nothing to add or strip: the same behaviour)."""
    env = Env()
    env.reader = request.param
    yield from serve_env(env)


def service(env, upstream_addr, family=V4, host='127.0.0.1', idle=30.0, responses=0,
            max_sessions=10000, pool=None, per_ip=None, clock=None):
    lsock = env.udp(family, (host, 0), reuseport=True)
    port = lsock.getsockname()[1]
    up = Upstream(name='u', servers=(Server(address=Address(upstream_addr[0], upstream_addr[1])),))
    listener = Listener(name='test', listen=Address(host, port), protocol='udp', upstream='u',
                        idle_timeout=idle,
                        udp=UdpOptions(responses=responses, max_sessions=max_sessions))
    svc = UdpService(env.loop, listener, lsock, pool or UpstreamPool(up), env.log, per_ip=per_ip,
                     clock=clock)
    env.services.append(svc)
    svc.start()
    if env.reader == 'proxied':
        env.loop.remove_reader(svc._lfd)
        env.loop.add_reader(svc._lfd, svc._admission._on_listener_proxied)
    return svc, port


def open_fds():
    return set(int(fd) for fd in os.listdir('/proc/self/fd'))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# -- sessions ---------------------------------------------------------------------


def test_two_clients_get_independent_sessions(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr)
    c1 = env.udp(V4, ('127.0.0.1', 0))
    c2 = env.udp(V4, ('127.0.0.1', 0))
    for i in range(3):
        c1.sendto(b'one-%d' % i, ('127.0.0.1', port))
        c2.sendto(b'two-%d' % i, ('127.0.0.1', port))
    got1 = [env.recv(c1) for _ in range(3)]
    got2 = [env.recv(c2) for _ in range(3)]
    assert sorted(d for d, _ in got1) == [b'one-0', b'one-1', b'one-2']
    assert sorted(d for d, _ in got2) == [b'two-0', b'two-1', b'two-2']
    assert {src for _, src in got1 + got2} == {('127.0.0.1', port)}
    env.nothing(c1)
    env.nothing(c2, 0.0)
    by_source = {}
    for data, src in up.got:
        by_source.setdefault(src, set()).add(data[:3])
    assert len(by_source) == 2                      # two upstream source ports
    assert sorted(by_source.values(), key=sorted) == [{b'one'}, {b'two'}]
    st = svc.stats
    assert (st.sessions_created, st.sessions_active) == (2, 2)
    assert (st.datagrams_in, st.datagrams_out, st.dropped) == (6, 6, 0)
    assert svc.busy()


def test_idle_session_expires_and_activity_keeps_it(env):
    up = EchoUpstream(env)
    clock = Clock()
    svc, port = service(env, up.addr, idle=0.3, clock=clock)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'a', ('127.0.0.1', port))
    assert env.recv(c)[0] == b'a'
    clock.advance(0.29)
    env.run_for(3 * svc._period)                    # sweeps come: not idle long enough yet
    assert svc.stats.sessions_active == 1
    clock.advance(0.02)
    env.run_until(lambda: svc.stats.sessions_active == 0, 5.0, 'expiry')
    assert (svc.stats.sessions_expired, svc.busy()) == (1, False)
    assert svc._timer is None                       # no timer while the table is empty
    c.sendto(b'b', ('127.0.0.1', port))
    assert env.recv(c)[0] == b'b'
    assert up.got[1][1] != up.got[0][1]             # a new session, a new source port

    # datagrams every 0.1s keep a 0.3s session alive (1 s of the service's clock)
    created = svc.stats.sessions_created
    for _ in range(10):
        c.sendto(b'k', ('127.0.0.1', port))
        assert env.recv(c)[0] == b'k'
        clock.advance(0.1)
        env.run_for(svc._period)                    # a sweep sees every step
    assert svc.stats.sessions_created == created
    assert svc.stats.sessions_expired == 1


@pytest.mark.parametrize('responses,copies', [(1, 2), (2, 3)])
def test_responses_end_the_session(env, responses, copies):
    up = EchoUpstream(env, copies=copies)
    svc, port = service(env, up.addr, responses=responses)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'x', ('127.0.0.1', port))
    for _ in range(responses):
        assert env.recv(c)[0] == b'x'
    env.run_until(lambda: svc.stats.sessions_completed == 1, 5.0, 'session end')
    assert svc.stats.sessions_active == 0
    env.nothing(c)                                  # the extra replies are not relayed
    c.sendto(b'y', ('127.0.0.1', port))
    assert env.recv(c)[0] == b'y'
    assert up.got[1][1] != up.got[0][1]             # new session = new source port
    assert svc.stats.sessions_created == 2


@pytest.mark.parametrize('family,host,size', [(V4, '127.0.0.1', 0), (V4, '127.0.0.1', 65507),
                                              (V6, '::1', 0), (V6, '::1', 65527)])
def test_datagram_sizes_both_ways(env, family, host, size):
    up = EchoUpstream(env, family, host)
    svc, port = service(env, up.addr, family, host)
    c = env.udp(family, (host, 0))
    payload = bytes(range(256)) * (size // 256) + b'z' * (size % 256)
    c.sendto(payload, (host, port))
    data, src = env.recv(c)
    assert data == payload and src[:2] == (host, port)
    assert up.got[0][0] == payload
    assert (svc.stats.datagrams_in, svc.stats.datagrams_out, svc.stats.dropped) == (1, 1, 0)


def test_max_sessions_drops_and_counts(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, max_sessions=2)
    clients = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(3)]
    for c in clients[:2]:
        c.sendto(b'in', ('127.0.0.1', port))
        assert env.recv(c)[0] == b'in'
    clients[2].sendto(b'out', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.datagrams_in == 3, 5.0, 'the third datagram')
    env.nothing(clients[2])
    assert (svc.stats.dropped, svc.stats.sessions_active, len(set(up.sources()))) == (1, 2, 2)
    assert any('max_sessions' in r.getMessage() for r in env.handler.records)
    clients[0].sendto(b'again', ('127.0.0.1', port))   # existing sessions still flow
    assert env.recv(clients[0])[0] == b'again'


# -- a full table: who makes room for a new client --------------------------------------


def talk(env, client, port, payload):
    """One request and its reply through the proxy."""
    client.sendto(payload, ('127.0.0.1', port))
    assert env.recv(client)[0] == payload


def test_full_table_ends_the_oldest_never_answered_session_first(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, max_sessions=4)
    a, b, c, d, e, f = (env.udp(V4, ('127.0.0.1', 0)) for _ in range(6))
    talk(env, a, port, b'a1')                       # answered
    b.sendto(b'mute-b', ('127.0.0.1', port))        # never answered: the oldest such
    env.run_until(lambda: len(up.got) == 2, 5.0, "b's datagram upstream")
    c.sendto(b'mute-c', ('127.0.0.1', port))        # not answered at first ...
    env.run_until(lambda: len(up.got) == 3, 5.0, "c's datagram upstream")
    talk(env, c, port, b'c1')                       # ... then answered: no longer a candidate
    d.sendto(b'mute-d', ('127.0.0.1', port))        # never answered, newer than b
    env.run_until(lambda: len(up.got) == 5, 5.0, "d's datagram upstream")
    assert svc.stats.sessions_active == 4
    # b and d are as recent as anyone (talking by time alone): never answered goes first
    talk(env, e, port, b'e1')
    st = svc.stats
    assert (st.sessions_evicted_unanswered, st.sessions_evicted_idle, st.sessions_refused) == \
        (1, 0, 0)
    assert b.getsockname() not in svc._sessions and d.getsockname() in svc._sessions
    talk(env, f, port, b'f1')                       # then d, skipping c (answered since)
    assert (st.sessions_evicted_unanswered, st.sessions_active) == (2, 4)
    assert d.getsockname() not in svc._sessions
    assert set(svc._sessions) == {x.getsockname() for x in (a, c, e, f)}
    # the answered sessions kept their upstream socket (same source port upstream)
    talk(env, a, port, b'a2')
    talk(env, c, port, b'c2')
    assert up.source_of(b'a2') == up.source_of(b'a1')
    assert up.source_of(b'c2') == up.source_of(b'c1') == up.source_of(b'mute-c')
    assert st.dropped == 0                          # every new client got in
    lines = [r.getMessage() for r in env.handler.records]
    assert any('never answered' in m and str(b.getsockname()) in m for m in lines), lines


def test_full_table_then_ends_the_least_recently_active_idle_session(env):
    up = EchoUpstream(env)
    # idle_timeout 2s: talking means a datagram within min(1, 2/4) s (+ the 0.5 s sweep period)
    clock = Clock()
    svc, port = service(env, up.addr, idle=2.0, max_sessions=3, clock=clock)
    assert svc._table.talking == 1.0
    a, b, c, d, e = (env.udp(V4, ('127.0.0.1', 0)) for _ in range(5))
    for x, name in ((a, b'a'), (b, b'b'), (c, b'c')):
        talk(env, x, port, name + b'1')
        clock.advance(0.01)                         # b is active after a, c after b
    clock.advance(svc._table.talking + 0.1)         # all three stop talking ...
    talk(env, c, port, b'c2')                       # ... then c and a talk again
    talk(env, a, port, b'a2')
    talk(env, d, port, b'd1')                       # b is the least recently active: ended
    st = svc.stats
    assert (st.sessions_evicted_idle, st.sessions_evicted_unanswered, st.sessions_expired) == \
        (1, 0, 0)
    assert set(svc._sessions) == {a.getsockname(), c.getsockname(), d.getsockname()}
    e.sendto(b'e1', ('127.0.0.1', port))            # a, c and d are talking: e is refused
    env.run_until(lambda: st.datagrams_in == 7, 5.0, "e's datagram")
    env.nothing(e)
    assert (st.sessions_refused, st.sessions_evicted_idle, st.dropped) == (1, 1, 1)
    talk(env, a, port, b'a3')
    talk(env, c, port, b'c3')
    assert up.source_of(b'a3') == up.source_of(b'a1')
    assert up.source_of(b'c3') == up.source_of(b'c1')
    evicted = [r.getMessage() for r in env.handler.records if 'idle ' in r.getMessage()]
    assert len(evicted) == 1 and str(b.getsockname()) in evicted[0], evicted


def test_full_table_never_ends_a_talking_session_and_counts_the_refused(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, max_sessions=3)
    talkers = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(3)]
    for i, t in enumerate(talkers):
        talk(env, t, port, b't%d-0' % i)
    newcomers = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(20)]
    for rnd in range(1, 4):                         # newcomers and talkers interleaved
        for n in newcomers:
            n.sendto(b'new', ('127.0.0.1', port))
        for i, t in enumerate(talkers):
            talk(env, t, port, b't%d-%d' % (i, rnd))
    env.run_until(lambda: svc.stats.datagrams_in == 3 * 4 + 60, 5.0, 'every datagram')
    for n in newcomers:
        env.nothing(n, 0.0)
    st = svc.stats
    assert (st.sessions_refused, st.dropped, st.sessions_created, st.sessions_active) == \
        (60, 60, 3, 3)
    assert (st.sessions_evicted_unanswered, st.sessions_evicted_idle) == (0, 0)
    for i in range(3):                              # one session each, all along
        assert len({up.source_of(b't%d-%d' % (i, r)) for r in range(4)}) == 1
    assert all(d != b'new' for d, _ in up.got)      # no newcomer reached the upstream
    refused = [r for r in env.handler.records if 'all talking' in r.getMessage()]
    assert len(refused) == 1                        # 60 refusals within a second: one line
    assert refused[0].levelno == logging.WARNING and 'max_sessions' in refused[0].getMessage()


def test_a_flood_of_new_clients_keeps_the_table_at_its_cap_and_logs_counts(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, idle=2.0, max_sessions=5)
    talker = env.udp(V4, ('127.0.0.1', 0))
    talk(env, talker, port, b'talk-0')
    flood = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(200)]
    for i, f in enumerate(flood):                   # spoofed-like: the upstream never answers
        f.sendto(b'mute-%d' % i, ('127.0.0.1', port))
        if i % 50 == 49:
            talk(env, talker, port, b'talk-%d' % (i // 50 + 1))
    env.run_until(lambda: svc.stats.datagrams_in == 205, 5.0, 'the flood')
    st = svc.stats
    assert (st.sessions_evicted_unanswered, st.sessions_refused, st.sessions_active) == \
        (196, 0, 5)
    assert len({up.source_of(b'talk-%d' % i) for i in range(5)}) == 1
    # nothing grows with the number of clients: both orders hold at most the cap, the
    # rate-limited log a few causes
    assert len(svc._table.active) == 5 and len(svc._table.unanswered) <= 5
    assert len(svc._rl._last) <= 2
    lines = [r.getMessage() for r in env.handler.records if 'never answered' in r.getMessage()]
    assert len(lines) == 1
    # once the table stops overflowing, the next sweep writes the suppressed count out
    env.run_until(lambda: any('never answered' in r.getMessage() and
                              '(195 similar suppressed)' in r.getMessage()
                              for r in env.handler.records), 3.0, 'the count of evictions')


def test_per_ip_seam_acquires_on_open_and_releases_once_at_every_end(env):
    up = EchoUpstream(env)
    limit = CountingLimit(2)
    svc, port = service(env, up.addr, idle=1.0, max_sessions=3, per_ip=limit)
    one = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(3)]
    two = env.udp(V4, ('127.0.0.2', 0))
    talk(env, one[0], port, b'x0')
    one[1].sendto(b'mute', ('127.0.0.1', port))
    talk(env, one[0], port, b'x0 again')            # an open session: no more calls
    env.run_until(lambda: svc.stats.sessions_created == 2, 5.0, 'the second session')
    assert limit.held == {'127.0.0.1': 2}
    one[2].sendto(b'x2', ('127.0.0.1', port))       # a third from 127.0.0.1: over its limit
    env.run_until(lambda: svc.stats.sessions_refused_per_ip == 1, 5.0, 'the per-IP refusal')
    env.nothing(one[2], 0.05)
    assert limit.held == {'127.0.0.1': 2} and svc.stats.sessions_evicted_unanswered == 0
    talk(env, two, port, b'y')                      # 127.0.0.2 has its own count; table full now
    assert (limit.held, svc.stats.dropped) == ({'127.0.0.1': 2, '127.0.0.2': 1}, 1)
    # eviction releases: another 127.0.0.2 client ends the never-answered session
    two_b = env.udp(V4, ('127.0.0.2', 0))
    talk(env, two_b, port, b'z')
    assert svc.stats.sessions_evicted_unanswered == 1
    assert limit.held == {'127.0.0.1': 1, '127.0.0.2': 2}
    env.run_until(lambda: svc.stats.sessions_expired == 3, 5.0, 'expiry')   # expiry releases
    assert limit.held == {'127.0.0.1': 0, '127.0.0.2': 0}
    talk(env, one[2], port, b'x2 again')
    svc.close()                                     # close releases
    assert limit.held == {'127.0.0.1': 0, '127.0.0.2': 0}
    acquired = sum(1 for c in limit.calls if c[0] == 'acquire' and c[2])
    assert acquired == sum(1 for c in limit.calls if c[0] == 'release') == 5


def test_per_ip_seam_releases_when_the_session_cannot_open_or_is_handed_over(env):
    probe = socket.socket(V4, socket.SOCK_DGRAM)
    probe.bind(('127.0.0.1', 0))
    dead = probe.getsockname()
    probe.close()
    limit = CountingLimit(5)

    class NoServers:
        needs_client = False

        def candidates(self, client_addr, tries):
            return iter(())
    svc, port = service(env, dead, pool=NoServers(), per_ip=limit)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'x', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.dropped == 1, 5.0, 'the drop')
    assert limit.calls == [('acquire', '127.0.0.1', True), ('release', '127.0.0.1')]

    up = EchoUpstream(env)
    old, port = service(env, up.addr, per_ip=limit)
    for i in range(3):
        talk(env, env.udp(V4, ('127.0.0.1', 0)), port, b'%d' % i)
    assert limit.held == {'127.0.0.1': 3}
    out = old.export_sessions()                     # they leave this worker: released
    assert limit.held == {'127.0.0.1': 0}
    fds = [os.dup(sock.fileno()) for _, sock in out]
    for _, sock in out:
        sock.close()
    limit.limit = 2                                 # a reload lowered the limit
    new, _ = service(env, up.addr, per_ip=limit)
    assert new.adopt_sessions([meta for meta, _ in out], fds) == 3   # all kept ...
    assert limit.held == {'127.0.0.1': 3}           # ... and counted, over the limit too
    assert limit.calls[-3:] == [('adopt', '127.0.0.1')] * 3
    new.close()
    assert limit.held == {'127.0.0.1': 0}


def test_dead_upstream_ends_session_and_logs_once(env):
    probe = socket.socket(V4, socket.SOCK_DGRAM)
    probe.bind(('127.0.0.1', 0))
    dead = probe.getsockname()
    probe.close()                                   # nothing listens there now
    svc, port = service(env, dead)
    clients = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(4)]
    for i, c in enumerate(clients):
        c.sendto(b'hello', ('127.0.0.1', port))
        env.run_until(lambda: svc.stats.sessions_failed == i + 1, 5.0, 'ECONNREFUSED')
    assert (svc.stats.sessions_active, svc.busy()) == (0, False)
    warnings = [r for r in env.handler.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1                       # rate-limited: one line per second
    assert 'Connection refused' in warnings[0].getMessage()

    # the loop survived: bring the upstream to life on that port and it works
    up = EchoUpstream(env, port=dead[1])
    clients[0].sendto(b'alive', ('127.0.0.1', port))
    assert env.recv(clients[0])[0] == b'alive'
    assert up.got[0][0] == b'alive'


def test_errors_in_callbacks_do_not_escape(env):
    class BrokenPool:
        needs_client = False

        def candidates(self, client_addr, tries):
            raise RuntimeError('boom')
    svc, port = service(env, ('127.0.0.1', 9), pool=BrokenPool())
    c = env.udp(V4, ('127.0.0.1', 0))
    for _ in range(3):
        c.sendto(b'x', ('127.0.0.1', port))
    env.run_until(lambda: svc.stats.datagrams_in >= 1, 5.0, 'the datagram')
    env.run_for(0.05)
    errors = [r for r in env.handler.records if r.levelno == logging.ERROR]
    assert errors and 'boom' in errors[0].getMessage()
    # the env fixture asserts that nothing reached the loop's exception handler


# -- wildcard listeners --------------------------------------------------------------


def test_wildcard_v4_replies_from_the_address_the_client_used(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr, host='0.0.0.0')
    a = env.udp(V4, ('127.0.0.1', 0))
    b = env.udp(V4, ('127.0.0.1', 0))
    a.sendto(b'to-2', ('127.0.0.2', port))
    b.sendto(b'to-1', ('127.0.0.1', port))
    assert env.recv(a) == (b'to-2', ('127.0.0.2', port))
    assert env.recv(b) == (b'to-1', ('127.0.0.1', port))
    # one client, two local addresses: two sessions, each answered from its own address
    a.sendto(b'to-1', ('127.0.0.1', port))
    a.sendto(b'to-3', ('127.0.0.3', port))
    got = {env.recv(a), env.recv(a)}
    assert got == {(b'to-1', ('127.0.0.1', port)), (b'to-3', ('127.0.0.3', port))}
    assert svc.stats.sessions_created == 4
    a.sendto(b'again', ('127.0.0.2', port))         # same (client, local address): same session
    assert env.recv(a) == (b'again', ('127.0.0.2', port))
    assert svc.stats.sessions_created == 4


def test_wildcard_v6(env):
    up = EchoUpstream(env, V6, '::1')
    svc, port = service(env, up.addr, V6, '::')
    c = env.udp(V6, ('::1', 0))
    c.sendto(b'six', ('::1', port))
    data, src = env.recv(c)
    assert (data, src[:2]) == (b'six', ('::1', port))
    assert svc.stats.datagrams_out == 1


def test_wildcard_dual_stack_answers_v4_clients_from_their_address(env):
    up = EchoUpstream(env)
    lsock = env.udp(V6, ('::', 0), reuseport=True, v6only=False)
    port = lsock.getsockname()[1]
    listener = Listener(name='dual', listen=Address('::', port), protocol='udp', upstream='u',
                        ipv6only=False, idle_timeout=30.0)
    pool = UpstreamPool(Upstream(name='u', servers=(Server(address=Address(*up.addr)),)))
    svc = UdpService(env.loop, listener, lsock, pool, env.log)
    env.services.append(svc)
    svc.start()
    c4 = env.udp(V4, ('127.0.0.1', 0))
    c4.sendto(b'four', ('127.0.0.2', port))
    assert env.recv(c4) == (b'four', ('127.0.0.2', port))
    c6 = env.udp(V6, ('::1', 0))
    c6.sendto(b'six', ('::1', port))
    assert env.recv(c6)[0] == b'six'


# -- drain and close -------------------------------------------------------------------


def test_drain_stops_reading_but_replies_still_flow(env):
    up = EchoUpstream(env, copies=0)                # answers only when told to
    svc, port = service(env, up.addr)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'question', ('127.0.0.1', port))
    env.run_until(lambda: len(up.got) == 1, 5.0, 'the upstream to get the question')
    svc.drain()
    c.sendto(b'late', ('127.0.0.1', port))
    env.run_for(0.2)
    assert len(up.got) == 1 and svc.stats.datagrams_in == 1     # listener not read
    up.sock.sendto(b'answer', up.got[0][1])         # the in-flight reply
    assert env.recv(c) == (b'answer', ('127.0.0.1', port))
    assert svc.busy()
    svc.close()
    assert not svc.busy()
    assert svc.stats.sessions_closed == 1


def test_close_closes_every_session_socket(env):
    up = EchoUpstream(env)
    svc, port = service(env, up.addr)
    lsock = env.socks[-1]
    clients = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(3)]
    for c in clients:
        c.sendto(b'hi', ('127.0.0.1', port))
        assert env.recv(c)[0] == b'hi'
    sessions = list(svc._sessions.values())
    # (by the sessions, not by a before/after diff of /proc/self/fd: an earlier test's socket
    # collected meanwhile would free an fd number that a session then reuses)
    session_fds = {s.fd for s in sessions}
    assert len(session_fds) == 3 and session_fds <= open_fds()
    svc.close()
    # (fstat, not a listing of /proc/self/fd: the listing's own fd takes the lowest free
    # number, which may be one the close just freed)
    assert [fd for fd in session_fds if _is_open(fd)] == []
    assert all(s.sock is None for s in sessions)
    assert (svc.busy(), svc.stats.sessions_active, svc.stats.sessions_closed) == (False, 0, 3)
    assert lsock.fileno() != -1                     # the listener socket is not ours to close
    clients[0].sendto(b'after', ('127.0.0.1', port))
    env.run_for(0.1)
    assert svc.stats.datagrams_in == 3              # no longer read


# -- rate-limited logging -----------------------------------------------------------------


def test_ratelog_one_line_per_interval_per_cause():
    now = [100.0]
    handler = ListHandler()
    log = logging.getLogger('test.ratelog')
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    try:
        rl = RateLimitedLog(log, interval=1.0, clock=lambda: now[0])
        assert rl.warning('a', 'refused %s', 'x')
        for _ in range(4):
            assert not rl.warning('a', 'refused %s', 'x')
        assert rl.warning('b', 'other')                 # another cause has its own budget
        now[0] += 1.01
        assert rl.warning('a', 'refused %s', 'y')
        assert not rl.warning('a', 'refused %s', 'z')
        rl.flush()
        rl.flush()                                      # nothing pending twice
        lines = [r.getMessage() for r in handler.records]
        assert lines == ['refused x', 'other', 'refused y (4 similar suppressed)',
                         'refused z (1 similar suppressed)']
    finally:
        log.removeHandler(handler)
