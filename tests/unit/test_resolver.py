"""The resolver (dnspython against the test's own DNS server on loopback: UDP, TCP on TC,
the system's resolv.conf and hosts file) and DNS-driven pool updates."""

import asyncio
import socket

import pytest
import uvloop

from helpers.backends import DnsServer
from mpproxy.config.schema import Address, Resolve, Server, Upstream
from mpproxy.errors import WorkerBootError
from mpproxy.upstream import discovery, hosts
from mpproxy.upstream.pool import UpstreamPool
from mpproxy.upstream.resolver import Answer, ResolveError, Resolver, lifetime

PODS = [f'127.0.0.{i}' for i in range(1, 61)]


def run(coro):
    """`coro` on a uvloop loop, the loop the workers run."""
    return uvloop.run(coro)


@pytest.fixture
def dns():
    servers = []

    def make(records=None, **keys):
        server = DnsServer(records if records is not None else {}, **keys)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def at(server: DnsServer) -> Address:
    return Address(server.host, server.port)


# -- with `resolver:` servers --------------------------------------------------------------

def test_a_and_aaaa_are_both_asked_and_the_shortest_ttl_is_the_answers(dns):
    server = dns({'backend.test': ['10.0.0.1', '::2']}, ttl=30)
    server.ttls['alias.test'] = 5
    answer = run(Resolver([at(server)]).resolve('backend.test', 80))
    assert sorted(answer.addresses) == [(socket.AF_INET, ('10.0.0.1', 80)),
                                        (socket.AF_INET6, ('::2', 80, 0, 0))]
    assert answer.ttl == 30
    server.records['v4only.test'] = ['10.0.0.3']
    server.ttls['v4only.test'] = 7
    assert run(Resolver([at(server)]).resolve('v4only.test', 81)) == \
        Answer([(socket.AF_INET, ('10.0.0.3', 81))], 7)
    assert sorted(server.names_asked('AAAA')) == ['backend.test', 'v4only.test']


def test_a_truncated_udp_answer_is_asked_again_over_tcp_and_all_60_addresses_come(dns):
    server = dns({'pods.test': PODS})
    answer = run(Resolver([at(server)]).resolve('pods.test', 8443))
    assert sorted(a[1][0] for a in answer.addresses) == sorted(PODS)
    assert server.names_asked('A', 'udp') == ['pods.test']      # truncated: TC set
    assert server.names_asked('A', 'tcp') == ['pods.test']      # then whole over TCP


def test_a_silent_server_is_skipped_for_the_next_one(dns):
    dead, live = dns(), dns({'backend.test': ['10.0.0.1']})
    dead.silent = True
    answer = run(Resolver([at(dead), at(live)], timeout=0.2, tries=1).resolve('backend.test', 80))
    assert answer.addresses == [(socket.AF_INET, ('10.0.0.1', 80))]
    assert sorted(dead.names_asked('A') + dead.names_asked('AAAA')) == ['backend.test'] * 2
    assert run(Resolver([at(dead)]).resolve('10.9.9.9', 5)) == \
        Answer([(socket.AF_INET, ('10.9.9.9', 5))], None)


def test_a_failing_server_is_skipped_for_the_next_one(dns):
    failing, live = dns({'a.test': ['10.0.0.1']}), dns({'a.test': ['10.0.0.2']})
    failing.rcodes['a.test'] = 2                          # SERVFAIL
    answer = run(Resolver([at(failing), at(live)]).resolve('a.test', 80))
    assert answer.addresses == [(socket.AF_INET, ('10.0.0.2', 80))]
    with pytest.raises(ResolveError, match=f'^DNS error SERVFAIL from 127.0.0.1:{failing.port}$'):
        run(Resolver([at(failing)]).resolve('a.test', 80))


