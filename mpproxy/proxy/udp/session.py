"""A UDP session, the session table, the counters of a UDP service, and the per-IP limit seam
with its implementation over the limits shared by all workers (`GateLimit`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from mpproxy.shared import limits

TALKING = 1.0             # seconds; see SessionTable

# why SessionTable.victim() chose a session (or none)
UNANSWERED, IDLE, ALL_TALKING = 'unanswered', 'idle', 'talking'


class UdpStats:
    """Counters of one UdpService. Read them as attributes or with `as_dict()`."""

    __slots__ = ('datagrams_in', 'datagrams_out', 'sessions_created', 'sessions_expired',
                 'sessions_completed', 'sessions_failed', 'sessions_closed',
                 'sessions_active', 'dropped', 'sessions_handed_out', 'sessions_adopted', 'denied',
                 'sessions_evicted_unanswered', 'sessions_evicted_idle', 'sessions_refused',
                 'sessions_refused_per_ip', 'untrusted', 'bad_headers', 'too_big',
                 'bytes_in', 'bytes_out', 'quic_unrouted', 'quic_moved')

    # datagrams_in       datagrams read from clients (including dropped ones)
    # datagrams_out      replies sent to clients
    # sessions_created   sessions opened
    # sessions_expired   ended by idle_timeout
    # sessions_completed ended after udp.responses replies
    # sessions_failed    ended by an upstream error (ECONNREFUSED, unreachable)
    # sessions_closed    ended by close()
    # sessions_handed_out  given to the next worker of this slot on reload (or a QUIC session
    #                    to the worker its moved client now reaches: moves.py)
    # sessions_adopted   taken over from the previous worker of this slot (or from another
    #                    worker, a QUIC session whose client moved)
    # sessions_evicted_unanswered  ended for a new client, table full: had no reply yet
    # sessions_evicted_idle        ended for a new client, table full: answered, not talking
    # denied             datagrams from clients that allow/deny refuse
    # sessions_refused   new clients dropped: table full and every session talking
    # sessions_refused_per_ip  new clients dropped: their IP is at udp.max_sessions_per_ip
    # untrusted          datagrams dropped (proxy_protocol.accept): sender not in `trusted`
    # bad_headers        datagrams dropped (proxy_protocol.accept): no valid v2 PROXY header
    # too_big            datagrams dropped (proxy_protocol.send): no room for the v2 header
    # sessions_active    open now (= created + adopted - the seven ended ones above)
    # dropped            datagrams lost either way: table full, per-IP limit, no server,
    #                    too big for the PROXY header, send errors to an upstream or to a client
    # bytes_in           bytes of the datagrams read from clients (as datagrams_in)
    # bytes_out          bytes of the replies sent to clients (as datagrams_out)
    # quic_unrouted      sni_routes: new flows not routed by their QUIC server name (not QUIC,
    #                    undecryptable, past a bound or the hold deadline: sent to `default`
    #                    or dropped; or a name with no route and no default: dropped)
    # quic_moved         sni_routes: sessions that followed their client to a new address (a
    #                    packet from it carried one of the session's connection IDs: cids.py)

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def counters(self) -> dict[str, int]:
        """Keyed as observe/metrics.py's UDP_SERIES."""
        return {'datagrams_received': self.datagrams_in, 'datagrams_sent': self.datagrams_out,
                'datagrams_dropped': self.dropped, 'refused_denied': self.denied,
                'refused_untrusted': self.untrusted, 'refused_proxy_header': self.bad_headers,
                'received_bytes': self.bytes_in, 'sent_bytes': self.bytes_out,
                'sessions_created': self.sessions_created,
                'sessions_adopted': self.sessions_adopted,
                'ended_expired': self.sessions_expired,
                'ended_completed': self.sessions_completed,
                'ended_failed': self.sessions_failed,
                'ended_evicted': self.sessions_evicted_unanswered + self.sessions_evicted_idle,
                'ended_closed': self.sessions_closed,
                'ended_handed_over': self.sessions_handed_out,
                'refused_table_full': self.sessions_refused,
                'refused_per_ip': self.sessions_refused_per_ip,
                'quic_unrouted': self.quic_unrouted,
                'quic_moved': self.quic_moved,
                'active': self.sessions_active}

    def __repr__(self) -> str:
        return 'UdpStats(%s)' % ', '.join('%s=%d' % kv for kv in self.as_dict().items())


