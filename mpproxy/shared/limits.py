"""Connection limits that hold across every worker, like HAProxy's global `maxconn`.

`max_connections` and `max_connections_per_ip` of a TCP listener and
`udp.max_sessions_per_ip` of a UDP listener count the connections (sessions)
of all workers of all live generations together. The master allocates one
anonymous MAP_SHARED block the first time a loaded config sets one of them; it
lives as long as the master (through every reload) and every worker forked
after that inherits it. The block is u32 words::

    header page   word 0 = END: where the areas in use end; readers sum areas [0, END)
    area 0        totals[indexes] | sketch row 0 [width] | row 1 | row 2 | row 3
    area 1        ...                             (every area starts on a page)
    area nslots-1

An area belongs to one worker process at a time (slots go lowest first, so the
areas in use stay at the front and END stays short)::

    FREE --take_slot(), before the fork--> TAKEN --worker reaped: free_slot() zeroes it--> FREE

A worker writes only its own area, so no cross-process atomics are needed; a
check sums one word over every area in use (a strided memoryview slice,
summed in C). Whatever a worker had counted when it exited (drained, crashed,
killed -9) is zeroed by the master when it reaps it, so counts never leak.

Limit indices. Each listener key (proto, host, port) with a limit gets an
index into `totals`, the same one for as long as a live generation limits that
key: a draining generation's connections count against the new generation's
limits. An index no live generation uses is freed and reused (its counts are
all zero then: every worker that wrote it has been reaped). `indexes` (1024)
keys may be held at once; a config that would need more is refused
(`LimitsFull`; a reload then keeps the running generation).

Per client IP: a count-min sketch per area, 4 rows of `width` (16384) u32
counters, row r's column taken from bits [14r, 14r+14) of
`hash(index bytes + ip bytes)` -- SipHash with the seed every process forked
from one master shares. The count of an IP is the minimum over rows of the
counter summed over areas: never below the true count; above it only when, in
every row, some other (listener, IP) pair with open connections shares the
counter. With D such pairs a row is shared with probability 1-exp(-D/width),
all four rows with its 4th power: D = 1,000: 1.2e-5; D = 4,000: 9e-4;
D = 10,000: 0.044. Even then the excess is the smallest colliding count, so a
client is wrongly refused only if it already has about `max - excess` open.

Races. A check and its increment run with no await between them, so they are
atomic within a worker. Across workers they are not: two workers that check at
the same time may both see `max - 1` and both accept. With at most one
check-to-increment window open per worker (microseconds), a listener or a
client exceeds its limit by at most one per other worker in that window:
at most max + (workers - 1). A reader whose sum runs while another worker
increments may see it or not; the bound holds for consistent reads, and is
what the tests check.

Data path (after the fork)::

    area = spec.limits.area(spec.limit_slot)      # spec.limits is None: no limits at all
    gate = area.gate_for(listener, spec.limit_index)  # None: this listener has none
    key = ip_key(peer_host)
    why = gate.try_acquire(key)   # None, or the name of the limit that refused it
    ...
    gate.release(key)             # exactly once per successful try_acquire / add

A worker without a slot (more live workers than slots) gets a private area:
its checks see everybody's counts plus its own, but other workers do not see
its connections. The master logs this when it happens.
"""

from __future__ import annotations

import heapq
import mmap
import os
import socket
import sys

from mpproxy.config.schema import Config, Listener

Key = tuple[str, str, int]

INDEXES = 1024            # limited listener keys held at once (all live generations)
ROWS = 4                  # sketch rows (fixed: the hot path is written out for four)
WIDTH = 16384             # counters per row, a power of two
TOTAL, PER_IP = 'max_connections', 'max_connections_per_ip'
UDP_PER_IP = 'max_sessions_per_ip'

_PAGE_WORDS = mmap.PAGESIZE // 4
_MAPPED_V4 = bytes(10) + b'\xff\xff'


class LimitsFull(Exception):
    """More limited listener keys would be in use at once than the table has indices."""


