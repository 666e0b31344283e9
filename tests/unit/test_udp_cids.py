"""QUIC sessions found by their connection IDs (udp/cids.py): the index alone, then in a
routed UdpService (a client that moves to a new port in the same worker), then two services
standing for two workers joined by worker/peers.py's channel (a client whose new flow the
kernel steers to the other worker)."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.quic import aioquic_initials, send_initials
from helpers.udp_unit import V4, Clock, EchoUpstream, Env
from helpers.unit import serve_env
from mpproxy.config.schema import (Address, Listener, ProxyProtocol, Server, UdpOptions,
                                   Upstream)
from mpproxy.proxy.edge import proxy_header
from mpproxy.proxy.edge.sni import SniRouter
from mpproxy.proxy.udp import cids, moves, quicroute
from mpproxy.proxy.udp.cids import CidIndex, server_cid
from mpproxy.proxy.udp.service import UdpService
from mpproxy.upstream.pool import UpstreamPool
from mpproxy.worker import peers as peers_module
from mpproxy.worker.peers import Peers


class S:
    """A stand-in session: what CidIndex reads and writes."""
    __slots__ = ('cids', 'name')

    def __init__(self, name='s'):
        self.cids = None
        self.name = name


def long_header(dcid: bytes, scid: bytes, version: int = 1, body: bytes = b'x' * 30) -> bytes:
    return bytes((0xC0,)) + version.to_bytes(4, 'big') + bytes((len(dcid),)) + dcid + \
        bytes((len(scid),)) + scid + body


def short_header(dcid: bytes, body: bytes = b'y' * 30) -> bytes:
    return b'\x41' + dcid + body


# -- the index ----------------------------------------------------------------------------

def test_a_session_is_found_by_each_id_it_learned_in_either_header_until_forgotten():
    index, a, b = CidIndex(), S('a'), S('b')
    ca, cb, cb2 = os.urandom(8), os.urandom(16), os.urandom(16)
    assert index.learn(a, ca) and index.learn(b, cb) and index.learn(b, cb2)
    assert index.lengths == {8: 1, 16: 2}
    for packet, want in ((short_header(ca), a), (short_header(cb), b), (short_header(cb2), b),
                         (long_header(cb, b''), b), (long_header(ca, os.urandom(8)), a)):
        assert index.find(packet, len(packet)) is want
    assert index.find(short_header(os.urandom(8)), 39) is None
    index.forget(b)
    assert (b.cids, index.lengths, len(index)) == (None, {8: 1}, 1)
    assert index.find(short_header(cb), 47) is None
    index.forget(a)
    assert (len(index), index.lengths) == (0, {})


def test_ids_kept_are_bounded_per_session_sized_and_never_taken_from_another_session():
    index, a, b = CidIndex(), S('a'), S('b')
    assert not index.learn(a, os.urandom(cids.MIN_CID - 1))       # guessable
    assert not index.learn(a, os.urandom(cids.MAX_CID + 1))
    assert not index.learn(a, None)
    mine = [os.urandom(8) for _ in range(cids.PER_SESSION + 2)]
    assert [index.learn(a, cid) for cid in mine] == \
        [True] * cids.PER_SESSION + [False, False]
    assert not index.learn(a, mine[0])                           # once
    assert not index.learn(b, mine[0])                           # a's: b does not get it
    assert index.find(short_header(mine[0]), 39) is a and b.cids == []
    assert len(index) == cids.PER_SESSION


def test_server_cid_reads_long_headers_only():
    scid = os.urandom(8)
    assert server_cid(long_header(b'\x01' * 8, scid), 60) == scid
    assert server_cid(long_header(b'', scid), 50) == scid                  # (to a 0-byte ID)
    assert server_cid(long_header(b'\x01' * 8, scid, version=0), 60) is None   # VN
    assert server_cid(short_header(scid), 39) is None
    assert server_cid(long_header(b'\x01' * 8, b'abc'), 60) is None       # too short to keep
    packet = long_header(b'\x01' * 8, scid)
    assert server_cid(packet, 20) is None                                  # cut inside the ID


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise(data):
    index = CidIndex()
    index.learn(S(), os.urandom(8))
    index.learn(S(), os.urandom(12))
    index.find(data, len(data))
    server_cid(data, len(data))
    cids.is_short(data, len(data))


# -- in a routed service --------------------------------------------------------------------

class QuicishUpstream(EchoUpstream):
    """A stand-in QUIC server: a long-header datagram is answered with a long header whose
    source ID is this server's ID for that upstream source; a short-header one is echoed
    (a short header back). Records (data, source)."""

    def __init__(self, env):
        self.ids = {}                   # upstream source -> the ID this server chose
        super().__init__(env)

    def answer(self, data, src):
        if data[0] & 0x80:
            self.sock.sendto(long_header(b'', self.ids.setdefault(src, os.urandom(8))), src)
        else:
            self.sock.sendto(data, src)


@pytest.fixture
def env():
    yield from serve_env(Env())


def routed(env, up, peers=None, key_port=None, clock=None, default=None):
    """A routed service (a.example → `up`; default → the upstream `default`, else none) on
    its own socket; `key_port`: the port its listener is known by (two services standing
    for two workers share one)."""
    pools = {'A': UpstreamPool(Upstream(name='A', servers=(Server(address=Address(*up.addr)),)))}
    routes = [('a.example', pools['A'])]
    if default is not None:
        routes.append(('default', UpstreamPool(Upstream(name='D', servers=(
            Server(address=Address(*default.addr)),)))))
    router = SniRouter(routes)
    lsock = env.udp(V4, ('127.0.0.1', 0))
    port = lsock.getsockname()[1]
    listener = Listener(name='quic', listen=Address('127.0.0.1', key_port or port), protocol='udp',
                        upstream='A', idle_timeout=5, udp=UdpOptions())
    svc = UdpService(env.loop, listener, lsock, pools['A'], env.log, router=router, peers=peers,
                     clock=clock)
    env.services.append(svc)
    svc.start()
    return svc, ('127.0.0.1', port)


def connect(env, svc, addr, up):
    """A client that sent its Initials and got the server's long-header answer: (client
    socket, the server's ID for it, the Initials it sent)."""
    c, initials = send_initials(env, addr, 'a.example')
    answer = env.recv(c)[0]
    return c, server_cid(answer, len(answer)), initials


