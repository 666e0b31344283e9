"""Metrics shared with the master: what each worker counts, published once a second.

Counting costs the data path nothing new: the services and pools keep plain Python
ints (TcpService.accepted, UdpStats, UpstreamPool.connect_errors, ...), and each service
says what they mean through one method, `counters()`, a dict keyed by the names of
TCP_SERIES / UDP_SERIES; the publisher finds a service by its listener's key (protocol,
host, port), never by position. Once a second,
on its heartbeat, and once more when it exits, a worker's `Publisher` copies them into
the worker's `Area`: an anonymous MAP_SHARED block the master allocated just before
forking it (one block per worker process, unmapped by the master after it has read
it one last time at reap). Nothing else is shared, so no cross-process atomics.

What each value of a snapshot is follows from the config alone: master and worker
build the same `Layout` from the generation's config, and the master writes the
layout's fingerprint into the area, which the worker checks before publishing.
A snapshot is an array of int64::

    value 0             the publish time (CLOCK_MONOTONIC, ns)
    per listener        TCP_SERIES or UDP_SERIES values, in config order
    per used upstream   its servers' connect errors [n] | connect-time buckets [n x B] |
                        connect time sum in ns [n] | open connections [n] | up [n]

An area, in int64 words: a header, then two buffers of one snapshot each::

    0 MAGIC  1 fingerprint  2 values per snapshot  3 CURRENT (0: none yet, 1 or 2: buffer)
    4 SEQ buffer 0  5 SEQ buffer 1  6 CRC buffer 0  7 CRC buffer 1  | buffer 0 | buffer 1

The writer fills the buffer that is not CURRENT under a seqlock (its SEQ is odd while
it writes), stores the snapshot's CRC-32, makes SEQ even, then flips CURRENT. A reader
copies the CURRENT buffer and keeps the copy only if SEQ was even and unchanged
around the copy, CURRENT still names that buffer after it (else the copy may be of a
snapshot newer than the one CURRENT names, and the next read would go backwards), and
the CRC matches (which also holds on CPUs that reorder stores);
otherwise it retries, and after READ_TRIES falls back to the last snapshot it read.
The CURRENT buffer is never being written, so a worker killed in the middle of a
publish (SIGKILL) leaves its previous snapshot readable: the master loses at most
the last second of its counts, never a torn or partial snapshot.
"""

from __future__ import annotations

import mmap
import struct
import time
import zlib
from array import array
from dataclasses import dataclass

from mpproxy.config.schema import Config
from mpproxy.upstream.pool import CONNECT_BUCKETS

COUNTER, GAUGE, HISTOGRAM = 'counter', 'gauge', 'histogram'
BUCKETS = len(CONNECT_BUCKETS) + 1        # values per histogram: the finite buckets, then +Inf
READ_TRIES = 4

MAGIC = int.from_bytes(b'mpxmetr1', 'little')
HEADER = 8                                # words
_FINGERPRINT, _SIZE, _CURRENT, _SEQ, _CRC = 1, 2, 3, 4, 6


@dataclass(frozen=True)
class Family:
    """One metric family of /metrics: its name, type, labels (`worker` last) and meaning."""
    name: str
    type: str
    labels: tuple[str, ...]
    help: str
    state: bool = False       # a gauge of a state: workers of one slot are not summed, the
                              # newest generation's value is shown

    @property
    def kind(self) -> str:
        return 'state' if self.state else self.type


