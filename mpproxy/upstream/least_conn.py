"""Weighted least connections, as nginx's ngx_stream_upstream_least_conn_module.

Picks the server with the smallest active-connections/weight ratio (compared as
conns_a * weight_b < conns_b * weight_a, no division); ties are broken by smooth
weighted round robin among the tied servers, as nginx does.
"""

from __future__ import annotations

from collections.abc import Sequence

from mpproxy.upstream.balancer import CountingBalancer
from mpproxy.upstream.round_robin import smooth_pick


class LeastConn(CountingBalancer):
    """Fewest connections relative to weight; pick() counts, release() uncounts."""

    def __init__(self, weights: Sequence[int], labels: Sequence[str] | None = None):
        super().__init__(weights, labels)
        self.current = [0] * len(self.weights)

    def pick(self, client_addr=None, exclude: set[int] = frozenset()) -> int | None:
        weights, conns = self.weights, self.conns
        tied: list[int] = []
        for i in range(len(weights)):
            if i in exclude:
                continue
            if not tied:
                tied.append(i)
                continue
            b = tied[0]
            lhs, rhs = conns[i] * weights[b], conns[b] * weights[i]
            if lhs < rhs:
                tied = [i]
            elif lhs == rhs:
                tied.append(i)
        if not tied:
            return None
        best = tied[0] if len(tied) == 1 else smooth_pick(weights, self.current, tied)
        conns[best] += 1
        return best