class PerIpLimit(Protocol):
    """The seam for `udp.max_sessions_per_ip`: `UdpService(..., per_ip=limit)`.

    The service calls `acquire(ip)` before it opens a session (before it makes
    room in a full table) and `release(ip)` exactly once for every acquire that
    returned True: when the session ends, is handed to the next worker on a
    reload, or could not be opened after all. `ip` is the real client's host:
    as recvfrom() gives it (str; an IPv4 client of a dual-stack listener comes
    as '::ffff:a.b.c.d'), or the source of its PROXY header
    (`proxy_protocol.accept`). A session adopted on reload is counted with
    `adopt(ip)`, unchecked: it is kept whatever the limit (a reload never cuts a
    live flow) and released when it ends like any other; the previous worker
    released it when it handed it over. All run on the worker's loop: they must
    not block. With `per_ip=None` (the default) nothing is called and nothing costs.
    """

    def acquire(self, ip: str) -> bool:
        """Count one more session for `ip`; False (nothing counted) when `ip` is at its limit."""

    def adopt(self, ip: str) -> None:
        """Count a session of `ip` taken over on reload, without checking the limit."""

    def release(self, ip: str) -> None:
        """One session of `ip` is gone: undo one acquire that returned True, or one adopt."""


class GateLimit:
    """`udp.max_sessions_per_ip` for the whole listener: the seam over the listener's
    `limits.Gate`, whose counts every worker of every live generation shares."""

    __slots__ = ('gate',)

    def __init__(self, gate: limits.Gate):
        self.gate = gate

    def acquire(self, ip: str) -> bool:
        return self.gate.try_acquire(limits.ip_key(ip)) is None

    def adopt(self, ip: str) -> None:
        self.gate.add(limits.ip_key(ip))

    def release(self, ip: str) -> None:
        self.gate.release(limits.ip_key(ip))


class Session:
    """One client flow: a connected socket to one upstream server.

    ::

        client datagram, no session ──(untrusted sender / bad PROXY header / allow,deny /
                    │                    per-IP limit / table full and all talking /
                    │                    no server)──▶ dropped
                    │ socket(); connect(server); watch
                    ▼
                  OPEN ◀── a datagram either way: last = now, move to table end
                    │
                    ├─ idle_timeout without datagrams ──▶ expired   ┐
                    ├─ reply number udp.responses sent ─▶ completed │
                    ├─ ECONNREFUSED / unreachable ──────▶ failed    │
                    ├─ table full, a new client; no ────▶ evicted   ├─▶ CLOSED
                    │  reply yet, or not talking                    │    (close socket,
                    └─ UdpService.close() ──────────────▶ closed    ┘    which leaves the epoll;
                                                                         out of table,
                                                                         sock = None)

    A CLOSED session is never reopened; the client's next datagram creates a
    new session (new socket, new source port, next server in balancing order).
    """

    __slots__ = ('key', 'addr', 'sock', 'fd', 'anc', 'target', 'pool', 'replies', 'last', 'gated',
                 'client', 'told', 'head', 'room', 'pre', 'started', 'datagrams_in', 'bytes_in',
                 'bytes_out', 'cids', 'learn', 'moved')

    def __init__(self, key, addr, sock, anc, target, now, client=None):
        self.key = key              # table key: addr, or (addr, local dst) for wildcards
        self.addr = addr            # client address, as recvfrom() gave it: replies go there
        self.sock = sock            # connected upstream socket; None once CLOSED
        self.fd = sock.fileno()
        self.anc = anc              # sendmsg() pktinfo for wildcard listeners, else None
        self.target = target        # upstream.pool.Target
        self.pool = None            # its UpstreamPool when routed by name (quicroute.py), else
                                    # None: the listener's
        self.replies = 0            # replies received from the upstream
        self.last = now             # loop.time() of the last datagram either way
        self.gated = False          # holds a count in the per-IP limit (release it at the end)
        # proxy_protocol (admit.py); with neither accept nor send only `client` is set
        self.client = client or addr    # the real client: the PROXY header's source, else addr
        self.told = None            # the destination the client's PROXY header named, if any
        self.head = None            # send v2: the header put before each datagram upstream
        self.room = 0               # send v2: the largest payload that fits beside `head`
        self.pre = None             # accept: the last PROXY header read (compared, then parsed)
        # the access log's (counted only while it is on; `replies` is its datagrams_out)
        self.started = now          # loop.time() of its first datagram
        self.datagrams_in = self.bytes_in = self.bytes_out = 0
        # QUIC, routed by name (cids.py): the connection IDs it is found by, and whether its
        # replies are still read for the server's IDs (until its first short-header packet)
        self.cids = None
        self.learn = False
        self.moved = None           # [the client it left, when, late packets dropped]: moves.py


