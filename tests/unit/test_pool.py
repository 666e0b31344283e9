"""UpstreamPool: resolving server addresses and the round-robin order."""

import socket

from mpproxy.config.schema import Address, Server, Upstream
from mpproxy.upstream.pool import UpstreamPool


def pool(*addrs):
    return UpstreamPool(Upstream('u', tuple(Server(Address(h, p)) for h, p in addrs)))


def test_round_robin_rotates_start_and_bounds_tries():
    p = pool(('127.0.0.1', 1), ('127.0.0.2', 2), ('127.0.0.3', 3))
    firsts = [next(p.candidates(None, 3)).sockaddr[0] for _ in range(6)]   # lazily: one pick each
    assert firsts == ['127.0.0.1', '127.0.0.2', '127.0.0.3'] * 2
    tries = list(p.candidates(None, 2))
    assert len(tries) == 2 and tries[0] != tries[1]
    assert len(list(p.candidates(None, 10))) == 3


def test_ipv6_literal_and_name_resolve():
    p = pool(('::1', 80), ('localhost', 81))
    families = {t.family for t in p.targets}
    assert socket.AF_INET6 in families
    assert any(t.label == 'localhost:81' for t in p.targets)
    assert p.targets[0].sockaddr[:2] == ('::1', 80)


def test_unresolvable_name_gives_no_target():
    p = pool(('no-such-host.invalid', 80))
    assert p.targets == () and list(p.candidates(None, 3)) == []


def test_weights_and_least_conn_release_through_the_pool():
    up = Upstream('u', (Server(Address('127.0.0.1', 1), weight=3), Server(Address('127.0.0.2', 2))),
                  balance='least_conn')
    p = UpstreamPool(up)
    held = [next(p.candidates(None, 1)) for _ in range(8)]
    assert sum(t.sockaddr[0] == '127.0.0.1' for t in held) == 6
    for t in held:
        p.release(t)
    assert p.balancer.conns == [0, 0]


def test_an_adopted_target_counts_like_a_picked_one_and_release_uncounts_it():
    """A UDP session handed over on reload: counted in the new worker's pool (active, and
    least_conn's connections), so that its release is not lost and least_conn sees it."""
    from mpproxy.upstream.pool import Target
    up = Upstream('u', (Server(Address('127.0.0.1', 1)), Server(Address('127.0.0.2', 2))),
                  balance='least_conn')
    p = UpstreamPool(up)
    handed = Target(socket.AF_INET, ('127.0.0.1', 1), '127.0.0.1:1')     # index -1: not ours
    mine = p.adopt(handed)
    assert mine is p.targets[0] and p.active == [1, 0] and p.balancer.conns == [1, 0]
    assert next(p.candidates(None, 1)).sockaddr[0] == '127.0.0.2'        # least_conn sees it
    p.release(mine)
    assert p.active[0] == 0 and p.balancer.conns[0] == 0
    gone = Target(socket.AF_INET, ('127.0.0.9', 9), '127.0.0.9:9')
    assert p.adopt(gone) is gone and p.active == [0, 1]                  # not ours: not counted
