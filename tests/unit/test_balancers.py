"""Balancers: distribution by weight, nginx's smooth order, hash stability, exclude."""

import random
from collections import Counter

import pytest

from mpproxy.upstream.balancer import make_balancer
from mpproxy.upstream.hash import ConsistentHash, client_key
from mpproxy.upstream.random_two import RandomTwo

KINDS = ('round_robin', 'least_conn', 'hash', 'random_two')
WEIGHTS = (5, 3, 2, 1)


def addr(i, port=40000):
    return (f'10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}', port)


def assert_near_weights(counts, weights, picks, tol=0.02):
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[i] / picks - w / total) < tol, (counts, weights)


def test_smooth_round_robin_matches_nginx_sequence():
    b = make_balancer('round_robin', (5, 1, 1))
    assert ''.join('abc'[b.pick(None, set())] for _ in range(14)) == 'aabacaa' * 2


@pytest.mark.parametrize('kind', ['round_robin', 'least_conn', 'random_two'])
def test_distribution_follows_weights(kind):
    b = make_balancer(kind, WEIGHTS)
    if kind == 'random_two':
        b.rng = random.Random(7)
    picks = 22_000
    counts = Counter()
    for _ in range(picks):
        i = b.pick(None, set())
        counts[i] += 1
        b.release(i)
    assert_near_weights(counts, WEIGHTS, picks)


def test_round_robin_and_least_conn_exact_over_a_cycle():
    for kind in ('round_robin', 'least_conn'):
        b = make_balancer(kind, WEIGHTS)
        counts = Counter()
        for _ in range(sum(WEIGHTS) * 10):
            i = b.pick(None, set())
            counts[i] += 1
            b.release(i)
        assert [counts[i] for i in range(4)] == [w * 10 for w in WEIGHTS]


def test_least_conn_prefers_fewest_relative_to_weight():
    b = make_balancer('least_conn', (2, 1))
    held = [b.pick(None, set()) for _ in range(3)]      # 2 on server 0, 1 on server 1
    assert sorted(held) == [0, 0, 1] and b.conns == [2, 1]
    b.release(0)                                         # 1/2 < 1/1
    assert b.pick(None, set()) == 0
    b.release(1)                                         # server 1 idle
    assert b.pick(None, set()) == 1
    b.release(1)
    b.release(1)                                         # never below zero
    assert b.conns == [2, 0]


def test_random_two_avoids_the_loaded_server():
    b = RandomTwo((1, 1, 1), rng=random.Random(1))
    b.conns[0] = 100
    counts = Counter()
    for _ in range(300):
        i = b.pick(None, set())
        counts[i] += 1
        b.release(i)
    assert counts[0] == 0 and counts[1] > 100 and counts[2] > 100
    assert b.needs_client is False


def test_random_two_held_connections_follow_weights():
    b = RandomTwo(WEIGHTS, rng=random.Random(3))
    for _ in range(11_000):
        b.pick(None, set())
    assert_near_weights(dict(enumerate(b.conns)), WEIGHTS, 11_000)


def test_hash_is_stable_and_needs_client():
    b1 = make_balancer('hash', (1, 1, 1, 1), labels=['a:1', 'b:1', 'c:1', 'd:1'])
    b2 = make_balancer('hash', (1, 1, 1, 1), labels=['a:1', 'b:1', 'c:1', 'd:1'])
    assert b1.needs_client is True
    for i in range(500):
        first = b1.pick(addr(i), set())
        assert b1.pick(addr(i), set()) == first == b2.pick(addr(i), set())
    spread = Counter(b1.pick(addr(i), set()) for i in range(10_000))
    assert all(1500 < spread[i] < 3500 for i in range(4)), spread


def test_hash_weights_scale_share():
    b = make_balancer('hash', (3, 1), labels=['a', 'b'])
    spread = Counter(b.pick(addr(i), set()) for i in range(10_000))
    assert 0.65 < spread[0] / 10_000 < 0.85


def owners(labels, keys=10_000):
    b = ConsistentHash([1] * len(labels), labels)
    return [labels[b.pick(addr(i), set())] for i in range(keys)]


def test_hash_adding_a_server_moves_about_one_fifth():
    four = ['s1:80', 's2:80', 's3:80', 's4:80']
    before, after = owners(four), owners(four + ['s5:80'])
    moved = [i for i in range(len(before)) if before[i] != after[i]]
    assert 0.10 < len(moved) / len(before) < 0.30
    assert all(after[i] == 's5:80' for i in moved)       # keys only move to the new one


def test_hash_removing_a_server_moves_only_its_keys():
    five = ['s1:80', 's2:80', 's3:80', 's4:80', 's5:80']
    before = owners(five)
    after = owners([s for s in five if s != 's3:80'])
    for b, a in zip(before, after):
        assert a == b if b != 's3:80' else a != 's3:80'


def test_hash_key_ip_versus_addr():
    ip = make_balancer('hash', [1] * 8, hash_key='client_ip')
    ap = make_balancer('hash', [1] * 8, hash_key='client_addr')
    assert len({ip.pick(('10.0.0.1', p), set()) for p in range(1000, 1200)}) == 1
    assert len({ap.pick(('10.0.0.1', p), set()) for p in range(1000, 1200)}) > 4
    assert client_key(('10.0.0.1', 5), 'client_ip') == '10.0.0.1'
    assert client_key(('10.0.0.1', 5), 'client_addr') == '10.0.0.1:5'
    assert client_key(('::1', 5, 0, 0), 'client_addr') == '[::1]:5'
    assert client_key(('::1', 5, 0, 0), 'client_ip') == '::1'
    assert client_key(None, 'client_addr') == ''


@pytest.mark.parametrize('kind', KINDS)
def test_exclude_never_returns_an_excluded_index(kind):
    b = make_balancer(kind, WEIGHTS)
    for i in range(2000):
        client = addr(i)
        excluded = {j for j in range(4) if (i >> j) & 1}
        got = b.pick(client, excluded)
        if len(excluded) == 4:
            assert got is None
        else:
            assert got is not None and got not in excluded
            b.release(got)


@pytest.mark.parametrize('kind', KINDS)
def test_exclude_walks_to_every_server_in_turn(kind):
    """A caller retrying after each failure reaches each server once, then None."""
    b = make_balancer(kind, WEIGHTS)
    tried = set()
    for _ in range(4):
        got = b.pick(('192.0.2.7', 5555), tried)
        assert got is not None and got not in tried
        tried.add(got)
    assert tried == {0, 1, 2, 3}
    assert b.pick(('192.0.2.7', 5555), tried) is None


def test_hash_exclude_goes_to_the_next_distinct_server_stably():
    b = make_balancer('hash', (1, 1, 1, 1))
    for i in range(200):
        first = b.pick(addr(i), set())
        second = b.pick(addr(i), {first})
        assert second != first and b.pick(addr(i), {first}) == second


def test_empty_and_invalid():
    for kind in KINDS:
        assert make_balancer(kind, ()).pick(('10.0.0.1', 1), set()) is None
    with pytest.raises(ValueError):
        make_balancer('fastest', (1,))
    with pytest.raises(ValueError):
        make_balancer('round_robin', (0,))
    with pytest.raises(ValueError):
        make_balancer('hash', (1,), hash_key='uri')
