"""A worker's view of one upstream: its servers as socket addresses, in balancing order.

Built in the worker after the fork. The worker resolves names with
`upstream.resolver` and passes the addresses in (`resolved`); without them the
pool resolves with the blocking system resolver (tests, tools). With `resolve:`
set, `upstream.discovery` calls `replace_targets` when the addresses change.
The balancer (one module each: round_robin, least_conn, hash, random_two) sits
behind `candidates()` and `release()`, the one interface the data path uses.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
import time
from dataclasses import dataclass

from mpproxy.config.schema import Upstream
from mpproxy.upstream.balancer import make_balancer
from mpproxy.upstream.health import comeback_index

# Upper bounds (seconds) of the upstream connect-time histogram's buckets; one more bucket
# past the last counts the rest (observe/metrics.py publishes them as Prometheus buckets).
CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class Target:
    """One concrete server address a relay or UDP session connects to."""
    family: int
    sockaddr: tuple
    label: str          # 'host:port' as written in the config, for logs
    index: int = -1     # its entry in the pool's balancer; -1: not counted by this pool
    generation: int = 0  # the pool's entry set it belongs to (replace_targets makes a new one)


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

    Counters for the metrics, per server of the config (its position; every address of a
    server counts on it), plain ints the data path adds to: `connect_errors` (what
    `failed()` sees), `connect_hist` (successful TCP connects by duration, len(CONNECT_BUCKETS)
    + 1 buckets per server, server-major) and `connect_ns` (their total time).

    An entry's states::

        UP --max_fails failures within fail_timeout--> DOWN --fail_timeout passed--> UP

    Run-time control (`mpproxy server`, read from the master's block by the worker and
    applied with `control`): a server in drain or maint is never picked, not even when
    every other one is down; a weight set there replaces the config's. slow_start: an entry
    that comes back (its health check passes again, its passive-health time is over, or it
    is set ready) starts at a small share of its weight, which `tick` (every 0.5 s) raises
    linearly to all of it over slow_start; with `balance: hash` slow_start is ignored (a
    ramp would move keys back and forth).
    """

    __slots__ = ('name', 'upstream', 'targets', 'balancer', 'needs_client', 'active', 'fails',
                 'window', 'down_until', 'max_fails', 'fail_timeout', 'max_conns',
                 'primary', 'backup', 'log', 'generation', 'by_key', 'since', 'position',
                 'health', 'connect_errors', 'connect_hist', 'connect_ns', 'single',
                 'out', 'weights', 'labels', 'slow', 'slowed', 'comebacks', 'seen_until',
                 'ramp_from', 'effective')

    def __init__(self, upstream: Upstream, log=None, resolved=None):
        """`resolved`: per server of `upstream`, its [(family, sockaddr), ...]; None: resolve here."""
        self.name = upstream.name
        self.upstream = upstream
        self.log = log
        self.generation = 0
        self.health = None                    # set by the worker when the upstream is checked
        n = len(upstream.servers)
        self.out = frozenset()                # entries drained or in maint: never picked
        self.weights: list[int] = [s.weight for s in upstream.servers]   # per server position
        self.slow = [(s.slow_start if s.slow_start is not None else upstream.slow_start)
                     if upstream.balance != 'hash' else 0.0 for s in upstream.servers]
        self.slowed = any(self.slow)
        self.connect_errors = [0] * n         # metrics, per server position (see above)
        self.connect_hist = [0] * (n * (len(CONNECT_BUCKETS) + 1))
        self.connect_ns = [0] * n
        if resolved is None:
            resolved = []
            for server in upstream.servers:
                try:
                    resolved.append(_resolve(server.address.host, server.address.port))
                except OSError:
                    resolved.append([])
        self._build(resolved, {})

    def _build(self, resolved, keep: dict) -> None:
        """Make the entries and balancer for `resolved`; `keep`: key -> old state to carry."""
        entries, weights, labels, servers, positions = [], [], [], [], []
        for position, (server, addresses) in enumerate(zip(self.upstream.servers, resolved)):
            label = str(server.address)
            for family, sockaddr in addresses:
                entries.append(Target(family, sockaddr, label, len(entries), self.generation))
                positions.append(position)
                weights.append(server.weight)
                labels.append(f'{label}/{sockaddr[0]}')
                servers.append(server)
        upstream = self.upstream
        weights = [self.weights[p] for p in positions]
        balancer = make_balancer(upstream.balance, weights, upstream.hash_key, labels) \
            if entries else None
        n = len(entries)
        self.labels = labels
        self.effective = weights              # per entry: what the balancer has now
        self.comebacks = [None] * n           # (slow_start) health comebacks seen, per entry
        self.seen_until = [0.0] * n           # (slow_start) passive-health downs seen
        self.ramp_from = [0.0] * n            # (slow_start) came back then; 0: not ramping
        self.targets: tuple[Target, ...] = tuple(entries)
        self.by_key = {_key(t): t.index for t in entries}
        self.active = [0] * n                 # connections or sessions open now
        self.fails = [0] * n                  # failures in the current window
        self.window = [0.0] * n               # when the current window started
        self.down_until = [0.0] * n
        self.since = [self.generation] * n    # the first generation this address was in
        for i, target in enumerate(entries):
            old = keep.get(_key(target))
            if old is not None:
                self.active[i], self.fails[i], self.window[i], self.down_until[i], \
                    self.since[i] = old
                if hasattr(balancer, 'conns'):
                    balancer.conns[i] = self.active[i]
        self.position = positions             # entry -> index of its server in the config
        self.max_fails = [s.max_fails for s in servers]
        self.fail_timeout = [s.fail_timeout for s in servers]
        self.max_conns = [s.max_conns for s in servers]
        self.backup = frozenset(i for i, s in enumerate(servers) if s.backup)
        self.primary = frozenset(range(n)) - self.backup
        self.needs_client = bool(balancer and balancer.needs_client)
        # one server address, not a backup, no max_conns: every first pick is that one (a
        # down server is tried anyway when it is the only one), so candidates() skips _pick
        self.single = n == 1 and not self.backup and not self.max_conns[0]
        self.balancer = balancer              # last: candidates() notices the swap by this

    def replace_targets(self, resolved) -> bool:
        """New addresses per server (as for __init__); False when nothing changed.

        Addresses that stay keep their health and connection counts; Targets of
        removed addresses are no longer picked, and releasing them is harmless.
        """
        if [_key(t) for t in self.targets] == [
                (f, a[:2], str(s.address)) for s, addrs in zip(self.upstream.servers, resolved)
                for f, a in addrs]:
            return False
        keep = {_key(t): (self.active[i], self.fails[i], self.window[i], self.down_until[i],
                          self.since[i]) for i, t in enumerate(self.targets)}
        self.generation += 1
        self._build(resolved, keep)
        return True

    def _index(self, target: Target) -> int | None:
        """The entry `target` counts on now, or None (removed, or never counted here)."""
        i = target.index
        if 0 <= i < len(self.targets) and self.targets[i] is target:
            return i
        if i < 0:
            return None
        j = self.by_key.get(_key(target))
        if j is not None and self.since[j] <= target.generation <= self.generation:
            return j
        return None

    # -- run-time control and slow start (see the class docstring) ----------------------------
    def control(self, records) -> None:
        """The master's records per server position: (state, weight, since, until), state 0 =
        ready; weight 0 = the config's."""
        now = time.monotonic()
        self.out = frozenset(i for i, p in enumerate(self.position) if records[p][0])
        for i, p in enumerate(self.position):     # set ready (since) within its slow_start
            state, _, since, _ = records[p]
            if not state and since > self.ramp_from[i] and now - since < self.slow[p]:
                self.ramp_from[i] = since
        weights = [r[1] or s.weight for r, s in zip(records, self.upstream.servers)]
        if weights != self.weights or any(self.ramp_from):
            self.weights = weights
            self._reweigh(now)

    def tick(self, now: float) -> None:
        """slow_start: notice entries that came back since the last tick (a health check
        passed again: its comeback count moved; a passive-health time ran out), and raise
        the weights of ramping ones."""
        if self.slowed:
            self._notice(now)
            if any(self.ramp_from):
                self._reweigh(now)

    def _notice(self, now: float) -> bool:
        """Start the ramp of entries that came back since last asked; whether any did.
        (Also called before each pick: a server is never picked at full weight in between.)"""
        health = self.health
        if health is not None:
            block, base = health[0], comeback_index(health[0], health[1])
        noticed = False
        for i, p in enumerate(self.position):
            if not self.slow[p]:
                continue
            if health is not None:
                count = block[base + p]
                if self.comebacks[i] is not None and count != self.comebacks[i]:
                    self.ramp_from[i] = now
                    noticed = True
                self.comebacks[i] = count
            until = self.down_until[i]
            if until and until <= now and until != self.seen_until[i]:
                self.seen_until[i] = until
                if now - until < self.slow[p]:
                    self.ramp_from[i] = max(self.ramp_from[i], until)
                    noticed = True
        return noticed

    def _reweigh(self, now: float) -> None:
        """Give the balancer each entry's weight now (its ramp's share, if ramping)."""
        scale = SLOW_SCALE if self.slowed else 1
        weights = []
        for i, p in enumerate(self.position):
            weight = self.weights[p] * scale
            if self.ramp_from[i]:
                share = (now - self.ramp_from[i]) / self.slow[p]
                if share >= 1:
                    self.ramp_from[i] = 0.0
                else:
                    weight = max(1, int(weight * max(share, SLOW_FLOOR)))
            weights.append(weight)
        if weights == self.effective or self.balancer is None:
            return
        self.effective = weights
        balancer = make_balancer(self.upstream.balance, weights, self.upstream.hash_key,
                                 self.labels)
        if hasattr(balancer, 'conns'):
            balancer.conns[:] = self.balancer.conns
        self.balancer = balancer

    def candidates(self, client_addr, tries: int):
        """Servers to try in turn for a new client (at most `tries`), picked lazily:
        a balancer that counts connections counts one per server actually tried."""
        if self.single and self.health is None and tries > 0 and not self.out:
            index = self.balancer.pick(client_addr, _NONE)     # (its side effects: counts)
            self.active[index] += 1
            return iter((self.targets[index],))
        return self._candidates(client_addr, tries)

    def _candidates(self, client_addr, tries: int):
        balancer = self.balancer
        if balancer is None:
            return
        tried: set[int] = set()
        given: list[Target] = []
        for _ in range(tries):
            if self.balancer is not balancer:      # DNS changed the entries between two picks
                balancer = self.balancer
                if balancer is None:
                    return
                tried = {j for j in map(self._index, given) if j is not None}
            index = self._pick(balancer, client_addr, tried)
            if index is None:
                return
            tried.add(index)
            self.active[index] += 1
            target = self.targets[index]
            given.append(target)
            yield target

    def _pick(self, balancer, client_addr, tried: set[int]) -> int | None:
        out = self.out
        unavailable = set(tried)
        if out:
            unavailable |= out
        now = time.monotonic()
        if self.slowed and self._notice(now):     # came back since the last tick: ramp now
            self._reweigh(now)
            balancer = self.balancer
        health = self.health                 # (shared block, offset) with active checks
        for i, until in enumerate(self.down_until):
            if until > now or (self.max_conns[i] and self.active[i] >= self.max_conns[i]) \
                    or (health is not None and health[0][health[1] + self.position[i]]):
                unavailable.add(i)
        index = balancer.pick(client_addr, unavailable | self.backup)
        if index is None and self.backup:
            index = balancer.pick(client_addr, unavailable | self.primary)
        if index is None and not tried and len(unavailable) == len(self.targets):
            full = {i for i in range(len(self.targets))
                    if self.max_conns[i] and self.active[i] >= self.max_conns[i]} | out
            index = balancer.pick(client_addr, full | self.backup)   # all down: try anyway
            if index is None and self.backup:
                index = balancer.pick(client_addr, full | self.primary)
        return index

    def adopt(self, target: Target) -> Target:
        """A connection or session to `target` handed over from another worker (a reload):
        counted here as if picked now (active, and the balancer's connection count), and the
        pool's own Target for that address returned, so that `release` uncounts it. A target
        this pool no longer has is returned as it is (not counted)."""
        i = self.by_key.get(_key(target))     # (not _index: the target is another worker's,
        if i is None:                          # of any generation of its pool)
            return target
        self.active[i] += 1
        conns = getattr(self.balancer, 'conns', None)
        if conns is not None:
            conns[i] += 1
        return self.targets[i]

    def release(self, target: Target) -> None:
        """A connection or session to `target` ended (or its connect failed)."""
        i = self._index(target)
        if i is not None:
            self.balancer.release(i)
            if self.active[i] > 0:
                self.active[i] -= 1

    def failed(self, target: Target) -> None:
        """A connect to `target` failed or timed out (or its UDP peer is unreachable)."""
        i = self._index(target)
        if i is not None:
            self.connect_errors[self.position[i]] += 1
        if i is None or not self.max_fails[i]:
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

    def succeeded(self, target: Target, seconds: float | None = None) -> None:
        """A connect to `target` succeeded, taking `seconds` (counted in the histogram)."""
        i = self._index(target)
        if i is not None:
            self.fails[i] = 0
            if seconds is not None:
                position = self.position[i]
                self.connect_hist[position * (len(CONNECT_BUCKETS) + 1)
                                  + bisect.bisect_left(CONNECT_BUCKETS, seconds)] += 1
                self.connect_ns[position] += int(seconds * 1e9)


_NONE: frozenset = frozenset()
SLOW_SCALE = 20           # with slow_start, weights are scaled so that a ramp has steps
SLOW_FLOOR = 0.05         # a server coming back starts at this share of its weight


def _key(target: Target) -> tuple:
    return target.family, target.sockaddr[:2], target.label