class SessionTable:
    """The open sessions of one UdpService, kept in two orders, and who makes room when full.

    `active` maps key → Session in order of last activity: every datagram
    either way moves its session to the end (service.py's hot path does that
    directly on this OrderedDict), so the front is the least recently active
    session; idle expiry and idle eviction take from there.

    `unanswered` maps key → Session in order of creation, for the sessions
    that may have had no reply yet. The hot path never touches it: a session
    joins it when it opens, leaves it when it ends, and an answered one is
    dropped from its front only when `victim()` walks past it. So it holds at
    most the sessions of `active` and each costs O(1) once.

    When the table holds `cap` sessions and a new client comes, `victim()`
    names the session to end for it:

      1. the oldest session that never got a reply (a spoofed or one-way flow:
         nothing is waiting for it) — however recent;
      2. else the least recently active session, if it is not talking;
      3. else none: every session is talking and the new client is refused.

    Talking: a session that got at least one reply and saw a datagram either
    way within the last min(TALKING, idle_timeout / 4). `last` is stamped from
    a clock refreshed at each listener read and each sweep, so a reply's stamp
    may lag by up to one sweep period: the window tested is that much longer
    (`talking` = min(TALKING, idle_timeout / 4) + sweep period).

    The two halves of a UdpService that stamp `last` share the clock they stamp it
    with here: `now`, refreshed by each listener read (admit.py) and each sweep
    (service.py), read by the reply path; and `full_at`, the clock of the last
    eviction or refusal (admit.py), which the sweep reads to flush the rate-limited
    log once the table stops overflowing.
    """

    __slots__ = ('active', 'unanswered', 'cap', 'talking', 'now', 'full_at')

    def __init__(self, cap: int, talking: float, now: float = 0.0):
        self.active: OrderedDict = OrderedDict()
        self.unanswered: OrderedDict = OrderedDict()
        self.cap = cap              # 0: no limit
        self.talking = talking
        self.now = now              # the clock of the last listener read or sweep
        self.full_at = None         # the clock of the last eviction or refusal, or None

    def __len__(self) -> int:
        return len(self.active)

    def add(self, sess: Session) -> None:
        self.active[sess.key] = sess
        if not sess.replies:
            self.unanswered[sess.key] = sess

    def remove(self, sess: Session) -> None:
        key = sess.key
        if self.active.get(key) is sess:
            del self.active[key]
        if self.unanswered.get(key) is sess:
            del self.unanswered[key]

    def rekey(self, sess: Session, key) -> None:
        """`sess` is found by `key` from now on (its client moved: cids.py), as the most
        recently active session."""
        self.remove(sess)
        sess.key = key
        self.add(sess)

    def clear(self) -> None:
        self.active.clear()
        self.unanswered.clear()

    def oldest(self) -> Session:
        """The least recently active session (the table must not be empty)."""
        return next(iter(self.active.values()))

    def victim(self, now: float) -> tuple[Session | None, str]:
        """(session to end, UNANSWERED or IDLE), or (None, ALL_TALKING). Table not empty."""
        unanswered = self.unanswered
        while unanswered:
            sess = next(iter(unanswered.values()))
            if not sess.replies:
                return sess, UNANSWERED
            del unanswered[sess.key]        # answered since it opened
        sess = self.oldest()
        if now - sess.last >= self.talking:
            return sess, IDLE
        return None, ALL_TALKING
