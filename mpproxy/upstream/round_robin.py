"""Smooth weighted round robin, as nginx's ngx_stream_upstream_round_robin.

Each pick adds every eligible server's weight to its current weight, takes the
largest, and subtracts the eligible total from the winner: weights 5,1,1 give
a a b a c a a. Excluded servers neither gain nor win (nginx's `tried` bits).
"""

from __future__ import annotations

from collections.abc import Sequence

from mpproxy.upstream.balancer import Balancer


def smooth_pick(weights: Sequence[int], current: list[int], indices) -> int | None:
    """One smooth-WRR step over `indices`, updating `current` in place."""
    best = None
    total = 0
    for i in indices:
        w = weights[i]
        current[i] += w
        total += w
        if best is None or current[i] > current[best]:
            best = i
    if best is not None:
        current[best] -= total
    return best


class RoundRobin(Balancer):
    """Weighted round robin without bursts."""

    def __init__(self, weights: Sequence[int], labels: Sequence[str] | None = None):
        super().__init__(weights, labels)
        self.current = [0] * len(self.weights)

    def pick(self, client_addr=None, exclude: set[int] = frozenset()) -> int | None:
        n = len(self.weights)
        indices = range(n) if not exclude else [i for i in range(n) if i not in exclude]
        return smooth_pick(self.weights, self.current, indices)