L, U = ('listener', 'worker'), ('upstream', 'server', 'worker')
FAMILIES = (
    # the master's own (master/status.py)
    Family('mpproxy_info', GAUGE, ('version',), 'Always 1; the running version in a label.'),
    Family('mpproxy_start_time_seconds', GAUGE, (), 'When the master started, Unix time.'),
    Family('mpproxy_config_load_time_seconds', GAUGE, (),
           'When the configuration of the active generation was loaded, Unix time.'),
    Family('mpproxy_generation', GAUGE, (), 'Number of the active generation (1 at start, +1 per '
           'successful reload).'),
    Family('mpproxy_workers', GAUGE, ('state',), 'Worker processes alive, by the state of their '
           'generation (starting, active, draining).'),
    # TCP listeners
    Family('mpproxy_tcp_connections_accepted_total', COUNTER, L,
           'Client connections accepted (refused ones included).'),
    Family('mpproxy_tcp_connections_refused_total', COUNTER, ('listener', 'reason', 'worker'),
           'Client connections closed before any upstream was tried: reason is denied '
           '(allow/deny, or not in proxy_protocol.trusted), limit (max_connections_per_ip) '
           'or proxy_header (missing, bad or late PROXY protocol header).'),
    Family('mpproxy_tcp_connections_failed_total', COUNTER, L,
           'Client connections closed because no upstream server could be connected.'),
    Family('mpproxy_tcp_received_bytes_total', COUNTER, L,
           'Bytes read from clients (counted when a connection ends, and for open ones at '
           'each publish).'),
    Family('mpproxy_tcp_sent_bytes_total', COUNTER, L,
           'Bytes read from upstream servers for the clients.'),
    Family('mpproxy_tcp_connections_active', GAUGE, L,
           'Client connections open now (connecting to an upstream included).'),
    # UDP listeners
    Family('mpproxy_udp_datagrams_received_total', COUNTER, L,
           'Datagrams read from clients (dropped and refused ones included).'),
    Family('mpproxy_udp_datagrams_sent_total', COUNTER, L, 'Replies sent to clients.'),
    Family('mpproxy_udp_datagrams_dropped_total', COUNTER, L,
           'Datagrams lost either way: no session could be opened (table full, '
           'max_sessions_per_ip, no server), too big for the PROXY header, send errors.'),
    Family('mpproxy_udp_datagrams_refused_total', COUNTER, ('listener', 'reason', 'worker'),
           'Datagrams dropped before any session: reason is denied (allow/deny), untrusted '
           '(not in proxy_protocol.trusted) or proxy_header (no valid v2 header).'),
    Family('mpproxy_udp_received_bytes_total', COUNTER, L, 'Bytes of the datagrams read from '
           'clients.'),
    Family('mpproxy_udp_sent_bytes_total', COUNTER, L, 'Bytes of the replies sent to clients.'),
    Family('mpproxy_udp_sessions_created_total', COUNTER, L, 'Sessions opened.'),
    Family('mpproxy_udp_sessions_adopted_total', COUNTER, L,
           'Sessions taken over from the previous worker of the slot on reload.'),
    Family('mpproxy_udp_sessions_ended_total', COUNTER, ('listener', 'reason', 'worker'),
           'Sessions ended: reason is expired (idle_timeout), completed (udp.responses), '
           'failed (upstream unreachable), evicted (room for a new client in a full table), '
           'closed (worker stopped) or handed_over (to the new worker on reload).'),
    Family('mpproxy_udp_sessions_refused_total', COUNTER, ('listener', 'reason', 'worker'),
           'New clients dropped: reason is table_full (every session talking) or per_ip '
           '(udp.max_sessions_per_ip).'),
    Family('mpproxy_udp_quic_unrouted_total', COUNTER, L,
           'sni_routes: new flows not routed by their QUIC server name (not QUIC, '
           'undecryptable, past a bound or the hold deadline: to default or dropped; or no '
           'route and no default: dropped).'),
    Family('mpproxy_udp_quic_moved_total', COUNTER, L,
           'sni_routes: QUIC sessions that followed their client to a new address (NAT '
           'rebinding: its packets kept one of the connection IDs of the session).'),
    Family('mpproxy_udp_sessions_active', GAUGE, L, 'Sessions open now.'),
    # upstream servers
    Family('mpproxy_upstream_connect_errors_total', COUNTER, U,
           'Failed or timed-out TCP connects, and ICMP unreachable errors on UDP sessions: '
           'what passive health (max_fails) counts.'),
    Family('mpproxy_upstream_connect_duration_seconds', HISTOGRAM, U,
           'Time to connect to the server, successful TCP connects only.'),
    Family('mpproxy_upstream_server_active', GAUGE, U,
           'TCP connections (connecting included) and UDP sessions open to the server now.'),
    Family('mpproxy_upstream_server_up', GAUGE, U,
           '1 when the worker may pick the server now, 0 when passive health (max_fails) or '
           'the health check took it out.', state=True),
    Family('mpproxy_upstream_server_check_up', GAUGE, ('upstream', 'server'),
           'Active health check result of the active generation: 1 up, 0 down (upstreams '
           'with health_check only).'),
    Family('mpproxy_upstream_server_admin_state', GAUGE, ('upstream', 'server', 'state'),
           'Run-time state set by `mpproxy server` (ready, drain, maint): 1 for the current one.'),
    Family('mpproxy_upstream_server_weight', GAUGE, ('upstream', 'server'),
           'Weight of the server now: the config\'s, or what `mpproxy server weight` set.'),
)
BY_NAME = {family.name: family for family in FAMILIES}

