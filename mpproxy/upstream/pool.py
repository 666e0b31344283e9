"""A worker's view of one upstream: its servers as socket addresses, in balancing order.

Built in the worker after the fork (names are resolved here, with the blocking
resolver, once at start; re-resolution belongs to a later resolver module).
The balancer (one module each: round_robin, least_conn, hash, random_two) sits
behind `candidates()` and `release()`, the one interface the data path uses.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from mpproxy.config.schema import Upstream
from mpproxy.upstream.balancer import make_balancer


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete server address a relay or UDP session connects to."""
    family: int
    sockaddr: tuple
    label: str          # 'host:port' as written in the config, for logs
    index: int = -1     # its entry in the pool's balancer; -1: not counted by this pool


def _resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen, out = set(), []
        for family, _, _, _, sockaddr in infos:
            key = (family, sockaddr[:2])
            if key not in seen:
                seen.add(key)
                out.append((family, sockaddr[:2] if family == socket.AF_INET else sockaddr))
        return out
    if ip.version == 6:
        return [(socket.AF_INET6, (str(ip), port, 0, 0))]
    return [(socket.AF_INET, (str(ip), port))]


class UpstreamPool:
    """The servers of one upstream as addresses, chosen by the configured balancer.

    Every resolved address of a server is an entry of its own with the server's
    weight (all A/AAAA records of a name become servers).
    """

    __slots__ = ('name', 'targets', 'balancer', 'needs_client')

    def __init__(self, upstream: Upstream):
        self.name = upstream.name
        entries, weights, labels = [], [], []
        for server in upstream.servers:
            label = str(server.address)
            try:
                resolved = _resolve(server.address.host, server.address.port)
            except OSError:
                resolved = []
            for family, sockaddr in resolved:
                entries.append(Target(family, sockaddr, label, len(entries)))
                weights.append(server.weight)
                labels.append(f'{label}/{sockaddr[0]}')
        self.targets: tuple[Target, ...] = tuple(entries)
        self.balancer = make_balancer(upstream.balance, weights, upstream.hash_key, labels) \
            if entries else None
        self.needs_client = bool(self.balancer and self.balancer.needs_client)

    def candidates(self, client_addr, tries: int):
        """Servers to try in turn for a new client (at most `tries`), picked lazily:
        a balancer that counts connections counts one per server actually tried."""
        balancer = self.balancer
        if balancer is None:
            return
        tried: set[int] = set()
        for _ in range(tries):
            index = balancer.pick(client_addr, tried)
            if index is None:
                return
            tried.add(index)
            yield self.targets[index]

    def release(self, target: Target) -> None:
        """A connection or session to `target` ended (or its connect failed)."""
        if 0 <= target.index < len(self.targets) and self.targets[target.index] is target:
            self.balancer.release(target.index)