def test_a_client_on_a_new_port_goes_on_through_its_session(env):
    up = QuicishUpstream(env)
    clock = Clock()
    svc, addr = routed(env, up, clock=clock)
    c, sid, _ = connect(env, svc, addr, up)
    source = up.got[-1][1]                          # the session's upstream socket
    sess = next(iter(svc._sessions.values()))
    assert sess.cids == [sid] and sess.learn
    c.sendto(short_header(sid, b'first 1-rtt'), addr)
    assert env.recv(c)[0] == short_header(sid, b'first 1-rtt')
    assert not sess.learn                           # the server's short header ended it
    moved = env.udp(V4, ('127.0.0.1', 0))           # the NAT rebinds: a new source port
    moved.sendto(short_header(sid, b'from the new port'), addr)
    assert env.recv(moved)[0] == short_header(sid, b'from the new port')
    assert up.got[-1] == (short_header(sid, b'from the new port'), source)
    c.sendto(short_header(sid, b'late, reordered'), addr)  # from the old port, just after:
    env.nothing(c, 0.1)                                     # a late packet, dropped
    assert up.got[-1][0] == short_header(sid, b'from the new port')
    clock.advance(moves.BACK_AFTER)
    c.sendto(short_header(sid, b'old port again'), addr)   # later: the NAT went back, followed
    assert env.recv(c)[0] == short_header(sid, b'old port again')
    st = svc.stats
    assert (st.sessions_created, st.quic_moved, st.quic_unrouted, st.sessions_active) == \
        (1, 2, 0, 1)
    assert {src for _, src in up.got} == {source}
    # a short header with an ID nobody has: no default route, dropped and counted
    stranger = env.udp(V4, ('127.0.0.1', 0))
    stranger.sendto(short_header(os.urandom(8)), addr)
    env.run_until(lambda: st.quic_unrouted == 1, what='unrouted')
    env.nothing(stranger, 0.05)
    svc.close()
    assert len(svc._cids) == 0                      # the IDs end with the session


