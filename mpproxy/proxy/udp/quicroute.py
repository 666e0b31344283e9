"""QUIC passthrough by server name: `sni_routes` on a UDP listener.

`RoutedAdmission` is the `Admission` of a listener with sni_routes. A datagram of a
client that has a session goes on as on any listener. One from a client with no
session opens no session yet: the flow gets a `Pending` entry holding its datagrams
and an `edge.quic.ClientHelloReader`; once the reader has the whole ClientHello, its
server name and ALPN list pick the pool (`edge.sni.SniRouter.route`: exact name, `*.suffix`,
default; within each, a route requiring an offered ALPN first), the
session is opened to that pool as any session is (`Admission._open`: the per-IP limit,
a full table) and the held datagrams are sent upstream in the order they came.

    no session ──▶ PENDING (held: its datagrams, a ClientHelloReader, a deadline)
                     │  MORE: held, unless past MAX_HELD datagrams / MAX_HELD_BYTES
                     ├─ DONE, the name routes ───────────────────────────▶ session to that pool
                     ├─ DONE, no route and no default ──────────────────▶ dropped ┐ quic_unrouted,
                     └─ not a QUIC Initial, QuicError, a bound, HOLD ────▶ default │ logged
                        (the deadline, checked by the service's sweep timer)  or dropped ┘ (rate-limited)

A new flow whose datagram carries the connection ID of a session (`cids.CidIndex`) is
not new: its client moved (NAT rebinding), and the session follows it (`move`; not back
to the address it left less than moves.BACK_AFTER ago for its first BACK_LATE packets:
those are dropped). When
that session is another worker's (the kernel steers flows by source address), a
short-header packet finds nothing here: the flow is held as above, without a reader,
while the other workers are asked for it (`seek`, worker/peers.py; SEEKS a second). The
session arrives (`settle`: the held datagrams go on to it); or every worker answers it has
none (`answered`): unrouted at once, as a flow that is not QUIC; or one keeps it, or the
answers do not all come by the deadline, or the budget is spent: the datagrams are
dropped, no session opened (the client's next packet asks again).

Nothing is ever sent to a client before its session exists (a session only relays its
upstream's replies). Bounds per worker and listener: MAX_PENDING flows held at once (a
new flow past it is dropped and counted), each at most MAX_HELD datagrams and
MAX_HELD_BYTES bytes, for at most HOLD seconds (expired within one sweep period after).
Held flows are dropped, not forwarded, when the service drains, closes or hands its
sessions over on reload: the client's QUIC stack retransmits its Initials (a moved
client's next packet asks again), and the next worker reads them afresh.

Without the `cryptography` package (`mpproxy[quic]`; `mpproxy -t` and start-up refuse
such a config, a reload cannot check) every new flow is unrouted: to default, or dropped.
"""

from __future__ import annotations

from mpproxy.proxy.edge import quic
from mpproxy.proxy.udp import cids
from mpproxy.proxy.udp.admit import Admission
from mpproxy.proxy.udp.moves import BACK_AFTER, may_move

HOLD = 1.0                # seconds a flow may take to send its whole ClientHello
MAX_PENDING = 1024        # flows held at once, per worker and listener
MAX_HELD = 8              # datagrams held per flow
MAX_HELD_BYTES = 16384    # bytes held per flow
SEEKS = 1000              # per second and worker: new flows whose session other workers are
                          # asked for (a short header with an ID unknown here: cids.py)


class Pending:
    """A flow with no session yet: what it sent, and its ClientHello so far; or (`reader`
    None) a moved client's, while the other workers are asked for its session."""

    __slots__ = ('addr', 'cdata', 'reader', 'held', 'size', 'deadline', 'client', 'told', 'pre',
                 'token', 'waiting')

    def __init__(self, addr, cdata, deadline: float, seeking: bool = False, proxied=None):
        self.addr = addr            # the sender, as recvfrom() gave it
        self.cdata = cdata          # wildcard listeners: its pktinfo, for the session's replies
        self.reader = None if seeking else quic.ClientHelloReader()
        self.held: list[bytes] = []     # payloads (after their PROXY header, if any)
        self.size = 0
        self.deadline = deadline
        # proxy_protocol: the real client and destination its first PROXY header named, and
        # that header's bytes (accept: the session's `pre`); else None
        self.client, self.told, self.pre = proxied or (None, None, None)
        self.token = self.waiting = 0   # seeking: the question's number, answers still due


