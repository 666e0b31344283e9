"""Upstream pools from DNS: resolve at worker start, and again when the answers run out.

At start every server name is resolved (bounded, see `resolver`). A name that
does not resolve is a boot error for an upstream without `resolve` (the worker
exits with EXIT_WORKER_BOOT, the master reports it); with `resolve` the name
contributes no server until DNS answers. Re-resolution runs in each worker's
loop (a `Follower` per upstream with names): the next lookup comes when the
shortest TTL among the upstream's answers runs out, kept within the upstream's
`resolve` bounds [min, max] (`resolve: 30s` is [30s, 30s], a fixed interval).
A failed lookup keeps that name's last good addresses and is tried again after
`min`; a change rebuilds the pool's entries and balancer
(`UpstreamPool.replace_targets`).
"""

from __future__ import annotations

import asyncio
import ipaddress

from mpproxy.config.schema import Address, Resolve, Upstream
from mpproxy.config.values import format_duration, format_sockaddr
from mpproxy.errors import WorkerBootError
from mpproxy.upstream.pool import UpstreamPool
from mpproxy.upstream.resolver import ResolveError, Resolver

_refreshers: set[asyncio.Task] = set()     # strong references: the loop keeps only weak ones


def _is_name(address: Address) -> bool:
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return True
    return False


def next_delay(resolve: Resolve, ttls) -> float:
    """Seconds until the next lookup: the shortest of `ttls` (one per name; 0 after a failed
    lookup, None for an answer without TTL, which counts as `max`), within [min, max]."""
    shortest = min((resolve.max if ttl is None else ttl for ttl in ttls), default=resolve.max)
    return min(max(shortest, resolve.min), resolve.max)


class Follower:
    """Keeps one upstream's pool in step with DNS.

    Per server of the upstream, by position: `resolved`, its last good addresses;
    `failing`, whether its last lookup failed; `ttls`, how long its last answer holds
    (0 after a failure, None without TTL). Servers written as IP addresses are never
    looked up again.
    """

    def __init__(self, pool: UpstreamPool, resolver: Resolver, resolved: list, failing: list,
                 ttls: list, log=None):
        self.pool, self.resolver, self.log = pool, resolver, log
        self.resolved, self.failing, self.ttls = resolved, failing, ttls

    def delay(self) -> float:
        """Seconds until the next lookup, from the last answers."""
        servers = self.pool.upstream.servers
        return next_delay(self.pool.upstream.resolve,
                          [ttl for ttl, s in zip(self.ttls, servers) if _is_name(s.address)])

    async def run(self, rounds: int | None = None, sleep=asyncio.sleep) -> None:
        """Look the names up again each time `delay()` has passed (forever, or `rounds`
        times); `sleep` is the clock (a test's own)."""
        upstream = self.pool.upstream
        done = 0
        while rounds is None or done < rounds:
            delay = self.delay()
            if self.log is not None:
                self.log.debug('upstream %s: next lookup in %s', upstream.name,
                               format_duration(delay))
            await sleep(delay)
            done += 1
            try:
                await self.refresh_once()
            except Exception:  # noqa: BLE001 - a bug here must not stop later rounds
                if self.log is not None:
                    self.log.exception('upstream %s: re-resolving failed', upstream.name)

    async def refresh_once(self) -> bool:
        """Resolve every name once; a name that fails keeps its last good addresses.
        True when the pool's servers changed."""
        upstream, log = self.pool.upstream, self.log
        for i, server in enumerate(upstream.servers):
            if not _is_name(server.address):
                continue
            host = server.address.host
            try:
                answer = await self.resolver.resolve(host, server.address.port)
            except ResolveError as exc:
                if not self.failing[i] and log is not None:
                    log.warning('upstream %s: cannot resolve %s: %s; keeping its last addresses',
                                upstream.name, host, exc)
                self.failing[i] = True
                self.ttls[i] = 0.0
                continue
            if self.failing[i] and log is not None:
                log.info('upstream %s: %s resolves again', upstream.name, host)
            self.failing[i] = False
            self.resolved[i] = _stable(answer.addresses)
            self.ttls[i] = answer.ttl
        changed = self.pool.replace_targets(self.resolved)
        if changed and log is not None:
            log.info('upstream %s: servers now %s', upstream.name,
                     ', '.join(format_sockaddr(t.sockaddr) for t in self.pool.targets) or 'none')
        return changed