def test_the_clients_own_first_id_moves_nothing_the_servers_does_in_any_header(env):
    up = QuicishUpstream(env)
    svc, addr = routed(env, up)
    c, sid, initials = connect(env, svc, addr, up)
    replay = env.udp(V4, ('127.0.0.1', 0))      # its first Initial again, from elsewhere:
    replay.sendto(initials[0], addr)            # a new flow, routed afresh (no move)
    env.run_until(lambda: svc.stats.sessions_created == 2, what='a second session')
    assert svc.stats.quic_moved == 0
    moved = env.udp(V4, ('127.0.0.1', 0))       # a long header (Handshake) to the server's ID
    moved.sendto(long_header(sid, b'', body=b'\x00' * 40), addr)
    env.recv(moved)
    assert (svc.stats.sessions_created, svc.stats.quic_moved) == (2, 1)


def test_ids_travel_with_a_session_handed_over(env):
    up = QuicishUpstream(env)
    old, addr = routed(env, up)
    c, sid, _ = connect(env, old, addr, up)
    out = old.export_sessions()
    assert len(old._cids) == 0 and out[0][0]['q'] == [sid.hex()]
    fds = [os.dup(sock.fileno()) for _, sock in out]
    for _, sock in out:
        sock.close()
    new, addr2 = routed(env, up)
    assert new.adopt_sessions([meta for meta, _ in out], fds) == 1
    moved = env.udp(V4, ('127.0.0.1', 0))
    moved.sendto(short_header(sid, b'after the reload'), addr2)
    assert env.recv(moved)[0] == short_header(sid, b'after the reload')
    assert (new.stats.quic_moved, new.stats.sessions_created, len(up.ids)) == (1, 0, 1)