class RoutedAdmission(Admission):
    """`Admission` with flows routed by their QUIC server name (see the module docstring).

    `router` (an edge.sni.SniRouter) maps a server name and ALPN list to an UpstreamPool; `arm()`
    makes sure the service's sweep timer runs, which calls `expire()`. A datagram of a new
    flow that carries the connection ID of a session (`cids`, a cids.CidIndex) is that
    session's, whose client moved: `move(sess, key, addr, cdata, now)` re-keys it. With
    `seek` (other workers to ask), a short-header packet with an ID unknown here is held
    while `seek(key, addr, cdata, probe)` asks them; `settle(sess)` sends on what was held
    when the session arrives.
    """

    def __init__(self, *args, router, arm, cids, move, seek=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._router = router
        self._arm = arm
        self._cids = cids
        self._move = move
        self._seek = seek
        self._seeks = float(SEEKS)      # the seek budget (a token bucket) and its clock
        self._seeks_at = 0.0
        self._asked: dict[int, object] = {}     # question number → the held flow's key
        self._questions = 0
        self.pending: dict = {}         # table key → Pending, oldest (earliest deadline) first
        self._quic = quic.available()
        if not self._quic:
            self._rl.error('no quic', 'udp %s: sni_routes need the cryptography package '
                           '(pip install "mpproxy[quic]"): every new flow goes to default, '
                           'or is dropped', self._name)

    def expire(self, now: float) -> None:
        pending = self.pending
        dropped = 0
        while pending:
            key, flow = next(iter(pending.items()))
            if flow.deadline > now:
                break
            if flow.reader is None:         # asked of the other workers, not all answered:
                dropped += self._release(key, flow, now, None, 'timeout', 'the other workers '
                                         'did not all answer within %gs' % HOLD, default=False)
            else:
                dropped += self._release(key, flow, now, None, 'timeout',
                                         f'no whole ClientHello within {HOLD:g}s')
        self._stats.dropped += dropped

    def drop_pending(self) -> None:
        self._stats.dropped += sum(len(flow.held) for flow in self.pending.values())
        self.pending.clear()
        self._asked.clear()

    def settle(self, sess) -> None:
        """`sess` came from another worker for a flow held here while it was asked for:
        what the flow sent meanwhile goes on to it."""
        flow = self.pending.pop(sess.key, None)
        if flow is not None:
            self._asked.pop(flow.token, None)
            self._stats.dropped += self._send_held(sess, flow.held, flow.size)

    def answered(self, question: int, kept: bool, now: float) -> None:
        """Another worker has no session for question `question` (or `kept`: has it, and
        keeps it: the client left it just now). When every worker said it has none, the flow
        is not a moved client's: unrouted, as any flow that is not QUIC; when one keeps it,
        what the flow sent is dropped (its next packet asks again)."""
        key = self._asked.get(question)
        flow = None if key is None else self.pending.get(key)
        if flow is None or flow.token != question:
            return
        if kept:
            self._stats.dropped += self._release(
                key, flow, now, None, 'kept', 'another worker keeps the session of its '
                'connection ID (it left that client less than %gs ago)' % BACK_AFTER,
                default=False)
            return
        flow.waiting -= 1
        if flow.waiting <= 0:
            self._stats.dropped += self._release(
                key, flow, now, None, 'unknown', 'a short-header packet whose connection ID '
                'no worker has')

    def _first(self, key, addr, cdata, now, view, size):
        """A datagram of a flow with no session (the plain reader's one branch that differs,
        Admission._first): a moved client's session found by its connection ID, to send it
        on; else held until its ClientHello is whole, then routed."""
        if self._cids.by_id:
            sess = self._cids.find(view, size)
            if sess is not None and (self._acl is None or self._acl.permits(addr[0])):
                return self._follow(sess, key, addr, cdata, now)
        self._stats.dropped += self._hold(key, addr, cdata, bytes(view[:size]), now)
        return None

    def _first_proxied(self, key, addr, cdata, now, view, start, size, client, told):
        """`_first` with proxy_protocol (Admission._first_proxied): the QUIC packet is the
        payload after the PROXY header, the real client the one the header named."""
        if self._acl is not None and not self._acl.permits(client[0]):
            self._deny(client, addr)
            return None
        pre = bytes(view[:start]) if self._trusted is not None else None
        if self._cids.by_id:
            sess = self._cids.find(view[start:size], size - start)
            if sess is not None:
                return self._follow(sess, key, addr, cdata, now, client, told, pre)
        self._stats.dropped += self._hold(key, addr, cdata, bytes(view[start:size]), now,
                                          (client, told, pre))
        return None

    def _follow(self, sess, key, addr, cdata, now, client=None, told=None, pre=None):
        """`sess`'s client moved to `addr` (or, behind a proxy, to `client`): follow it,
        dropping what the new flow had held, and return it; or None (the datagram dropped):
        the client left that address less than BACK_AFTER ago (a late packet, not a move
        back), or its send: v2 header cannot be made (logged; the session is ended)."""
        if not may_move(sess, client or addr, now):
            self._stats.dropped += 1
            return None
        flow = self.pending.pop(key, None)
        if flow is not None:
            self._asked.pop(flow.token, None)
            self._stats.dropped += len(flow.held)
        self._move(sess, key, addr, cdata, now, client, told)
        sess.pre = pre
        if self._send_v2:
            head = self._header_for(sess.client, told, key)
            if head is None:
                self._end(sess, 'closed')
                self._stats.sessions_closed += 1
                self._stats.dropped += 1
                return None
            self._prefix(sess, head)
        return sess

    def _may_seek(self, now: float) -> bool:
        """Take one from the seek budget (SEEKS a second), if there is one."""
        self._seeks = min(float(SEEKS), self._seeks + (now - self._seeks_at) * SEEKS)
        self._seeks_at = now
        if self._seeks < 1.0:
            return False
        self._seeks -= 1.0
        return True

    def _hold(self, key, addr, cdata, data: bytes, now: float, proxied=None) -> int:
        """One datagram of a flow with no session: held, or its flow routed (`proxied`:
        (client, told, pre) of its PROXY header). Returns how many were dropped."""
        pending = self.pending
        flow = pending.get(key)
        if flow is None:
            if proxied is None and self._acl is not None and not self._acl.permits(addr[0]):
                self._deny(addr)        # (behind a proxy _first_proxied checked the client)
                return 0
            if not self._quic:
                self._stats.quic_unrouted += 1
                return self._forward(key, Pending(addr, cdata, now, True, proxied), [data],
                                     len(data), now, self._router.fallback())   # (no reader)
            if len(pending) >= MAX_PENDING:
                self._stats.quic_unrouted += 1
                self._rl.warning(('quic', 'pending'), 'udp %s: %d QUIC flows waiting for their '
                                 'ClientHello (per worker): datagram from %s dropped',
                                 self._name, MAX_PENDING, addr)
                return 1
            seeking = self._seek is not None and cids.is_short(data, len(data))
            flow = Pending(addr, cdata, now + HOLD, seeking, proxied)
            if seeking and not self._ask(key, flow, data, now):
                return 1
        flow.held.append(data)
        flow.size += len(data)
        if flow.reader is None and not flow.waiting:    # no other worker could be asked
            return self._release(key, flow, now, None, 'unknown', 'a short-header packet '
                                 'whose connection ID no worker has (the others are silent)')
        if flow.reader is None:             # a moved client's, its session asked for
            if len(flow.held) >= MAX_HELD or flow.size >= MAX_HELD_BYTES:
                return self._release(key, flow, now, None, 'bound',
                                     f'{len(flow.held)} datagrams ({flow.size} bytes) while '
                                     f'the workers were asked for its session', default=False)
            return 0
        try:
            state = flow.reader.feed(data)
        except quic.QuicError as exc:
            return self._release(key, flow, now, None, 'bad', str(exc))
        if state == quic.DONE:
            name = flow.reader.server_name
            pool = self._router.route(name, flow.reader.alpn)
            if pool is None:
                return self._release(key, flow, now, None, 'no route',
                                     f'no route for server name {name!r} (ALPN '
                                     f'{",".join(flow.reader.alpn) or "none"}) and no default')
            return self._release(key, flow, now, pool)
        if state == quic.NOT_QUIC:
            return self._release(key, flow, now, None, 'not quic', 'not a QUIC Initial')
        if len(flow.held) >= MAX_HELD or flow.size >= MAX_HELD_BYTES:
            return self._release(key, flow, now, None, 'bound',
                                 f'no whole ClientHello in {len(flow.held)} datagrams '
                                 f'({flow.size} bytes)')
        if key not in pending:      # (a ClientHello in its first datagram is never kept)
            self._keep(key, flow)
        return 0

    def _ask(self, key, flow: Pending, data: bytes, now: float) -> bool:
        """A short header no session here has the ID of: held while the other workers are
        asked whether their session it is (all but those silent for a while: `flow.waiting`
        answers are due); False (the datagram dropped, nothing held, the next packet asks
        again) past the SEEKS budget or when one cannot be asked now."""
        if not self._may_seek(now):
            self._rl.warning(('quic', 'seeks'), 'udp %s: more than %d new flows a second with '
                             'short-header packets to ask the other workers about: datagram '
                             'from %s dropped', self._name, SEEKS, flow.addr)
            self._stats.quic_unrouted += 1
            return False
        self._questions += 1
        flow.token = self._questions
        asked = self._seek(key, flow.addr, flow.cdata, data[:cids.PROBE], flow.client,
                           flow.told, flow.token)
        if asked is None:           # a worker's inbox is full: not asked now
            self._stats.quic_unrouted += 1
            return False
        flow.waiting = asked
        if asked:
            self._asked[flow.token] = key
        self._keep(key, flow)       # (nobody to ask: answered below, as if by all)
        return True

    def _keep(self, key, flow: Pending) -> None:
        self.pending[key] = flow
        self._arm()

    def _release(self, key, flow: Pending, now: float, pool, kind=None, why=None,
                 default: bool = True) -> int:
        """The flow leaves the pending table: to `pool`, or (`why` it was not routed by
        name) to the default route (unless not `default`), else dropped. Returns how many
        datagrams were dropped."""
        self.pending.pop(key, None)
        if flow.token:
            self._asked.pop(flow.token, None)
        if why is not None:
            self._stats.quic_unrouted += 1
            pool = None if kind == 'no route' or not default else self._router.fallback()
            self._rl.warning(('quic', kind), 'udp %s: QUIC flow from %s: %s; %s', self._name,
                             flow.addr, why, 'dropped' if pool is None else 'sent to default')
        return self._forward(key, flow, flow.held, flow.size, now, pool, quic=why is None)

    def _forward(self, key, flow: Pending, held: list, size: int, now: float, pool,
                 quic: bool = False) -> int:
        """Open the session of `flow`'s sender to `pool` and send it the `held` datagrams in
        order; `quic`: routed by its ClientHello, its replies are read for the server's IDs."""
        if pool is None:
            return len(held)
        sess = self._open(key, flow.addr, flow.cdata, now, flow.client, flow.told, pool)
        if sess is None:
            return len(held)
        sess.learn = quic
        sess.pre = flow.pre
        return self._send_held(sess, held, size)

    def _send_held(self, sess, held: list, size: int) -> int:
        """Send `held` datagrams (`size` bytes) upstream on `sess`, in order; how many
        were dropped."""
        if self._counting:
            sess.datagrams_in += len(held)
            sess.bytes_in += size
        dropped = 0
        head = sess.head                        # send: v2
        for i, data in enumerate(held):
            if head is not None:
                if len(data) > sess.room:
                    dropped += 1
                    self._too_big(sess, len(data))
                    continue
                data = head + data
            try:
                sess.sock.send(data)
            except OSError as exc:
                dropped += 1
                self._upstream_error(sess, exc, 'send to')
                if sess.sock is None:           # the upstream is gone: the rest are lost
                    return dropped + len(held) - i - 1
        return dropped
