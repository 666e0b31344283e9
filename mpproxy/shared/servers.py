"""Run-time state of upstream servers (`mpproxy server ...`), shared by the master with workers.

The master decides (master/servers.py) and writes; every worker reads. Per generation the
master allocates one anonymous MAP_SHARED block, inherited by the workers it forks, with
a record per server of every upstream of that generation's config, in config order::

    header   u64 version: bumped after every change (a worker re-reads when it moved)
    record   u8 state | 3 pad | u32 weight | f64 since | f64 until        (24 bytes)

state: READY, DRAIN (no new connections or sessions; open ones go on) or MAINT (as drain,
and the open ones are ended at `until`). weight: 0 = the config's. since: when it last
became READY by command (CLOCK_MONOTONIC, which every process of the host shares), for
slow_start. A record is written whole before the version moves; a reader that sees the
version change reads again on its next poll, so a torn read lasts at most one poll.
"""

from __future__ import annotations

import mmap
import struct

from mpproxy.config.schema import Config

READY, DRAIN, MAINT = 0, 1, 2
STATES = {'ready': READY, 'drain': DRAIN, 'maint': MAINT}
NAMES = {v: k for k, v in STATES.items()}

_HEADER = struct.Struct('<Q')
_RECORD = struct.Struct('<B3xIdd')


def layout(config: Config) -> tuple[dict[str, int], int]:
    """The record number of each upstream's first server, and the block's size in bytes."""
    offsets, n = {}, 0
    for name, upstream in config.upstreams.items():
        offsets[name] = n
        n += len(upstream.servers)
    return offsets, _HEADER.size + n * _RECORD.size


class StateBlock:
    """One generation's block of server records."""

    def __init__(self, config: Config, block: mmap.mmap | None = None):
        self.offsets, size = layout(config)
        self.block = block if block is not None else mmap.mmap(-1, max(size, _HEADER.size))

    def version(self) -> int:
        return _HEADER.unpack_from(self.block, 0)[0]

    def read(self, upstream: str, index: int) -> tuple[int, int, float, float]:
        """(state, weight, since, until) of server `index` of `upstream`."""
        return _RECORD.unpack_from(self.block, self._at(upstream, index))

    def write(self, upstream: str, index: int, state: int, weight: int, since: float,
              until: float) -> None:
        _RECORD.pack_into(self.block, self._at(upstream, index), state, weight, since, until)

    def bump(self) -> None:
        _HEADER.pack_into(self.block, 0, self.version() + 1)

    def _at(self, upstream: str, index: int) -> int:
        return _HEADER.size + (self.offsets[upstream] + index) * _RECORD.size

    def close(self) -> None:
        self.block.close()
