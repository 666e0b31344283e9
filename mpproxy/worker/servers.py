"""A worker's side of run-time server control (master/servers.py) and slow start.

`ServerWatch` reads the generation's server-state block (shared/servers.py) every
POLL seconds: when its version moved, each pool gets the new states and weights
(`UpstreamPool.control`); every poll, pools with slow_start raise the weights of
servers coming back (`UpstreamPool.tick`); a server in maint whose grace is over has
its open TCP connections closed (buffered bytes flushed, then FIN) and its UDP
sessions ended, once.
"""

from __future__ import annotations

import time

from mpproxy.shared.servers import MAINT, StateBlock

POLL = 0.5                # seconds: a command is in effect within this (and a loop turn)


class ServerWatch:
    def __init__(self, loop, config, block, pools: dict, services: list, log):
        self.loop = loop
        self.states = StateBlock(config, block)
        self.config = config
        self.pools = pools
        self.services = services
        self.log = log
        self.version = -1
        self.ended: set[tuple[str, str, float]] = set()   # maint graces acted on
        self.timer = None

    def start(self) -> None:
        self._poll()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _poll(self) -> None:
        try:
            self.poll(time.monotonic())
        except Exception:             # noqa: BLE001 - never let this stop the worker
            self.log.exception('applying the run-time server states failed')
        self.timer = self.loop.call_later(POLL, self._poll)

    def poll(self, now: float) -> None:
        version = self.states.version()
        changed, self.version = version != self.version, version
        for name, pool in self.pools.items():
            upstream = self.config.upstreams.get(name)
            if upstream is None or name not in self.states.offsets:
                continue
            records = [self.states.read(name, i) for i in range(len(upstream.servers))]
            if changed:
                pool.control(records)
            pool.tick(now)
            for (state, _, _, until), server in zip(records, upstream.servers):
                key = (name, str(server.address), until)
                if state == MAINT and until <= now and key not in self.ended:
                    self.ended.add(key)
                    self._end(name, str(server.address))

    def _end(self, upstream: str, label: str) -> None:
        ended = sum(service.end_server(upstream, label) for service in self.services)
        if ended:
            self.log.info('upstream %s: server %s is in maintenance: ended %d connection(s) '
                          'and session(s)', upstream, label, ended)