def test_no_answer_is_a_resolve_error_after_every_try(dns):
    server = dns()
    server.silent = True
    resolver = Resolver([at(server)], timeout=0.1, tries=2)
    with pytest.raises(ResolveError, match=r'no answer within 0\.35s'):
        run(resolver.resolve('backend.test', 80))
    assert len(server.names_asked('A')) == 2 and len(server.names_asked('AAAA')) == 2


def test_lifetime_gives_every_server_every_try():
    assert lifetime(2.0, 2, 1) == 4.15         # 2 tries of 2 s, 0.1 s back-off, slack
    assert lifetime(2.0, 2, 3) == 12.15
    assert lifetime(1.0, 3, 1) == 3.35         # back-offs 0.1 + 0.2


def test_errors_say_why(dns):
    server = dns({'a.test': ['10.0.0.1']})
    with pytest.raises(ResolveError, match='^DNS error NXDOMAIN$'):
        run(Resolver([at(server)]).resolve('missing.test', 80))
    server.records['empty.test'] = []
    with pytest.raises(ResolveError, match='^no A or AAAA record$'):
        run(Resolver([at(server)]).resolve('empty.test', 80))
    closed = at(server)
    server.close()                  # dnspython's UDP socket is not connected: no ECONNREFUSED
    with pytest.raises(ResolveError, match='^no answer within 0.25s$'):
        run(Resolver([closed], timeout=0.2, tries=1).resolve('a.test', 80))


# -- the system's configuration: resolv.conf (search, ndots) and the hosts file ----------------

def resolv_conf(tmp_path, server: DnsServer, *lines: str) -> str:
    path = tmp_path / 'resolv.conf'
    path.write_text(f'# written by the test\nnameserver [127.0.0.1]:{server.port}\n'
                    + ''.join(line + '\n' for line in lines))
    return str(path)


def test_the_search_list_comes_first_for_a_name_with_fewer_dots_than_ndots(tmp_path, dns):
    server = dns({'web.svc.test': ['10.0.0.1'], 'api.prod.cluster.test': ['10.0.0.2'],
                  'api.prod': ['10.0.0.3'], 'db.prod.internal': ['10.0.0.4']})
    conf = resolv_conf(tmp_path, server, 'search svc.test cluster.test', 'options ndots:2')
    resolver = Resolver(resolv_conf=conf, hosts_file=str(tmp_path / 'no-hosts'))

    def first(name):
        return run(resolver.resolve(name, 80)).addresses[0][1][0]

    assert first('web') == '10.0.0.1'                   # 0 dots: web.svc.test
    assert first('api.prod') == '10.0.0.2'              # 1 dot < ndots: the search list wins
    assert first('db.prod.internal') == '10.0.0.4'      # 2 dots: as written, first
    assert server.names_asked('A') == ['web.svc.test', 'api.prod.svc.test',
                                       'api.prod.cluster.test', 'db.prod.internal']
    with pytest.raises(ResolveError, match='NXDOMAIN .asked gone.svc.test., gone.cluster.test., '
                                           'gone.'):
        run(resolver.resolve('gone', 80))
    resolver = Resolver(resolv_conf=resolv_conf(tmp_path, server, 'search svc.test cluster.test',
                                                'options ndots:1'),
                        hosts_file=str(tmp_path / 'no-hosts'))
    assert first('api.prod') == '10.0.0.3'              # 1 dot >= ndots: as written, first
    assert first('web.svc.test.') == '10.0.0.1'         # absolute: never searched
    assert server.names_asked('A')[-2:] == ['api.prod', 'web.svc.test']


def test_without_a_nameserver_line_or_file_the_stub_asks_127_0_0_1(tmp_path):
    stub = Resolver(resolv_conf=str(tmp_path / 'missing.conf')).stub()
    assert [(n.address, n.port) for n in stub.nameservers] == [('127.0.0.1', 53)]
    conf = tmp_path / 'odd.conf'
    conf.write_text('nameserver not-an-ip\nnameserver [::1]:5353\nnameserver 10.0.0.53\n'
                    'search a.test\noptions ndots:3 timeout:1\n')
    stub = Resolver(resolv_conf=str(conf)).stub()
    assert [(n.address, n.port) for n in stub.nameservers] == [('::1', 5353), ('10.0.0.53', 53)]
    assert (stub.ndots, stub.timeout, [str(s) for s in stub.search]) == (3, 1, ['a.test.'])
    assert stub.payload == 1232                         # EDNS0 on


