"""A worker's view of one upstream: its servers as socket addresses, in balancing order.

Built in the worker after the fork (names are resolved here, with the blocking
resolver, once at start; re-resolution belongs to a later resolver module).
The core balancer is plain round robin; `candidates()` is the one interface the
data path uses, so the weighted balancers slot in behind it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from mpproxy.config.schema import Upstream


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete server address a relay or UDP session connects to."""
    family: int
    sockaddr: tuple
    label: str          # 'host:port' as written in the config, for logs


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
    """Round robin over the resolved servers of one upstream."""

    __slots__ = ('name', 'targets', '_next')
    needs_client = False          # round robin ignores the client address: do not look it up

    def __init__(self, upstream: Upstream):
        self.name = upstream.name
        targets = []
        for server in upstream.servers:
            label = str(server.address)
            try:
                resolved = _resolve(server.address.host, server.address.port)
            except OSError:
                resolved = []
            for family, sockaddr in resolved:
                targets.append(Target(family, sockaddr, label))
        self.targets: tuple[Target, ...] = tuple(targets)
        self._next = 0

    def candidates(self, client_addr, tries: int) -> list[Target]:
        """Up to `tries` distinct servers to try in order for a new client."""
        targets = self.targets
        n = len(targets)
        if n == 0:
            return []
        start = self._next
        self._next = (start + 1) % n
        return [targets[(start + i) % n] for i in range(min(tries, n))]