def joined(env, make, n=2):
    """`n` services made by `make(peers, key_port)`, joined by the peers channel as the
    workers of a generation are; (each service, then their Peers). They stop at the end."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(n)]
    env.socks += [s for pair in pairs for s in pair]
    by_listener = [{} for _ in range(n)]
    peers = [Peers(env.loop, slot, pairs[slot][0], [tx for _, tx in pairs], by_listener[slot],
                   env.log) for slot in range(n)]
    made = [make(peers[slot], 1) for slot in range(n)]
    assert len({svc.key for svc, _ in made}) == 1
    for slot, (svc, _) in enumerate(made):
        by_listener[slot][svc.key] = svc
    for p in peers:
        p.start()
        env.readers.append(p._rx.fileno())
    return (*made, peers)


def test_a_moved_flow_steered_to_another_worker_is_handed_to_it(env):
    """Two services joined by the peers channel stand for two workers; the client's new
    flow reaches the second one (here: it sends to the second listener socket)."""
    up = QuicishUpstream(env)
    (first, addr1), (second, addr2), peers = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port))
    c, sid, _ = connect(env, first, addr1, up)
    source = up.got[-1][1]
    moved = env.udp(V4, ('127.0.0.1', 0))
    for i in range(3):                          # sent before the session arrives: held
        moved.sendto(short_header(sid, b'moved %d' % i), addr2)
    replies = sorted(env.recv(moved)[0] for _ in range(3))
    assert replies == [short_header(sid, b'moved %d' % i) for i in range(3)]
    assert [src for _, src in up.got[-3:]] == [source] * 3       # the same upstream socket
    assert (first.stats.sessions_active, first.stats.sessions_handed_out) == (0, 1)
    assert (second.stats.sessions_active, second.stats.sessions_adopted,
            second.stats.quic_moved, second.stats.quic_unrouted) == (1, 1, 1, 0)
    assert len(first._cids) == 0 and len(second._cids) == 1
    for p in peers:
        p.close()


# -- behind a proxy: proxy_protocol accept and send: v2 with sni_routes ----------------------

def proxied(env, up, peers=None, key_port=None, allow=()):
    """A routed service that reads v2 PROXY headers from 127.0.0.1 and sends its own (and
    lets only clients in `allow` in, if any)."""
    other = EchoUpstream(env, copies=0)          # the listener's own upstream: never reached
    pools = {name: UpstreamPool(Upstream(name=name, servers=(Server(address=Address(*u.addr)),)))
             for name, u in (('A', up), ('other', other))}
    lsock = env.udp(V4, ('127.0.0.1', 0))
    port = lsock.getsockname()[1]
    listener = Listener(name='quic', listen=Address('127.0.0.1', key_port or port),
                        protocol='udp', upstream='other', idle_timeout=5, udp=UdpOptions(),
                        proxy_protocol=ProxyProtocol(accept=True, trusted=('127.0.0.1/32',),
                                                     send='v2'), allow=tuple(allow))
    svc = UdpService(env.loop, listener, lsock, pools['other'], env.log,
                     router=SniRouter([('a.example', pools['A'])]), peers=peers)
    svc.other = other
    env.services.append(svc)
    svc.start()
    return svc, ('127.0.0.1', port)


def proxied_connect(env, addr):
    """A proxy in front (one socket) sends a client's Initials, each after a v2 header naming
    198.51.100.7:4433, and gets the server's answer: (its socket, the server's ID)."""
    lb = env.udp(V4, ('127.0.0.1', 0))
    head = proxy_header.v2(('198.51.100.7', 4433), ('203.0.113.1', 443), 'udp')
    for d in aioquic_initials('a.example', ['h3']):
        lb.sendto(head + d, addr)
    answer = env.recv(lb)[0]
    return lb, server_cid(answer, len(answer))


class ProxiedQuicUpstream(QuicishUpstream):
    """QuicishUpstream behind a proxy that sends v2 PROXY headers: each datagram's header is
    read off (recorded in `clients`) and the QUIC packet after it answered."""

    def __init__(self, env):
        self.clients = []
        super().__init__(env)

    def answer(self, data, src):
        state, header, used, _ = proxy_header.parse(data)
        assert state == proxy_header.DONE and header.version == 2, data[:20]
        self.clients.append(header.source)
        super().answer(data[used:], src)


def test_behind_a_proxy_the_payload_is_routed_and_the_client_followed(env):
    up = ProxiedQuicUpstream(env)
    svc, addr = proxied(env, up)
    lb, sid = proxied_connect(env, addr)                # the proxy in front, one socket
    assert sid is not None                              # routed by the name after the header
    assert set(up.clients) == {('198.51.100.7', 4433)}  # its own v2 header, on each
    moved = proxy_header.v2(('198.51.100.7', 5000), ('203.0.113.1', 443), 'udp')
    lb2 = env.udp(V4, ('127.0.0.1', 0))                  # the client rebound, the proxy's flow too
    lb2.sendto(moved + short_header(sid, b'after the move'), addr)
    assert env.recv(lb2)[0] == short_header(sid, b'after the move')
    assert up.clients[-1] == ('198.51.100.7', 5000)      # the header names the new client
    assert (svc.stats.sessions_created, svc.stats.quic_moved) == (1, 1)
    sess = next(iter(svc._sessions.values()))
    assert sess.client == ('198.51.100.7', 5000) and sess.addr == lb2.getsockname()
    lb2.sendto(moved + short_header(sid, b'again'), addr)    # the header's fast path (`pre`)
    assert env.recv(lb2)[0] == short_header(sid, b'again')
    assert svc.other.got == []


def test_behind_a_proxy_a_client_steered_to_another_worker_is_followed(env):
    up = ProxiedQuicUpstream(env)
    (first, addr1), (second, addr2), peers = joined(
        env, lambda peers, key_port: proxied(env, up, peers, key_port))
    lb, sid = proxied_connect(env, addr1)
    moved = proxy_header.v2(('198.51.100.7', 5000), ('203.0.113.1', 443), 'udp')
    lb2 = env.udp(V4, ('127.0.0.1', 0))
    lb2.sendto(moved + short_header(sid, b'on the other worker'), addr2)
    assert env.recv(lb2)[0] == short_header(sid, b'on the other worker')
    assert up.clients[-1] == ('198.51.100.7', 5000)      # the new header, made by the second
    assert (first.stats.sessions_handed_out, second.stats.quic_moved) == (1, 1)
    assert next(iter(second._sessions.values())).client == ('198.51.100.7', 5000)
    for p in peers:
        p.close()


def test_with_two_workers_text_to_default_goes_at_once_not_at_the_deadline(env):
    """A first datagram whose first byte has the top bit clear looks like a short header:
    the other worker is asked, answers "not here" at once, and the flow goes to default
    (the clock is frozen: the 1 s deadline never comes)."""
    up, fallback, clock = QuicishUpstream(env), EchoUpstream(env), Clock()
    (first, addr1), (second, _), _ = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port, clock, fallback))
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'hello, plain text', addr1)
    assert env.recv(c)[0] == b'hello, plain text'       # through default, answered
    assert [d for d, _ in fallback.got] == [b'hello, plain text']
    assert (first.stats.quic_unrouted, first.stats.sessions_created) == (1, 1)
    assert first._admission.pending == {} and first._admission._asked == {}


def test_past_the_ask_budget_a_short_header_is_dropped_and_asks_again_later(env, monkeypatch):
    monkeypatch.setattr(quicroute, 'SEEKS', 2)
    up, fallback, clock = QuicishUpstream(env), EchoUpstream(env), Clock()
    (first, addr1), (second, addr2), _ = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port, clock, fallback))
    c, sid, _ = connect(env, first, addr1, up)
    junk = [env.udp(V4, ('127.0.0.1', 0)) for _ in range(2)]
    for j in junk:                                      # spend the budget of the second
        j.sendto(short_header(os.urandom(8)), addr2)
    env.run_until(lambda: second.stats.quic_unrouted == 2, what='the junk answered')
    moved = env.udp(V4, ('127.0.0.1', 0))
    moved.sendto(short_header(sid, b'no budget left'), addr2)
    env.run_until(lambda: second.stats.quic_unrouted == 3, what='dropped past the budget')
    env.nothing(moved, 0.1)                             # dropped: no session to default
    assert second._sessions.keys() == {j.getsockname() for j in junk}   # (junk: to default)
    clock.advance(1.0)                                  # the budget refills: asked, followed
    moved.sendto(short_header(sid, b'asked now'), addr2)
    assert env.recv(moved)[0] == short_header(sid, b'asked now')
    assert (first.stats.sessions_handed_out, second.stats.quic_moved) == (1, 1)


def test_a_late_packet_from_the_address_left_does_not_pull_the_session_back(env):
    up, clock = QuicishUpstream(env), Clock()
    (first, addr1), (second, addr2), _ = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port, clock))
    c, sid, _ = connect(env, first, addr1, up)
    moved = env.udp(V4, ('127.0.0.1', 0))
    moved.sendto(short_header(sid, b'moved'), addr2)
    assert env.recv(moved)[0] == short_header(sid, b'moved')
    for i in range(moves.BACK_LATE):                    # reordered, from the old address:
        c.sendto(short_header(sid, b'late %d' % i), addr1)      # the answer is "kept"
        env.run_until(lambda: first.stats.quic_unrouted == i + 1, what='the answer "kept"')
        assert first._admission.pending == {}
    env.nothing(c, 0.05)
    assert (len(first._sessions), len(second._sessions), second.stats.sessions_handed_out) == \
        (0, 1, 0)
    moved.sendto(short_header(sid, b'still here'), addr2)
    assert env.recv(moved)[0] == short_header(sid, b'still here')
    c.sendto(short_header(sid, b'back for real'), addr1)    # it goes on from there: followed
    assert env.recv(c)[0] == short_header(sid, b'back for real')
    assert (len(first._sessions), second.stats.sessions_handed_out) == (1, 1)


def test_a_session_sent_to_default_learns_no_ids_after_a_hand_over(env):
    """Only QUIC sessions (routed by their ClientHello) read their replies for IDs, also
    once handed over: a default session's replies that look like long headers teach none."""
    up, fallback = QuicishUpstream(env), EchoUpstream(env)
    old, addr = routed(env, up, default=fallback)
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'plain request', addr)
    assert env.recv(c)[0] == b'plain request'
    out = old.export_sessions()
    assert 'L' not in out[0][0] and out[0][0]['p'] == 'D'
    fds = [os.dup(sock.fileno()) for _, sock in out]
    for _, sock in out:
        sock.close()
    new, addr2 = routed(env, up, default=fallback)
    assert new.adopt_sessions([meta for meta, _ in out], fds) == 1
    looks_long = long_header(b'', b'K' * 8)             # a reply that parses as a long header
    c.sendto(looks_long, addr2)
    assert env.recv(c)[0] == looks_long
    assert len(new._cids) == 0