def test_the_env_names_the_resolv_conf(tmp_path, monkeypatch):
    monkeypatch.setenv('MPPROXY_RESOLV_CONF', str(tmp_path / 'x.conf'))
    assert Resolver().resolv_conf == str(tmp_path / 'x.conf')
    monkeypatch.delenv('MPPROXY_RESOLV_CONF')
    assert Resolver().resolv_conf == '/etc/resolv.conf'


def test_the_hosts_file_comes_before_dns_without_resolver_servers(tmp_path, dns):
    server = dns({'pinned.test': ['10.0.0.9'], 'other.test': ['10.0.0.8']})
    hosts_file = tmp_path / 'hosts'
    hosts_file.write_text('# comment\n127.0.0.1 localhost\n::1 localhost ip6-localhost\n'
                          '10.1.1.1  Pinned.TEST alias  # trailing comment\nbad-ip pinned.test\n')
    resolver = Resolver(resolv_conf=resolv_conf(tmp_path, server), hosts_file=str(hosts_file))
    assert run(resolver.resolve('pinned.test.', 80)) == \
        Answer([(socket.AF_INET, ('10.1.1.1', 80))], None)
    assert run(resolver.resolve('localhost', 9)).addresses == [
        (socket.AF_INET, ('127.0.0.1', 9)), (socket.AF_INET6, ('::1', 9, 0, 0))]
    assert run(resolver.resolve('other.test', 80)).addresses == [(socket.AF_INET, ('10.0.0.8', 80))]
    assert server.names_asked('A') == ['other.test']
    with_servers = Resolver([at(server)], hosts_file=str(hosts_file))   # servers: no hosts file
    assert run(with_servers.resolve('pinned.test', 80)).addresses == \
        [(socket.AF_INET, ('10.0.0.9', 80))]


def test_hosts_lookup(tmp_path):
    path = tmp_path / 'hosts'
    path.write_text('10.0.0.1 a.test b.test\n10.0.0.2 A.test\n10.0.0.1 a.test\n#10.0.0.3 a.test\n'
                    'fe80::1%eth0 link.test\n')
    assert hosts.lookup('a.test', str(path)) == ['10.0.0.1', '10.0.0.2']
    assert hosts.lookup('b.test.', str(path)) == ['10.0.0.1']
    assert hosts.lookup('c.test', str(path)) == []
    assert hosts.lookup('link.test', str(path)) == ['fe80::1%eth0']
    assert hosts.lookup('a.test', str(tmp_path / 'none')) == []


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
    def __init__(self, answers, ttl=60):
        self.answers = answers    # host -> list or an exception
        self.ttl = ttl            # the TTL of every answer (None: none)

    async def resolve(self, host, port):
        answer = self.answers.get(host, [host])
        if isinstance(answer, Exception):
            raise answer
        return Answer([(socket.AF_INET, (ip, port)) for ip in answer], self.ttl)


class Log:
    def __init__(self):
        self.lines = []

    def _add(self, level, msg, *args):
        self.lines.append((level, msg % args))

    def debug(self, msg, *args):
        self._add('debug', msg, *args)

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


def follower(up, fake, resolved, failing, ttls, log=None):
    pool = UpstreamPool(up, resolved=[list(r) for r in resolved])
    return pool, discovery.Follower(pool, fake, resolved, failing, ttls, log)


