"""The one balancer interface, and a factory choosing the module by `balance:`.

Mirrors the peer-selection half of nginx's stream upstream modules
(ngx_stream_upstream_round_robin, _least_conn, _hash, _random). A balancer
knows only weights (and labels, for the hash ring); `pick` returns an index
into that list and never one in `exclude`, so a caller retrying after a
failure (next_upstream_tries) adds the failed index and picks again.
Pure code: no sockets, no clock, no config objects.
"""

from __future__ import annotations

from collections.abc import Sequence

KINDS = ('round_robin', 'least_conn', 'hash', 'random_two')


class Balancer:
    """Chooses a server index for a new connection or UDP session."""

    needs_client = False      # True only when pick() reads client_addr

    def __init__(self, weights: Sequence[int], labels: Sequence[str] | None = None):
        weights = tuple(int(w) for w in weights)
        if any(w < 1 for w in weights):
            raise ValueError(f'weights must be >= 1: {weights!r}')
        if labels is None:
            labels = [str(i) for i in range(len(weights))]
        if len(labels) != len(weights):
            raise ValueError('labels and weights differ in length')
        self.weights = weights
        self.labels = tuple(labels)

    def __len__(self) -> int:
        return len(self.weights)

    def pick(self, client_addr, exclude: set[int] = frozenset()) -> int | None:
        """An index not in `exclude`, or None when every index is excluded."""
        raise NotImplementedError

    def release(self, index: int) -> None:
        """The connection picked on `index` ended (counted by least_conn, random_two)."""


class CountingBalancer(Balancer):
    """Keeps active connections per server: pick() counts, release() uncounts."""

    def __init__(self, weights: Sequence[int], labels: Sequence[str] | None = None):
        super().__init__(weights, labels)
        self.conns = [0] * len(self.weights)

    def release(self, index: int) -> None:
        if self.conns[index] > 0:
            self.conns[index] -= 1


def make_balancer(kind: str, weights: Sequence[int], hash_key: str = 'client_ip',
                  labels: Sequence[str] | None = None) -> Balancer:
    """The balancer for an upstream's `balance:` value; `labels` place servers on the hash ring."""
    if kind == 'round_robin':
        from mpproxy.upstream.round_robin import RoundRobin
        return RoundRobin(weights, labels)
    if kind == 'least_conn':
        from mpproxy.upstream.least_conn import LeastConn
        return LeastConn(weights, labels)
    if kind == 'hash':
        from mpproxy.upstream.hash import ConsistentHash
        return ConsistentHash(weights, labels, hash_key=hash_key)
    if kind == 'random_two':
        from mpproxy.upstream.random_two import RandomTwo
        return RandomTwo(weights, labels)
    raise ValueError(f'unknown balance {kind!r}, expected one of {", ".join(KINDS)}')
