"""A worker's view of one upstream: its servers as socket addresses, in balancing order.

Built in the worker after the fork (names are resolved here, with the blocking
resolver, once at start; re-resolution belongs to a later resolver module).
The balancer (one module each: round_robin, least_conn, hash, random_two) sits
behind `candidates()` and `release()`, the one interface the data path uses.
"""

from __future__ import annotations

import ipaddress
import socket
import time
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
    weight (all A/AAAA records of a name become servers). Passive health, as
    nginx's `max_fails`/`fail_timeout`: `max_fails` failed connects within
    `fail_timeout` mark an entry down for `fail_timeout`. Backup entries are
    used only when no primary can be picked; `max_conns` caps an entry's
    connections in this worker. When every entry is down they are tried anyway.

    An entry's states::

        UP --max_fails failures within fail_timeout--> DOWN --fail_timeout passed--> UP
    """

    __slots__ = ('name', 'targets', 'balancer', 'needs_client', 'active', 'fails',
                 'window', 'down_until', 'max_fails', 'fail_timeout', 'max_conns',
                 'primary', 'backup', 'log')

    def __init__(self, upstream: Upstream, log=None):
        self.name = upstream.name
        self.log = log
        entries, weights, labels, servers = [], [], [], []
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
                servers.append(server)
        self.targets: tuple[Target, ...] = tuple(entries)
        self.balancer = make_balancer(upstream.balance, weights, upstream.hash_key, labels) \
            if entries else None
        self.needs_client = bool(self.balancer and self.balancer.needs_client)
        n = len(entries)
        self.active = [0] * n                 # connections or sessions open now
        self.fails = [0] * n                  # failures in the current window
        self.window = [0.0] * n               # when the current window started
        self.down_until = [0.0] * n
        self.max_fails = [s.max_fails for s in servers]
        self.fail_timeout = [s.fail_timeout for s in servers]
        self.max_conns = [s.max_conns for s in servers]
        self.backup = frozenset(i for i, s in enumerate(servers) if s.backup)
        self.primary = frozenset(range(n)) - self.backup

    def candidates(self, client_addr, tries: int):
        """Servers to try in turn for a new client (at most `tries`), picked lazily:
        a balancer that counts connections counts one per server actually tried."""
        balancer = self.balancer
        if balancer is None:
            return
        tried: set[int] = set()
        for _ in range(tries):
            index = self._pick(balancer, client_addr, tried)
            if index is None:
                return
            tried.add(index)
            self.active[index] += 1
            yield self.targets[index]

    def _pick(self, balancer, client_addr, tried: set[int]) -> int | None:
        unavailable = set(tried)
        now = time.monotonic()
        for i, until in enumerate(self.down_until):
            if until > now or (self.max_conns[i] and self.active[i] >= self.max_conns[i]):
                unavailable.add(i)
        index = balancer.pick(client_addr, unavailable | self.backup)
        if index is None and self.backup:
            index = balancer.pick(client_addr, unavailable | self.primary)
        if index is None and not tried and len(unavailable) == len(self.targets):
            full = {i for i in range(len(self.targets))
                    if self.max_conns[i] and self.active[i] >= self.max_conns[i]}
            index = balancer.pick(client_addr, full | self.backup)   # all down: try anyway
            if index is None and self.backup:
                index = balancer.pick(client_addr, full | self.primary)
        return index

    def release(self, target: Target) -> None:
        """A connection or session to `target` ended (or its connect failed)."""
        i = target.index
        if 0 <= i < len(self.targets) and self.targets[i] is target:
            self.balancer.release(i)
            if self.active[i] > 0:
                self.active[i] -= 1

    def failed(self, target: Target) -> None:
        """A connect to `target` failed or timed out (or its UDP peer is unreachable)."""
        i = target.index
        if not (0 <= i < len(self.targets) and self.targets[i] is target) or not self.max_fails[i]:
            return
        now = time.monotonic()
        if now - self.window[i] > self.fail_timeout[i]:
            self.window[i] = now
            self.fails[i] = 0
        self.fails[i] += 1
        if self.fails[i] >= self.max_fails[i] and self.down_until[i] <= now:
            self.down_until[i] = now + self.fail_timeout[i]
            self.fails[i] = 0
            if self.log is not None:
                self.log.warning('upstream %s: server %s is down for %gs after %d failure(s)',
                                 self.name, target.label, self.fail_timeout[i], self.max_fails[i])

    def succeeded(self, target: Target) -> None:
        i = target.index
        if 0 <= i < len(self.targets) and self.targets[i] is target:
            self.fails[i] = 0