async def open_pool(upstream: Upstream, resolver_servers=(), log=None,
                    resolver: Resolver | None = None) -> UpstreamPool:
    """The pool for `upstream` with its names resolved; starts re-resolution when `resolve` is set.

    Raises WorkerBootError naming the upstream and host when a name does not
    resolve and the upstream has no `resolve`.
    """
    resolver = resolver or Resolver(resolver_servers)
    resolved, failing, ttls = [], [], []
    answers = await asyncio.gather(*(resolver.resolve(s.address.host, s.address.port)
                                     for s in upstream.servers), return_exceptions=True)
    for server, answer in zip(upstream.servers, answers):
        host = server.address.host
        if isinstance(answer, BaseException) and not isinstance(answer, ResolveError):
            raise answer
        if not isinstance(answer, ResolveError):
            resolved.append(_stable(answer.addresses))
            failing.append(False)
            ttls.append(answer.ttl)
        else:
            exc = answer
            if upstream.resolve is None:
                raise WorkerBootError(f'upstream {upstream.name}: cannot resolve {host}: {exc} '
                                      f'(set `resolve` to start without it)') from None
            if log is not None:
                log.warning('upstream %s: cannot resolve %s: %s; no server from it until DNS '
                            'answers', upstream.name, host, exc)
            resolved.append([])
            failing.append(True)
            ttls.append(0.0)
    pool = UpstreamPool(upstream, log, resolved)
    if upstream.resolve and any(_is_name(s.address) for s in upstream.servers):
        follower = Follower(pool, resolver, resolved, failing, ttls, log)
        task = asyncio.get_running_loop().create_task(follower.run())
        _refreshers.add(task)
        task.add_done_callback(_refreshers.discard)
    return pool


async def open_pools(config, listeners, log=None) -> dict[str, UpstreamPool]:
    """The pools of every upstream `listeners` use (directly or by SNI route), by name,
    resolved with `config.resolver`; re-resolution started where `resolve` is set."""
    names: list[str] = []
    for listener in listeners:
        for name in (listener.upstream, *(n for _, n in listener.sni_routes or ())):
            if name not in names:
                names.append(name)
    resolver = Resolver(config.resolver)
    pools = {}
    for name in names:
        pool = pools[name] = await open_pool(config.upstreams[name], log=log, resolver=resolver)
        if not pool.targets and log is not None:
            log.warning('upstream %s has no usable server address', name)
    return pools


def _stable(addresses: list) -> list:
    """One order for a set of addresses, so a DNS server rotating its answers changes nothing."""
    return sorted(addresses, key=lambda a: (a[0], a[1][0], a[1][1]))


async def unresolvable(config) -> list[str]:
    """`-t`: one line per server name that does not resolve, for upstreams without `resolve`."""
    resolver = Resolver(config.resolver)
    checks = [(name, i, server) for name, upstream in config.upstreams.items()
              if upstream.resolve is None
              for i, server in enumerate(upstream.servers) if _is_name(server.address)]
    answers = await asyncio.gather(*(resolver.resolve(s.address.host, s.address.port)
                                     for _, _, s in checks), return_exceptions=True)
    return [f'upstreams.{name}.servers[{i}]: cannot resolve {server.address.host}: {answer} '
            f'(set `resolve` to start without it)'
            for (name, i, server), answer in zip(checks, answers)
            if isinstance(answer, ResolveError)]
