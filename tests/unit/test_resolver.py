"""The DNS client (messages, transport) and DNS-driven pool updates."""

import asyncio
import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from mpproxy.config.schema import Address, Server, Upstream
from mpproxy.errors import WorkerBootError
from mpproxy.upstream import discovery
from mpproxy.upstream.pool import UpstreamPool
from mpproxy.upstream.resolver import (TYPE_A, TYPE_AAAA, TYPE_CNAME, ResolveError, Resolver,
                                       build_query, encode_name, parse_response)


def response(qid, name, qtype, answers, rcode=0, flags=0x8180, compress=True):
    """A response to `name`; answers: (owner or None for the question name, type, rdata)."""
    question = encode_name(name) + struct.pack('!HH', qtype, 1)
    out = struct.pack('!HHHHHH', qid, flags | rcode, 1, len(answers), 0, 0) + question
    for owner, rtype, rdata in answers:
        out += (b'\xc0\x0c' if owner is None and compress else encode_name(owner or name))
        out += struct.pack('!HHIH', rtype, 1, 300, len(rdata)) + rdata
    return out


def test_query_layout():
    q = build_query('backend.test.', TYPE_AAAA, 0x1234)
    assert q[:12] == struct.pack('!HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
    assert q[12:] == b'\x07backend\x04test\x00' + struct.pack('!HH', 28, 1)


@pytest.mark.parametrize('name', ['a..b', 'x' * 64 + '.test', ('a' * 60 + '.') * 5])
def test_bad_names_are_resolve_errors(name):
    with pytest.raises(ResolveError):
        build_query(name, TYPE_A, 1)


def test_parse_a_records_with_compression():
    data = response(7, 'web.test', TYPE_A, [(None, TYPE_A, bytes([10, 0, 0, 1])),
                                           (None, TYPE_A, bytes([10, 0, 0, 2]))])
    assert parse_response(data, 7, 'web.test.', TYPE_A) == ['10.0.0.1', '10.0.0.2']


def test_parse_aaaa_and_cname_chain():
    # web.test -> alias1.test -> alias2.test (pointer into the first CNAME's rdata) -> ::1
    header_q = encode_name('web.test')
    start = 12 + len(header_q) + 4
    cname1 = encode_name('alias1.test')
    rec1 = b'\xc0\x0c' + struct.pack('!HHIH', TYPE_CNAME, 1, 1, len(cname1)) + cname1
    alias1_at = start + 12
    cname2 = b'\x06alias2' + bytes([0xC0 | (alias1_at + 7) >> 8, (alias1_at + 7) & 0xFF])
    rec2 = bytes([0xC0, alias1_at]) + struct.pack('!HHIH', TYPE_CNAME, 1, 1, len(cname2)) + cname2
    alias2_at = start + len(rec1) + 12
    addr = socket.inet_pton(socket.AF_INET6, '::1')
    rec3 = bytes([0xC0, alias2_at]) + struct.pack('!HHIH', TYPE_AAAA, 1, 1, 16) + addr
    stray = encode_name('other.test') + struct.pack('!HHIH', TYPE_AAAA, 1, 1, 16) + addr
    data = struct.pack('!HHHHHH', 9, 0x8180, 1, 4, 0, 0) + header_q + struct.pack('!HH', 28, 1) \
        + rec1 + rec2 + rec3 + stray
    assert parse_response(data, 9, 'WEB.test', TYPE_AAAA) == ['::1']


def test_nodata_is_empty_and_errors_are_named():
    assert parse_response(response(1, 'a.test', TYPE_A, []), 1, 'a.test', TYPE_A) == []
    with pytest.raises(ResolveError, match='NXDOMAIN'):
        parse_response(response(1, 'a.test', TYPE_A, [], rcode=3), 1, 'a.test', TYPE_A)
    with pytest.raises(ResolveError, match='wrong id'):
        parse_response(response(1, 'a.test', TYPE_A, []), 2, 'a.test', TYPE_A)


@pytest.mark.parametrize('data', [
    b'', b'\x00' * 11,
    struct.pack('!HHHHHH', 1, 0x8180, 1, 0, 0, 0) + b'\x05ab',                    # name cut
    struct.pack('!HHHHHH', 1, 0x8180, 1, 0, 0, 0) + b'\xc0\x0c',                  # pointer loop
    struct.pack('!HHHHHH', 1, 0x8180, 0, 1, 0, 0) + b'\x00' + b'\x00\x01\x00\x01\x00',
    struct.pack('!HHHHHH', 1, 0x8180, 0, 1, 0, 0) + b'\x00' + struct.pack('!HHIH', 1, 1, 1, 3)
    + b'\x01\x02\x03',                                                           # A of 3 bytes
    struct.pack('!HHHHHH', 1, 0x8180, 0, 1, 0, 0) + b'\x00' + struct.pack('!HHIH', 1, 1, 1, 9),
    struct.pack('!HHHHHH', 1, 0x8180, 1, 0, 0, 0) + b'\x80abc',                   # label type
])
def test_malformed_answers_are_resolve_errors(data):
    with pytest.raises(ResolveError):
        parse_response(data, 1, 'a.test', TYPE_A)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 40))