def test_behind_a_proxy_allow_is_for_the_real_client_not_the_proxy(env):
    up = ProxiedQuicUpstream(env)
    svc, addr = proxied(env, up, allow=['198.51.100.0/24'])
    lb = env.udp(V4, ('127.0.0.1', 0))                  # the proxy, not in `allow`
    initials = aioquic_initials('a.example', ['h3'])
    for client in (('203.0.113.9', 1000), ('198.51.100.7', 4433)):
        head = proxy_header.v2(client, ('203.0.113.1', 443), 'udp')
        for d in initials:
            lb.sendto(head + d, addr)
    env.recv(lb)                                         # the allowed one's answer
    assert up.clients == [('198.51.100.7', 4433)] * len(initials)
    assert (svc.stats.denied, svc.stats.sessions_created) == (1, 1)


def test_a_new_client_in_the_same_senders_header_is_the_sessions_client_from_then_on(env):
    """The proxy in front followed its client to a new address (on the same flow to us):
    the session takes the client its header names now, for its own v2 header too."""
    up = ProxiedQuicUpstream(env)
    svc, addr = proxied(env, up)
    lb, sid = proxied_connect(env, addr)
    moved = proxy_header.v2(('198.51.100.7', 5000), ('203.0.113.1', 443), 'udp')
    lb.sendto(moved + short_header(sid, b'same sender, new client'), addr)
    assert env.recv(lb)[0] == short_header(sid, b'same sender, new client')
    assert up.clients[-1] == ('198.51.100.7', 5000)
    sess = next(iter(svc._sessions.values()))
    assert sess.client == ('198.51.100.7', 5000) and svc.stats.sessions_created == 1