# A listener's series: (the key of its service's `counters()`, family, extra labels), in the
# order the publisher writes them. TcpService.counters() and UdpService.counters() return a
# dict with exactly these keys (tests/unit/test_metrics.py checks the real services).
TCP_SERIES = (
    ('accepted', 'mpproxy_tcp_connections_accepted_total', ()),
    ('denied', 'mpproxy_tcp_connections_refused_total', (('reason', 'denied'),)),
    ('limited', 'mpproxy_tcp_connections_refused_total', (('reason', 'limit'),)),
    ('bad_headers', 'mpproxy_tcp_connections_refused_total', (('reason', 'proxy_header'),)),
    ('failed', 'mpproxy_tcp_connections_failed_total', ()),
    ('received_bytes', 'mpproxy_tcp_received_bytes_total', ()),
    ('sent_bytes', 'mpproxy_tcp_sent_bytes_total', ()),
    ('active', 'mpproxy_tcp_connections_active', ()),
)
UDP_SERIES = (
    ('datagrams_received', 'mpproxy_udp_datagrams_received_total', ()),
    ('datagrams_sent', 'mpproxy_udp_datagrams_sent_total', ()),
    ('datagrams_dropped', 'mpproxy_udp_datagrams_dropped_total', ()),
    ('refused_denied', 'mpproxy_udp_datagrams_refused_total', (('reason', 'denied'),)),
    ('refused_untrusted', 'mpproxy_udp_datagrams_refused_total', (('reason', 'untrusted'),)),
    ('refused_proxy_header', 'mpproxy_udp_datagrams_refused_total',
     (('reason', 'proxy_header'),)),
    ('received_bytes', 'mpproxy_udp_received_bytes_total', ()),
    ('sent_bytes', 'mpproxy_udp_sent_bytes_total', ()),
    ('sessions_created', 'mpproxy_udp_sessions_created_total', ()),
    ('sessions_adopted', 'mpproxy_udp_sessions_adopted_total', ()),
    ('ended_expired', 'mpproxy_udp_sessions_ended_total', (('reason', 'expired'),)),
    ('ended_completed', 'mpproxy_udp_sessions_ended_total', (('reason', 'completed'),)),
    ('ended_failed', 'mpproxy_udp_sessions_ended_total', (('reason', 'failed'),)),
    ('ended_evicted', 'mpproxy_udp_sessions_ended_total', (('reason', 'evicted'),)),
    ('ended_closed', 'mpproxy_udp_sessions_ended_total', (('reason', 'closed'),)),
    ('ended_handed_over', 'mpproxy_udp_sessions_ended_total', (('reason', 'handed_over'),)),
    ('refused_table_full', 'mpproxy_udp_sessions_refused_total', (('reason', 'table_full'),)),
    ('refused_per_ip', 'mpproxy_udp_sessions_refused_total', (('reason', 'per_ip'),)),
    ('quic_unrouted', 'mpproxy_udp_quic_unrouted_total', ()),
    ('quic_moved', 'mpproxy_udp_quic_moved_total', ()),
    ('active', 'mpproxy_udp_sessions_active', ()),
)
TCP_KEYS = tuple(key for key, _, _ in TCP_SERIES)
UDP_KEYS = tuple(key for key, _, _ in UDP_SERIES)


def used_upstreams(config: Config) -> list[str]:
    """The upstreams a worker makes pools for (its listeners' and their SNI routes'), in the
    order discovery.open_pools makes them."""
    names: list[str] = []
    for listener in config.listeners:
        for name in (listener.upstream, *(n for _, n in listener.sni_routes or ())):
            if name not in names:
                names.append(name)
    return names


class Layout:
    """Which value of a snapshot is which series, for one config.

    `entries`: (family, labels without `worker`, kind, offset, sum offset) per series; a
    histogram's BUCKETS values start at `offset`, its sum (ns) is at `sum offset`.
    """

    def __init__(self, config: Config):
        entries = []
        offset = 1                            # value 0: the publish time
        # (listener key: protocol, host, port; its counters' keys). Not the name: a tcp and a
        # udp listener on one address share their default name.
        self.listeners: list[tuple[tuple, tuple[str, ...]]] = []
        for listener in config.listeners:
            base = (('listener', listener.name),)
            series = TCP_SERIES if listener.protocol == 'tcp' else UDP_SERIES
            for _, name, extra in series:
                entries.append((name, base + extra, BY_NAME[name].kind, offset, 0))
                offset += 1
            self.listeners.append((listener.key, TCP_KEYS if series is TCP_SERIES else UDP_KEYS))
        self.upstreams: list[tuple[str, int]] = []     # (name, number of servers)
        for name in used_upstreams(config):
            servers = config.upstreams[name].servers
            n = len(servers)
            errors = offset
            hist = errors + n
            sums = hist + n * BUCKETS
            active = sums + n
            up = active + n
            offset = up + n
            for i, server in enumerate(servers):
                labels = (('upstream', name), ('server', str(server.address)))
                entries += [
                    ('mpproxy_upstream_connect_errors_total', labels, COUNTER, errors + i, 0),
                    ('mpproxy_upstream_connect_duration_seconds', labels, HISTOGRAM,
                     hist + i * BUCKETS, sums + i),
                    ('mpproxy_upstream_server_active', labels, GAUGE, active + i, 0),
                    ('mpproxy_upstream_server_up', labels, 'state', up + i, 0)]
            self.upstreams.append((name, n))
        self.entries = entries
        self.size = offset
        self.fingerprint = zlib.crc32(repr((offset, entries)).encode())
        self.connections = [e[3] for e in entries if e[0] == 'mpproxy_tcp_connections_active']
        self.sessions = [e[3] for e in entries if e[0] == 'mpproxy_udp_sessions_active']


