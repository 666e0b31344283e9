"""Power of two random choices, as nginx's ngx_stream_upstream_random `random two least_conn`.

Draws two distinct servers at random in proportion to their weights and keeps
the one with fewer active connections relative to weight (the first drawn on
a tie, so an idle pool is spread exactly by weight).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from mpproxy.upstream.balancer import CountingBalancer


class RandomTwo(CountingBalancer):
    """Two weighted random candidates, the less loaded wins; pick() counts, release() uncounts."""

    def __init__(self, weights: Sequence[int], labels: Sequence[str] | None = None,
                 rng: random.Random | None = None):
        super().__init__(weights, labels)
        self.rng = rng or random.Random()
        self._all = list(range(len(self.weights)))
        self._cum = list(accumulate(self.weights))

    def pick(self, client_addr=None, exclude: set[int] = frozenset()) -> int | None:
        if exclude:
            idx = [i for i in self._all if i not in exclude]
            cum = list(accumulate(self.weights[i] for i in idx))
        else:
            idx, cum = self._all, self._cum
        if not idx:
            return None
        if len(idx) == 1:
            best = idx[0]
        else:
            total = cum[-1]
            rand = self.rng.random
            k1 = bisect_right(cum, rand() * total)
            w1 = cum[k1] - (cum[k1 - 1] if k1 else 0)
            r = rand() * (total - w1)             # second draw over the others
            if r >= cum[k1] - w1:
                r += w1                            # step over the first's range
            k2 = min(bisect_right(cum, r), len(idx) - 1)
            a, b = idx[k1], idx[k2]
            w, c = self.weights, self.conns
            best = b if c[b] * w[a] < c[a] * w[b] else a
        self.conns[best] += 1
        return best