def ip_key(host: str) -> bytes:
    """A client IP as the bytes limits count it by: 4 bytes for IPv4 and for IPv4-mapped
    IPv6 (::ffff:a.b.c.d), 16 for other IPv6 (a %scope is ignored). ValueError if not an IP."""
    try:
        if ':' not in host:
            return socket.inet_pton(socket.AF_INET, host)
        packed = socket.inet_pton(socket.AF_INET6, host.split('%', 1)[0])
    except OSError:
        raise ValueError(f'not an IP address: {host!r}') from None
    return packed[12:] if packed[:12] == _MAPPED_V4 else packed


def limits_of(listener: Listener) -> tuple[int, int]:
    """(max total, max per IP) of a listener; 0 = unlimited."""
    if listener.protocol == 'udp':
        return 0, listener.udp.max_sessions_per_ip
    return listener.max_connections, listener.max_connections_per_ip


def wanted(config: Config) -> bool:
    """Does any listener of `config` have a shared limit?"""
    return any(any(limits_of(listener)) for listener in config.listeners)


def slots_for(config: Config) -> int:
    """Enough slots for every worker of an active, a starting and the draining generations,
    also after a reload raises `workers` up to the number of CPUs. An untouched area costs
    address space only."""
    return max(config.workers, os.cpu_count() or 1) * (config.max_draining_generations + 2)


def _limited_keys(config: Config) -> list[Key]:
    return list(dict.fromkeys(l.key for l in config.listeners if any(limits_of(l))))


class LimitTable:
    """The shared block and, in the master only, who holds which slot and index.

    Limit index states (per listener key)::

        free --assign(): a config limits the key--> held --assign(): no live config does--> free
    """

    def __init__(self, block: mmap.mmap, nslots: int, indexes: int, width: int):
        self.block = block
        self.view = memoryview(block).cast('I')
        self.nslots = nslots
        self.indexes = indexes
        self.width = width
        self.bits = width.bit_length() - 1
        self.header = _PAGE_WORDS                 # words before area 0
        self.step = _area_words(indexes, width)   # words from one area to the next
        self.view[0] = self.header                # END: no area in use
        # The master's bookkeeping (a forked worker has a copy it never uses).
        self.index: dict[Key, int] = {}
        self._free_slots = list(range(nslots))    # a heap: lowest first
        self._taken: set[int] = set()
        self._free_indexes = list(range(indexes))

    @classmethod
    def allocate(cls, nslots: int, *, indexes: int = INDEXES, width: int = WIDTH) -> LimitTable:
        """The master's table, before any worker is forked."""
        if nslots < 1 or not 1 <= indexes <= 65536:
            raise ValueError('need nslots >= 1 and 1 <= indexes <= 65536')
        if width < 2 or width & (width - 1) or ROWS * (width.bit_length() - 1) > sys.hash_info.width:
            raise ValueError(f'width must be a power of two of at most '
                             f'{sys.hash_info.width // ROWS} bits')
        size = (_PAGE_WORDS + nslots * _area_words(indexes, width)) * 4
        return cls(mmap.mmap(-1, size), nslots, indexes, width)

    # -- master -----------------------------------------------------------------------------
    def take_slot(self) -> int | None:
        """A free slot for a worker about to be forked (its area is all zeros), or None."""
        if not self._free_slots:
            return None
        slot = heapq.heappop(self._free_slots)
        self._taken.add(slot)
        self._set_end()
        return slot

    def free_slot(self, slot: int) -> None:
        """The worker of `slot` has exited (reaped): zero its area, make it free. Idempotent."""
        if slot not in self._taken:
            return
        start, length = (self.header + slot * self.step) * 4, self.step * 4
        try:     # gives the pages back, and every process then reads zeros
            self.block.madvise(mmap.MADV_REMOVE, start, length)
        except (AttributeError, OSError):
            self.block[start:start + length] = bytes(length)
        self._taken.discard(slot)
        heapq.heappush(self._free_slots, slot)
        self._set_end()

    def _set_end(self) -> None:
        used = max(self._taken) + 1 if self._taken else 0
        self.view[0] = self.header + used * self.step

    def assign(self, config: Config, live=()) -> dict[Key, int]:
        """The limit index of each limited listener key of `config` (kept, or newly given).

        `live`: the configs of every generation that still has workers; indices of keys that
        neither `config` nor these limit are freed. All or nothing: raises LimitsFull and
        changes nothing when the new keys do not fit.
        """
        want = _limited_keys(config)
        keep = set(want).union(*(_limited_keys(c) for c in live))
        stale = [key for key in self.index if key not in keep]
        new = [key for key in want if key not in self.index]
        if len(new) > len(self._free_indexes) + len(stale):
            raise LimitsFull(f'more than {self.indexes} listeners with max_connections, '
                             f'max_connections_per_ip or udp.max_sessions_per_ip in use '
                             f'(including draining generations)')
        for key in stale:
            heapq.heappush(self._free_indexes, self.index.pop(key))
        for key in new:
            self.index[key] = heapq.heappop(self._free_indexes)
        return {key: self.index[key] for key in want}

    # -- reading (master, tests, metrics) ---------------------------------------------------
    def total(self, index: int) -> int:
        """Open connections of limit index `index`, all areas in use together."""
        v = self.view
        return sum(v[self.header + index:v[0]:self.step])

    def per_ip(self, index: int, ip: bytes) -> int:
        """The sketch's count for `ip` on `index` (never below the true count)."""
        v, end = self.view, self.view[0]
        return min(sum(v[self.header + word:end:self.step]) for word in self.columns(index, ip))

    def columns(self, index: int, ip: bytes) -> tuple[int, int, int, int]:
        """The four sketch words (offsets inside an area) counting `ip` on `index`."""
        h, m, b, r = hash(index.to_bytes(2, 'little') + ip), self.width - 1, self.bits, self.indexes
        w = self.width
        return (r + (h & m), r + w + (h >> b & m), r + 2 * w + (h >> 2 * b & m),
                r + 3 * w + (h >> 3 * b & m))

    # -- worker -----------------------------------------------------------------------------
    def area(self, slot: int | None) -> Area:
        """A worker's handle: its own area `slot`, or a private one when it got no slot."""
        if slot is not None and not 0 <= slot < self.nslots:
            raise ValueError(f'slot {slot} out of range 0-{self.nslots - 1}')
        return Area(self, slot)