def test_random_bytes_never_raise_anything_else(tail, cut):
    base = response(1, 'a.test', TYPE_A, [(None, TYPE_A, b'\x01\x02\x03\x04'),
                                         ('b.test', TYPE_CNAME, encode_name('a.test'))])
    for data in (base[:12] + tail, base[:len(base) - cut] + tail, tail):
        try:
            parse_response(data, 1, 'a.test', TYPE_A)
        except ResolveError:
            pass


# -- the transport, against a responder on loopback --------------------------------------------

class Responder(asyncio.DatagramProtocol):
    def __init__(self, records, silent=False):
        self.records, self.silent, self.seen = records, silent, 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.seen += 1
        if self.silent:
            return
        qid, = struct.unpack_from('!H', data)
        qtype, = struct.unpack_from('!H', data, len(data) - 4)
        answers = [(None, t, socket.inet_pton(socket.AF_INET if t == TYPE_A else socket.AF_INET6,
                                              ip)) for t, ip in self.records if t == qtype]
        # the question section is echoed as asked
        body = data[12:]
        out = struct.pack('!HHHHHH', qid, 0x8180, 1, len(answers), 0, 0) + body
        for _, rtype, rdata in answers:
            out += b'\xc0\x0c' + struct.pack('!HHIH', rtype, 1, 5, len(rdata)) + rdata
        self.transport.sendto(out, addr)


async def serve(records, silent=False):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Responder(records, silent), local_addr=('127.0.0.1', 0))
    return transport, proto, Address('127.0.0.1', transport.get_extra_info('sockname')[1])


def test_resolver_asks_a_and_aaaa_and_skips_a_dead_server():
    async def main():
        dead_t, dead, dead_addr = await serve([], silent=True)
        live_t, live, live_addr = await serve([(TYPE_A, '10.0.0.1'), (TYPE_AAAA, '::2')])
        try:
            r = Resolver([dead_addr, live_addr], timeout=0.2, tries=1)
            got = await r.resolve('backend.test', 80)
            assert sorted(got) == [(socket.AF_INET, ('10.0.0.1', 80)),
                                   (socket.AF_INET6, ('::2', 80, 0, 0))]
            assert dead.seen == 2
            assert await r.resolve('10.9.9.9', 5) == [(socket.AF_INET, ('10.9.9.9', 5))]
        finally:
            dead_t.close()
            live_t.close()
    asyncio.run(main())


def test_resolver_times_out_with_a_resolve_error():
    async def main():
        t, proto, addr = await serve([], silent=True)
        try:
            r = Resolver([addr], timeout=0.1, tries=2)
            with pytest.raises(ResolveError, match='no answer'):
                await r.resolve('backend.test', 80)
            assert proto.seen == 4        # A and AAAA, two tries each
        finally:
            t.close()
    asyncio.run(main())


def test_system_resolver_and_its_errors():
    async def main():
        r = Resolver()
        assert (socket.AF_INET, ('127.0.0.1', 9)) in await r.resolve('localhost', 9)
        with pytest.raises(ResolveError):
            await r.resolve('no-such-host.invalid', 9)
    asyncio.run(main())


# -- pools following DNS ---------------------------------------------------------------------

def v4(*ips, port=80):
    return [(socket.AF_INET, (ip, port)) for ip in ips]


def test_replace_targets_keeps_state_of_addresses_that_stay():
    up = Upstream('web', (Server(Address('backend.test', 80), weight=2, max_fails=1),),
                  balance='least_conn')
    p = UpstreamPool(up, resolved=[v4('10.0.0.1', '10.0.0.2')])
    a = next(p.candidates(None, 1))
    b = next(p.candidates(None, 1))
    assert {a.sockaddr[0], b.sockaddr[0]} == {'10.0.0.1', '10.0.0.2'}
    p.failed(b)
    assert p.replace_targets([v4('10.0.0.1', '10.0.0.2')]) is False
    assert p.replace_targets([v4(a.sockaddr[0], '10.0.0.3')]) is True
    kept = p.targets[p.by_key[(a.family, a.sockaddr, a.label)]]
    assert kept is not a and p.active[kept.index] == 1
    assert p.balancer.conns[kept.index] == 1
    p.release(a)                  # the old Target still uncounts its address
    assert p.active[kept.index] == 0 and p.balancer.conns[kept.index] == 0
    p.release(b)                  # removed address: harmless
    p.failed(b)
    assert sorted(t.sockaddr[0] for t in p.targets) == sorted([a.sockaddr[0], '10.0.0.3'])
    picks = {next(p.candidates(None, 1)).sockaddr[0] for _ in range(4)}
    assert b.sockaddr[0] not in picks


