"""Active health checks, run once per host and shared with every worker.

The master allocates, per generation, one shared memory block (an anonymous
MAP_SHARED mmap, inherited by every worker it forks) with one byte per server
of every upstream that has a `health_check`: 0 = up, 1 = down, and after those
one more byte per server that counts its DOWN -> UP transitions (mod 256), so that
a worker polling now and then sees a comeback it missed (slow_start). Worker 0 of
the generation runs the checks in its event loop and writes the bytes; every
worker's pool skips the servers marked down. A server's states::

    UP --`fall` failed checks in a row--> DOWN --`rise` passed checks in a row--> UP

A check: TCP connect (then, with `send`/`expect`, send the bytes and read until
`expect` appears), or a UDP datagram (`send`, default empty) answered by a
reply (containing `expect`, if set), each within `timeout`. A server whose name
resolves to several addresses passes when any of them passes.
"""

from __future__ import annotations

import asyncio
import mmap
import socket

from mpproxy.config.schema import Config, HealthCheck, Upstream

UP, DOWN = 0, 1


def layout(config: Config) -> tuple[dict[str, int], int]:
    """The byte offset of each checked upstream's first server, and the block's size."""
    offsets, size = {}, 0
    for name, upstream in config.upstreams.items():
        if upstream.health_check is not None:
            offsets[name] = size
            size += len(upstream.servers)
    return offsets, size


def allocate(config: Config) -> mmap.mmap | None:
    """The shared block for a generation (before its workers are forked), or None."""
    _, size = layout(config)
    return mmap.mmap(-1, 2 * size) if size else None


def comeback_index(block: mmap.mmap, slot: int) -> int:
    """Where in `block` the count of the server at `slot` going from DOWN to UP (mod 256)
    is kept: the block's second half."""
    return len(block) // 2 + slot


class Checker:
    """Worker 0's task: check every server of every checked upstream, forever."""

    def __init__(self, loop, config: Config, block: mmap.mmap, pools: dict, log):
        self.loop = loop
        self.block = block
        self.pools = pools
        self.log = log
        self.offsets, _ = layout(config)
        self.upstreams = {name: config.upstreams[name] for name in self.offsets}
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        for name, upstream in self.upstreams.items():
            for i, server in enumerate(upstream.servers):
                self.tasks.append(self.loop.create_task(self._watch(name, upstream, i)))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()

    async def _watch(self, name: str, upstream: Upstream, i: int) -> None:
        hc = upstream.health_check
        label = str(upstream.servers[i].address)
        slot = self.offsets[name] + i
        passed = failed = 0
        while True:
            ok, why = await self._check_server(name, label, hc)
            if ok:
                passed, failed = passed + 1, 0
                if self.block[slot] == DOWN and passed >= hc.rise:
                    self.block[slot] = UP
                    back = comeback_index(self.block, slot)
                    self.block[back] = (self.block[back] + 1) & 0xFF
                    self.log.warning('health check: upstream %s: server %s is up '
                                     '(%d check(s) passed)', name, label, passed)
            else:
                passed, failed = 0, failed + 1
                if self.block[slot] == UP and failed >= hc.fall:
                    self.block[slot] = DOWN
                    self.log.warning('health check: upstream %s: server %s is down '
                                     '(%d check(s) failed: %s)', name, label, failed, why)
            await asyncio.sleep(hc.interval)

    async def _check_server(self, name: str, label: str, hc: HealthCheck) -> tuple[bool, str]:
        pool = self.pools.get(name)
        targets = [t for t in pool.targets if t.label == label] if pool else []
        if not targets:
            return False, 'no address'
        why = ''
        for target in targets:
            try:
                await asyncio.wait_for(self._probe(target, hc), hc.timeout)
                return True, ''
            except asyncio.TimeoutError:
                why = 'timed out'
            except (OSError, ValueError) as exc:
                why = getattr(exc, 'strerror', None) or str(exc)
        return False, why

    async def _probe(self, target, hc: HealthCheck) -> None:
        send = hc.send.encode() if hc.send is not None else None
        expect = hc.expect.encode() if hc.expect is not None else None
        if hc.type == 'udp':
            await self._probe_udp(target, send or b'', expect)
            return
        reader, writer = await asyncio.open_connection(target.sockaddr[0], target.sockaddr[1])
        try:
            if send:
                writer.write(send)
            if expect is not None:
                seen = b''
                while expect not in seen:
                    data = await reader.read(4096)
                    if not data:
                        raise ValueError(f'closed before {hc.expect!r}')
                    seen = (seen + data)[-65536:]
        finally:
            writer.close()

    async def _probe_udp(self, target, send: bytes, expect: bytes | None) -> None:
        sock = socket.socket(target.family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(target.sockaddr)
            sock.send(send)
            while True:
                data = await self.loop.sock_recv(sock, 65536)
                if expect is None or expect in data:
                    return
        finally:
            sock.close()