def test_a_silent_worker_is_asked_until_it_has_been_silent_a_while_then_not_waited_for(
        env, monkeypatch):
    """Three workers; the third reads nothing (dead, in its respawn back-off). A question it
    leaves unanswered holds the flow until the deadline (dropped then: the session may be
    its); once it has been silent for SILENT it is not asked, and text to default goes at
    once while the second still answers."""
    monkeypatch.setattr(peers_module, 'SILENT', 0.2)
    up, fallback, clock = QuicishUpstream(env), EchoUpstream(env), Clock()
    (first, addr1), _, third, peers = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port, clock, fallback), n=3)
    peers[2].close()                                    # asked, never answers
    c = env.udp(V4, ('127.0.0.1', 0))
    c.sendto(b'hello, plain text', addr1)
    env.run_until(lambda: len(first._admission.pending) == 1, what='held, asked')
    env.nothing(c, 0.1)
    clock.advance(quicroute.HOLD)                       # the deadline: dropped, no session
    env.run_until(lambda: not first._admission.pending, what='the deadline')
    assert (first.stats.sessions_created, first.stats.quic_unrouted) == (0, 1)
    env.run_for(0.25)                                   # silent for SILENT now
    c2 = env.udp(V4, ('127.0.0.1', 0))
    c2.sendto(b'hello again', addr1)
    assert env.recv(c2)[0] == b'hello again'            # the second said "not here": default
    assert first._admission._asked == {}