def test_refresh_follows_changes_and_keeps_the_last_good_set():
    async def main():
        up = Upstream('web', (Server(Address('n.test', 80)), Server(Address('10.9.9.9', 80))),
                      resolve=Resolve(0.01, 0.01))
        fake = FakeResolver({'n.test': ResolveError('timeout')})
        log = Log()
        started = await discovery.open_pool(up, resolver=fake, log=log)   # no crash, no server
        assert [t.sockaddr[0] for t in started.targets] == ['10.9.9.9']
        assert log.lines[0][0] == 'warning' and 'cannot resolve n.test' in log.lines[0][1]
        assert len(discovery._refreshers) == 1
        for task in list(discovery._refreshers):
            task.cancel()
        pool, f = follower(up, fake, [[], v4('10.9.9.9')], [True, False], [0.0, None], log)
        fake.answers['n.test'] = ['10.0.0.2', '10.0.0.1']
        assert await f.refresh_once()
        assert ('info', 'upstream web: servers now 10.0.0.1:80, 10.0.0.2:80, 10.9.9.9:80') \
            in log.lines
        fake.answers['n.test'] = ['10.0.0.1', '10.0.0.2']      # rotated: no change
        assert not await f.refresh_once()
        fake.answers['n.test'] = ResolveError('no answer')
        assert not await f.refresh_once()
        assert len(pool.targets) == 3
        fake.answers['n.test'] = ['10.0.0.3']
        await f.run(rounds=1)
        assert [t.sockaddr[0] for t in pool.targets] == ['10.0.0.3', '10.9.9.9']
    asyncio.run(main())


# -- when names are looked up again: the TTL, within `resolve`'s [min, max] -------------------

def test_next_delay_is_the_shortest_ttl_within_min_and_max():
    bounds = Resolve(5.0, 300.0)
    assert discovery.next_delay(bounds, [30]) == 30
    assert discovery.next_delay(bounds, [1]) == 5              # at least min
    assert discovery.next_delay(bounds, [86400]) == 300        # at most max
    assert discovery.next_delay(bounds, [60, 10]) == 10        # the shortest of the names
    assert discovery.next_delay(bounds, [60, 0.0]) == 5        # a failed lookup: again at min
    assert discovery.next_delay(bounds, [None]) == 300         # no TTL (hosts file): max
    assert discovery.next_delay(Resolve(30, 30), [1, None, 0.0]) == 30   # `resolve: 30s`


def test_the_follower_sleeps_what_each_answer_allows():
    """The clock is the test's: `sleep` records each delay and changes what DNS answers."""
    async def main():
        up = Upstream('web', (Server(Address('n.test', 80)), Server(Address('10.9.9.9', 80))),
                      resolve=Resolve(5.0, 300.0))
        fake = FakeResolver({'n.test': ['10.0.0.1']}, ttl=60)
        pool, f = follower(up, fake, [v4('10.0.0.1'), v4('10.9.9.9')], [False, False],
                           [60.0, None], Log())
        steps = [(['10.0.0.2'], 1),                      # after 60 s: TTL 1 -> min 5 s
                 (ResolveError('no answer'), 1),         # after 5 s: failure -> min 5 s
                 (['10.0.0.3'], 86400),                  # after 5 s: TTL 1 day -> max 300 s
                 (['10.0.0.3'], 120)]                    # after 300 s: 120 s
        delays, servers = [], []

        async def sleep(seconds):
            delays.append(seconds)
            servers.append(pool.targets[0].sockaddr[0])
            fake.answers['n.test'], fake.ttl = steps[len(delays) - 1]

        await f.run(rounds=4, sleep=sleep)
        assert delays == [60, 5, 5, 300]
        assert servers == ['10.0.0.1', '10.0.0.2', '10.0.0.2', '10.0.0.3']   # kept on failure
        assert f.delay() == 120
        assert [t.sockaddr[0] for t in pool.targets] == ['10.0.0.3', '10.9.9.9']
        assert f.failing == [False, False]
    asyncio.run(main())
