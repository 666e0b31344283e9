"""Consistent (ketama) hash on the client, as nginx's ngx_stream_upstream_hash `consistent`.

Each server gets 160 points per unit of weight on a 32-bit ring (md5 of
f'{label}-{i}'; weights are divided by their gcd first, ratios unchanged); a
client key (its ip, or ip:port for hash_key: client_addr) hashes to the first
point at or after it. Adding one server to N moves about 1/(N+1) of the keys;
removing one moves only its own. Excluded servers are walked past, clockwise.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Sequence
from math import gcd

from mpproxy.upstream.balancer import Balancer

POINTS_PER_WEIGHT = 160


def _h32(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:4], 'little')


def client_key(client_addr, hash_key: str) -> str:
    """'ip' or 'ip:port' ('[ip]:port' for IPv6) of a socket address tuple; '' without one."""
    if not client_addr:
        return ''
    ip = str(client_addr[0])
    if hash_key == 'client_ip' or len(client_addr) < 2:
        return ip
    return f'[{ip}]:{client_addr[1]}' if ':' in ip else f'{ip}:{client_addr[1]}'


class ConsistentHash(Balancer):
    """Ketama ring of the servers, keyed by client ip or ip:port."""

    needs_client = True

    def __init__(self, weights: Sequence[int], labels: Sequence[str] | None = None,
                 hash_key: str = 'client_ip'):
        super().__init__(weights, labels)
        if hash_key not in ('client_ip', 'client_addr'):
            raise ValueError(f'unknown hash_key {hash_key!r}')
        self.hash_key = hash_key
        g = 0
        for w in self.weights:
            g = gcd(g, w)
        points = sorted(
            (_h32(f'{label}-{i}'), label, index)
            for index, (label, w) in enumerate(zip(self.labels, self.weights))
            for i in range(POINTS_PER_WEIGHT * (w // g)))
        self._ring = [p[0] for p in points]      # ties on a point go to the smaller label
        self._owner = [p[2] for p in points]

    def pick(self, client_addr, exclude: set[int] = frozenset()) -> int | None:
        ring, owner = self._ring, self._owner
        if not ring:
            return None
        n = len(ring)
        start = bisect_left(ring, _h32(client_key(client_addr, self.hash_key))) % n
        if not exclude:
            return owner[start]
        if len(exclude) >= len(self.weights) and all(i in exclude for i in range(len(self.weights))):
            return None
        for k in range(n):
            index = owner[(start + k) % n]
            if index not in exclude:
                return index
        return None
