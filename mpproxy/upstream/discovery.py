"""Upstream pools from DNS: resolve at worker start, and again every `resolve` interval.

At start every server name is resolved (bounded, see `resolver`). A name that
does not resolve is a boot error for an upstream without `resolve` (the worker
exits with EXIT_WORKER_BOOT, the master reports it); with `resolve` the name
contributes no server until DNS answers. Re-resolution runs in each worker's
loop; a failed lookup keeps that name's last good addresses, and a change
rebuilds the pool's entries and balancer (`UpstreamPool.replace_targets`).
"""

from __future__ import annotations

import asyncio
import ipaddress

from mpproxy.config.schema import Address, Upstream
from mpproxy.config.values import format_sockaddr
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


async def open_pool(upstream: Upstream, resolver_servers=(), log=None,
                    resolver: Resolver | None = None) -> UpstreamPool:
    """The pool for `upstream` with its names resolved; starts re-resolution when `resolve` is set.

    Raises WorkerBootError naming the upstream and host when a name does not
    resolve and the upstream has no `resolve`.
    """
    resolver = resolver or Resolver(resolver_servers)
    resolved, failing = [], []
    answers = await asyncio.gather(*(resolver.resolve(s.address.host, s.address.port)
                                     for s in upstream.servers), return_exceptions=True)
    for server, answer in zip(upstream.servers, answers):
        host = server.address.host
        if isinstance(answer, BaseException) and not isinstance(answer, ResolveError):
            raise answer
        if not isinstance(answer, ResolveError):
            resolved.append(_stable(answer.addresses))
            failing.append(False)
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
    pool = UpstreamPool(upstream, log, resolved)
    if upstream.resolve and any(_is_name(s.address) for s in upstream.servers):
        task = asyncio.get_running_loop().create_task(
            refresh(pool, resolver, resolved, failing, log))
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


async def refresh(pool: UpstreamPool, resolver: Resolver, resolved: list, failing: list,
                  log=None, rounds: int | None = None) -> None:
    """Every `resolve` interval, resolve the names again (forever, or `rounds` times)."""
    upstream = pool.upstream
    done = 0
    while rounds is None or done < rounds:
        await asyncio.sleep(upstream.resolve)
        done += 1
        try:
            await refresh_once(pool, resolver, resolved, failing, log)
        except Exception:  # noqa: BLE001 - a bug here must not stop later rounds
            if log is not None:
                log.exception('upstream %s: re-resolving failed', upstream.name)


async def refresh_once(pool: UpstreamPool, resolver: Resolver, resolved: list, failing: list,
                       log=None) -> bool:
    """Resolve every name once; a name that fails keeps its last good addresses.
    True when the pool's servers changed."""
    upstream = pool.upstream
    for i, server in enumerate(upstream.servers):
        if not _is_name(server.address):
            continue
        host = server.address.host
        try:
            addresses = (await resolver.resolve(host, server.address.port)).addresses
        except ResolveError as exc:
            if not failing[i] and log is not None:
                log.warning('upstream %s: cannot resolve %s: %s; keeping its last addresses',
                            upstream.name, host, exc)
            failing[i] = True
            continue
        if failing[i] and log is not None:
            log.info('upstream %s: %s resolves again', upstream.name, host)
        failing[i] = False
        resolved[i] = _stable(addresses)
    changed = pool.replace_targets(resolved)
    if changed and log is not None:
        log.info('upstream %s: servers now %s', upstream.name,
                 ', '.join(format_sockaddr(t.sockaddr) for t in pool.targets) or 'none')
    return changed


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