def test_a_worker_whose_inbox_is_full_is_asked_again_with_the_next_packet(env):
    up, fallback, clock = QuicishUpstream(env), EchoUpstream(env), Clock()
    (first, addr1), (second, addr2), peers = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port, clock, fallback))
    c, sid, _ = connect(env, first, addr1, up)
    peers[0].close()                                    # busy: fill its inbox
    with pytest.raises(BlockingIOError):
        for _ in range(100000):
            peers[1]._txs[0].send(b'{"padding": 1}' + bytes(1000))
    moved = env.udp(V4, ('127.0.0.1', 0))
    moved.sendto(short_header(sid, b'not asked'), addr2)
    env.run_until(lambda: second.stats.quic_unrouted == 1, what='not asked: dropped')
    assert not second._sessions and not second._admission.pending    # not sent to default
    while True:                                          # it reads again (its backlog too)
        try:
            data, fds, _, _ = socket.recv_fds(peers[0]._rx, 70000, 1)
        except BlockingIOError:
            break
    peers[0].start()
    moved.sendto(short_header(sid, b'asked now'), addr2)
    assert env.recv(moved)[0] == short_header(sid, b'asked now')
    assert (first.stats.sessions_handed_out, second.stats.quic_moved) == (1, 1)


def test_a_session_given_after_the_asker_handed_its_sessions_on_is_ended_with_its_line(env):
    up = QuicishUpstream(env)
    (first, addr1), (second, addr2), peers = joined(
        env, lambda peers, key_port: routed(env, up, peers, key_port))
    c, sid, _ = connect(env, first, addr1, up)
    peers[0].close()                                    # the question waits in its inbox
    moved = env.udp(V4, ('127.0.0.1', 0))
    moved.sendto(short_header(sid, b'moved'), addr2)
    env.run_until(lambda: len(second._admission.pending) == 1, what='asked')
    assert second.export_sessions() == []               # a reload: it hands on what it has
    peers[0].start()                                    # the answer comes after that
    env.run_until(lambda: first.stats.sessions_handed_out == 1, what='given')
    env.run_until(lambda: second.stats.sessions_closed == 1, what='taken, then ended')
    assert not second._sessions and second.stats.sessions_active == 0


def test_a_re_headed_client_is_checked_as_a_moved_one(env):
    """On the same sender's flow, a header naming another client: allow/deny apply to it
    (denied: dropped, the session keeps its client), and a late header naming the client
    just left is not followed back."""
    up = ProxiedQuicUpstream(env)
    svc, addr = proxied(env, up, allow=['198.51.100.0/24'])
    lb, sid = proxied_connect(env, addr)
    sess = next(iter(svc._sessions.values()))
    outsider = proxy_header.v2(('203.0.113.9', 1000), ('203.0.113.1', 443), 'udp')
    lb.sendto(outsider + short_header(sid, b'denied'), addr)
    env.run_until(lambda: svc.stats.denied == 1, what='denied')
    env.nothing(lb, 0.05)
    assert sess.client == ('198.51.100.7', 4433)
    moved = proxy_header.v2(('198.51.100.7', 5000), ('203.0.113.1', 443), 'udp')
    lb.sendto(moved + short_header(sid, b'moved'), addr)
    assert env.recv(lb)[0] == short_header(sid, b'moved')
    before = proxy_header.v2(('198.51.100.7', 4433), ('203.0.113.1', 443), 'udp')
    lb.sendto(before + short_header(sid, b'late'), addr)     # reordered at the front
    env.nothing(lb, 0.05)
    assert sess.client == ('198.51.100.7', 5000) and svc.stats.quic_moved == 1