def _area_words(indexes: int, width: int) -> int:
    words = indexes + ROWS * width
    return -(-words // _PAGE_WORDS) * _PAGE_WORDS


class Area:
    """One worker's part of the table: where it writes; it reads everyone's."""

    __slots__ = ('table', 'slot', 'own', 'own_base')

    def __init__(self, table: LimitTable, slot: int | None):
        self.table = table
        self.slot = slot
        if slot is None:          # private and lazily materialised: no RSS until written
            private = mmap.mmap(-1, table.step * 4, flags=mmap.MAP_PRIVATE)
            self.own, self.own_base = memoryview(private).cast('I'), 0
        else:
            self.own, self.own_base = table.view, table.header + slot * table.step

    def gate(self, index: int, max_total: int, max_per_ip: int,
             why_total: str = TOTAL, why_per_ip: str = PER_IP) -> Gate:
        """The limits of one listener (limit index `index`); 0 = that limit is off."""
        if not 0 <= index < self.table.indexes:
            raise ValueError(f'limit index {index} out of range')
        cls = Gate if self.slot is not None else _PrivateGate
        return cls(self, index, max_total, max_per_ip, why_total, why_per_ip)

    def gate_for(self, listener: Listener, limit_index: dict[Key, int]) -> Gate | None:
        """The gate of `listener`, or None when it has no shared limit (nothing to count)."""
        index = limit_index.get(listener.key)
        max_total, max_per_ip = limits_of(listener)
        if index is None or not (max_total or max_per_ip):
            return None
        why = UDP_PER_IP if listener.protocol == 'udp' else PER_IP
        return self.gate(index, max_total, max_per_ip, TOTAL, why)


class Gate:
    """One listener's limits in one worker: what the data path calls, per connection.

    The total is always counted (one word); the per-IP sketch only when `max_per_ip` is set,
    so a gate must release what it acquired (a reload that turns the per-IP limit on does not
    see the connections of draining generations that ran without it).
    """

    __slots__ = ('view', 'own', 'own_base', 'header', 'step', 'index', 'max_total',
                 'max_per_ip', 'why_total', 'why_per_ip', 'prefix', 'mask', 'bits', 'rows')

    def __init__(self, area: Area, index: int, max_total: int, max_per_ip: int,
                 why_total: str, why_per_ip: str):
        table = area.table
        self.view = table.view
        self.own, self.own_base = area.own, area.own_base
        self.header, self.step = table.header, table.step
        self.index = index
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.why_total, self.why_per_ip = why_total, why_per_ip
        self.prefix = index.to_bytes(2, 'little')
        self.mask, self.bits = table.width - 1, table.bits
        self.rows = tuple(table.indexes + r * table.width for r in range(ROWS))

    def columns(self, ip: bytes) -> tuple[int, int, int, int]:
        h, m, b = hash(self.prefix + ip), self.mask, self.bits
        r0, r1, r2, r3 = self.rows
        return r0 + (h & m), r1 + (h >> b & m), r2 + (h >> 2 * b & m), r3 + (h >> 3 * b & m)

    def count(self, word: int) -> int:
        """One word (an offset inside an area) summed over every area in use."""
        v = self.view
        return sum(v[self.header + word:v[0]:self.step])

    def check(self, ip: bytes) -> str | None:
        """Would a connection from `ip` be refused now? The limit's name, or None."""
        if self.max_total and self.count(self.index) >= self.max_total:
            return self.why_total
        limit = self.max_per_ip
        if limit and all(self.count(word) >= limit for word in self.columns(ip)):
            return self.why_per_ip
        return None

    def add(self, ip: bytes) -> None:
        """Count a connection without checking (a UDP session adopted from the previous worker)."""
        own, base = self.own, self.own_base
        own[base + self.index] += 1
        if self.max_per_ip:
            for word in self.columns(ip):
                own[base + word] += 1

    def try_acquire(self, ip: bytes) -> str | None:
        """check() then add() (written out: this is the hot path). None = counted, go on."""
        v = self.view
        end, step, header = v[0], self.step, self.header
        if self.max_total and sum(v[header + self.index:end:step]) >= self.max_total:
            return self.why_total
        own, base = self.own, self.own_base
        limit = self.max_per_ip
        if limit:
            h, m, b = hash(self.prefix + ip), self.mask, self.bits
            r0, r1, r2, r3 = self.rows
            w0, w1, w2, w3 = r0 + (h & m), r1 + (h >> b & m), r2 + (h >> 2 * b & m), \
                r3 + (h >> 3 * b & m)
            if (sum(v[header + w0:end:step]) >= limit and sum(v[header + w1:end:step]) >= limit
                    and sum(v[header + w2:end:step]) >= limit
                    and sum(v[header + w3:end:step]) >= limit):
                return self.why_per_ip
            own[base + w0] += 1
            own[base + w1] += 1
            own[base + w2] += 1
            own[base + w3] += 1
        own[base + self.index] += 1
        return None

    def release(self, ip: bytes) -> None:
        """A connection counted by try_acquire() or add() ended."""
        own, base = self.own, self.own_base
        own[base + self.index] -= 1
        if self.max_per_ip:
            h, m, b = hash(self.prefix + ip), self.mask, self.bits
            r0, r1, r2, r3 = self.rows
            own[base + r0 + (h & m)] -= 1
            own[base + r1 + (h >> b & m)] -= 1
            own[base + r2 + (h >> 2 * b & m)] -= 1
            own[base + r3 + (h >> 3 * b & m)] -= 1


class _PrivateGate(Gate):
    """A gate of a worker without a slot: its own counts live in private memory, so they
    are added to every sum here and are invisible to the other workers."""

    __slots__ = ()

    def count(self, word: int) -> int:
        return Gate.count(self, word) + self.own[word]

    def try_acquire(self, ip: bytes) -> str | None:
        why = self.check(ip)
        if why is None:
            self.add(ip)
        return why