class Area:
    """One worker's snapshot block (see the module docstring for the format)."""

    def __init__(self, block: mmap.mmap, size: int):
        self.block = block
        self.size = size
        self.words = memoryview(block).cast('q')
        self.buffers = (self.words[HEADER:HEADER + size],
                        self.words[HEADER + size:HEADER + 2 * size])
        self.starts = (HEADER * 8, (HEADER + size) * 8)     # the buffers' byte offsets
        self.packer = struct.Struct(f'={size}q')          # packs a list 3x faster than array()
        self.last: array | None = None    # the reader's last good snapshot

    @classmethod
    def allocate(cls, layout: Layout) -> Area:
        """The master's block for a worker about to be forked (OSError if out of memory)."""
        area = cls(mmap.mmap(-1, (HEADER + 2 * layout.size) * 8), layout.size)
        words = area.words
        words[0], words[_FINGERPRINT], words[_SIZE] = MAGIC, layout.fingerprint, layout.size
        return area

    def matches(self, layout: Layout) -> bool:
        words = self.words
        return (words[0] == MAGIC and words[_FINGERPRINT] == layout.fingerprint
                and words[_SIZE] == layout.size == self.size)

    def write(self, values) -> None:
        """Publish one snapshot (the worker): `values` has exactly `size` ints."""
        words = self.words
        b = 1 if words[_CURRENT] == 1 else 0        # the buffer readers are not told to read
        words[_SEQ + b] += 1                        # odd: being written
        self.packer.pack_into(self.block, self.starts[b], *values)
        words[_CRC + b] = zlib.crc32(self.buffers[b])
        words[_SEQ + b] += 1                        # even: complete
        words[_CURRENT] = b + 1

    def read(self) -> array | None:
        """The newest complete snapshot, or the last one read, or None before the first."""
        words = self.words
        for _ in range(READ_TRIES):
            current = words[_CURRENT]
            if current not in (1, 2):
                break
            b = current - 1
            seq = words[_SEQ + b]
            if seq & 1:
                continue
            data = self.buffers[b].tobytes()
            crc = words[_CRC + b]
            # CURRENT again: a reader that loaded it long ago may meet its buffer rewritten
            # whole, newer than the one CURRENT names now (not yet flipped): keeping that
            # copy, its next read would go backwards
            if words[_SEQ + b] == seq and words[_CURRENT] == current \
                    and zlib.crc32(data) == crc:
                self.last = array('q', data)
                break
        return self.last

    def close(self) -> None:
        for view in (*self.buffers, self.words):
            view.release()
        self.block.close()


class Publisher:
    """A worker's side: collects its counters and writes them into its area."""

    def __init__(self, area: Area, layout: Layout, services: dict, pools: dict):
        """`services`: listener key (`Listener.key`) -> its service (with `counters()`)."""
        if not area.matches(layout) or set(services) != {key for key, _ in layout.listeners}:
            raise ValueError('the metrics area does not match this configuration')
        self.area = area
        self.sources = [(services[key], keys) for key, keys in layout.listeners]
        self.upstreams = [(pools.get(name), n) for name, n in layout.upstreams]
        self.size = layout.size

    def collect(self) -> list[int]:
        values = [time.monotonic_ns()]
        for service, keys in self.sources:
            counters = service.counters()
            values += [counters[key] for key in keys]
        now = time.monotonic()
        for pool, n in self.upstreams:
            values += _pool_values(pool, n, now)
        return values

    def publish(self) -> None:
        values = self.collect()
        if len(values) != self.size:
            raise ValueError(f'{len(values)} metric values for a layout of {self.size}')
        self.area.write(values)


def _pool_values(pool, n: int, now: float) -> list[int]:
    """An UpstreamPool's values: its per-server counters as they are, and its gauges."""
    if pool is None or len(pool.connect_errors) != n:
        return [0] * (n * (BUCKETS + 4))
    active, up = [0] * n, [0] * n
    counts, down_until = pool.active, pool.down_until
    for i, position in enumerate(pool.position):      # every address of a server
        active[position] += counts[i]
        if down_until[i] <= now:
            up[position] = 1                          # up while any address is up
    if pool.health is not None:
        block, offset = pool.health
        for position in range(n):
            if block[offset + position]:
                up[position] = 0
    return pool.connect_errors + pool.connect_hist + pool.connect_ns + active + up