def test_readded_address_does_not_take_old_releases():
    p = UpstreamPool(Upstream('web', (Server(Address('n.test', 80)),)), resolved=[v4('10.0.0.1')])
    old = next(p.candidates(None, 1))
    p.replace_targets([v4('10.0.0.2')])
    p.replace_targets([v4('10.0.0.1', '10.0.0.2')])
    fresh = next(t for t in p.candidates(None, 2) if t.sockaddr[0] == '10.0.0.1')
    p.release(old)
    assert p.active[fresh.index] == 1


def test_candidates_survive_a_swap_between_picks():
    p = UpstreamPool(Upstream('web', (Server(Address('n.test', 80)),)),
                     resolved=[v4('10.0.0.1', '10.0.0.2')])
    it = p.candidates(None, 3)
    first = next(it)
    p.replace_targets([v4('10.0.0.1', '10.0.0.2', '10.0.0.3')])
    rest = list(it)
    assert len(rest) == 2 and first.sockaddr not in [t.sockaddr for t in rest]
    p.replace_targets([[]])
    assert p.targets == () and list(p.candidates(None, 3)) == []


class FakeResolver:
    def __init__(self, answers):
        self.answers = answers    # host -> list or an exception

    async def resolve(self, host, port):
        answer = self.answers.get(host, [host])
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET, (ip, port)) for ip in answer]


class Log:
    def __init__(self):
        self.lines = []

    def _add(self, level, msg, *args):
        self.lines.append((level, msg % args))

    def info(self, msg, *args):
        self._add('info', msg, *args)

    def warning(self, msg, *args):
        self._add('warning', msg, *args)

    def exception(self, msg, *args):
        self._add('error', msg, *args)


def test_open_pool_without_resolve_fails_on_an_unresolvable_name():
    up = Upstream('web', (Server(Address('gone.test', 80)),))
    fake = FakeResolver({'gone.test': ResolveError('DNS error NXDOMAIN')})
    with pytest.raises(WorkerBootError, match='upstream web: cannot resolve gone.test'):
        asyncio.run(discovery.open_pool(up, resolver=fake))


def test_refresh_follows_changes_and_keeps_the_last_good_set():
    async def main():
        up = Upstream('web', (Server(Address('n.test', 80)), Server(Address('10.9.9.9', 80))),
                      resolve=0.01)
        fake = FakeResolver({'n.test': ResolveError('timeout')})
        log = Log()
        started = await discovery.open_pool(up, resolver=fake, log=log)   # no crash, no server
        assert [t.sockaddr[0] for t in started.targets] == ['10.9.9.9']
        assert log.lines[0][0] == 'warning' and 'cannot resolve n.test' in log.lines[0][1]
        assert len(discovery._refreshers) == 1
        for task in list(discovery._refreshers):
            task.cancel()
        resolved, failing = [[], v4('10.9.9.9')], [True, False]
        pool = UpstreamPool(up, resolved=[list(r) for r in resolved])
        fake.answers['n.test'] = ['10.0.0.2', '10.0.0.1']
        assert await discovery.refresh_once(pool, fake, resolved, failing, log)
        assert ('info', 'upstream web: servers now 10.0.0.1:80, 10.0.0.2:80, 10.9.9.9:80') \
            in log.lines
        fake.answers['n.test'] = ['10.0.0.1', '10.0.0.2']      # rotated: no change
        assert not await discovery.refresh_once(pool, fake, resolved, failing, log)
        fake.answers['n.test'] = ResolveError('no answer')
        assert not await discovery.refresh_once(pool, fake, resolved, failing, log)
        assert len(pool.targets) == 3
        fake.answers['n.test'] = ['10.0.0.3']
        await discovery.refresh(pool, fake, resolved, failing, log, rounds=1)
        assert [t.sockaddr[0] for t in pool.targets] == ['10.0.0.3', '10.9.9.9']
    asyncio.run(main())
