"""Client datagrams in: the UDP listener socket's readers, and who gets a session.

`Admission` is its own object, one per `UdpService`, which builds it. It owns
everything between the listener socket and a session's upstream socket:

    listener socket ──recv──▶ session table ──found──────────────────────────────▶ send upstream
                                    │ none
                                    ▼
         (accept) sender in `trusted`? ─▶ v2 PROXY header? ─▶ allow/deny (real client)
                  ─▶ udp.max_sessions_per_ip (real client) ─▶ room in the table ─▶ open
                                                              (else evict: `end`)  (`connect`)

Why this seam: a client datagram either finds its session or asks for one, and
everything that decides the asking (allow/deny, proxy_protocol, the per-IP
limit, whom a full table evicts) reads only this listener's settings and the
table. What a session is once open (its socket, its server, its replies,
expiry, close, hand-over) is service.py's; admission reaches it through four
callbacks given at construction (`connect`, `end`, `upstream_error`,
`unexpected`), never through the service's attributes. Shared by reference,
named in the constructor: the listener socket, the `SessionTable` (its `now`
and `full_at` are the clock and overflow mark both sides read), the counters,
the rate-limited log, the scratch buffer, the clock and the per-IP limit.

Two readers, one chosen per listener (`reader`, at start()): `_on_listener`, the hot path
of a listener without proxy_protocol (nothing of the PROXY protocol is looked
at, not even a flag), and `_on_listener_proxied` for `accept: true` and/or
`send: v2`.

PROXY protocol over UDP (no peer defines it; HAProxy's spec only names DGRAM),
the way mpproxy's `send: v2` writes it and `accept: true` reads it: every
datagram starts with its own v2 header, with transport DGRAM.

- send v2: source = the real client, destination = the address the client sent
  to (the listener's, with a wildcard listener the one IP_PKTINFO named; both
  written as IPv4 when both are IPv4-mapped). Built once per session; each
  datagram goes out as header + payload with one send() (a payload of
  `COPY_BELOW` bytes or more: with `sendmsg([header, payload])`, no copy). A
  payload that no longer fits (65507 bytes to an IPv4 upstream, 65527 to IPv6)
  is dropped: checked, not left to EMSGSIZE.
- accept: a datagram from a sender outside `trusted`, or without a valid v2
  header, is dropped (v1 is a text line for streams: invalid here). The
  header of a session's first datagram names its real client for good (one
  session of the proxy in front carries one client); later datagrams must
  still carry a header and lose it: one equal to the last one read is only
  compared, another is parsed. Replies go back to the sender, without header.

Every drop is counted (UdpStats) and logged through the rate-limited log.
"""

from __future__ import annotations

import socket

from mpproxy.proxy.edge import acl, proxy_header
from mpproxy.proxy.udp import moves, pktinfo
from mpproxy.proxy.udp.session import UNANSWERED, SessionTable, UdpStats

BATCH = 64                # datagrams read per reader callback, per socket
MAX_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}     # by upstream socket family
# send v2: a payload shorter than this is copied after the header and sent with send(), a
# longer one goes out with sendmsg([header, payload]) (measured: the copy is ~250 ns cheaper
# than sendmsg() at 100 bytes, even at 8 KiB, and ~900 ns dearer at 64 KiB).
COPY_BELOW = 8192
_AGAIN = (BlockingIOError, InterruptedError)
_V4_MAPPED = bytes(10) + b'\xff\xff'


class Admission:
    """The read side of one UDP listener socket in one worker, and who gets a session.

    Built by `UdpService` with what the two share (see the module docstring) and four
    callbacks into session life: `connect` (a new session: socket, server, watched, in
    the table; or None), `end`, `upstream_error`, `unexpected`. Its own state is this
    listener's admission settings (allow/deny, proxy_protocol, the pktinfo spec).
    """

    def __init__(self, listener, sock: socket.socket, wildcard: bool, table: SessionTable,
                 stats: UdpStats, rl, buf: bytearray, clock, per_ip, counting: bool, *,
                 connect, end, upstream_error, unexpected):
        self._name = listener.name
        self._lsock = sock
        self._wildcard = wildcard
        self._pk = pktinfo.recv_spec(sock.family)
        self._table = table
        self._sessions = table.active           # the hot path uses it directly
        self._stats = stats
        self._rl = rl
        self._buf = buf
        self._view = memoryview(buf)
        self._time = clock
        self._per_ip = per_ip                   # None: no per-IP limit, nothing called
        self._counting = counting               # the access log's per-session counts
        self._connect = connect
        self._end = end
        self._upstream_error = upstream_error
        self._unexpected = unexpected
        self._acl = acl.for_listener(listener)  # None: no lists, nothing checked
        pp = listener.proxy_protocol
        self._trusted = acl.Acl(allow=pp.trusted) if pp.accept else None
        self._send_v2 = pp.send == 'v2'
        self._local = sock.getsockname()[:2]    # send v2: the destination, unless wildcard

    # flows held before they have a session: none here (see quicroute.RoutedAdmission)
    pending = ()

    def expire(self, now: float) -> None:
        """End the held flows past their deadline (the service's sweep timer)."""

    def drop_pending(self) -> None:
        """Forget the held flows (drain, close, hand-over)."""

    @property
    def reader(self):
        """The listener socket's reader callback: `_on_listener`, or with proxy_protocol
        (accept and/or send: v2) `_on_listener_proxied`."""
        if self._trusted is not None or self._send_v2:
            return self._on_listener_proxied
        return self._on_listener

    def admit_adopted(self, sess) -> bool:
        """A session adopted on reload, under this generation's proxy_protocol.send (its header
        put in place); False when it cannot be (logged): the caller closes it."""
        if not self._send_v2:
            return True
        head = self._header_for(sess.client, sess.told, sess.key)
        if head is None:
            return False
        self._prefix(sess, head)
        return True

    def replay(self, source) -> None:
        """Datagrams carried over from an old worker (`handoff.Replay`): through this
        listener's reader, as if read from its socket now."""
        lsock, self._lsock = self._lsock, source
        try:
            reader = self.reader
            while source:
                reader()
        finally:
            self._lsock = lsock

    # -- reader callbacks (the hot path) -------------------------------------
    # Flat on purpose (scripts/bench "udp" and "udpnew"): attributes are cached in locals once
    # per callback; a datagram of an open session reads none and calls no method of ours.

    def _on_listener(self):
        """Client datagrams → their sessions' upstream sockets."""
        lsock = self._lsock
        sessions = self._sessions
        get = sessions.get
        touch = sessions.move_to_end
        buf, view = self._buf, self._view
        wildcard = self._wildcard
        if wildcard:
            pk_level, pk_type, pk_slice = self._pk
            ancsize = pktinfo.ANCBUFSIZE
        counting = self._counting
        now = self._table.now = self._time()
        n = dropped = nbytes = 0
        try:
            while n < BATCH:
                try:
                    if wildcard:
                        size, anc, _flags, addr = lsock.recvmsg_into((buf,), ancsize)
                    else:
                        size, addr = lsock.recvfrom_into(buf)
                except _AGAIN:
                    break
                n += 1
                nbytes += size
                if wildcard:
                    cdata = None
                    for level, typ, cd in anc:
                        if typ == pk_type and level == pk_level:
                            cdata = cd
                            break
                    key = (addr, None if cdata is None else cdata[pk_slice])
                else:
                    key = addr
                    cdata = None
                sess = get(key)
                if sess is None:
                    sess = self._first(key, addr, cdata, now, view, size)
                    if sess is None:
                        continue
                elif sess.last != now:
                    touch(key)
                    sess.last = now
                if counting:
                    sess.datagrams_in += 1
                    sess.bytes_in += size
                try:                # the buffer is sent before it is reused: no copy
                    sess.sock.send(view[:size])
                except OSError as exc:
                    dropped += 1
                    self._upstream_error(sess, exc, 'send to')
        except Exception as exc:
            self._unexpected(exc, 'reading the listener')
        stats = self._stats
        stats.datagrams_in += n
        stats.bytes_in += nbytes
        if dropped:
            stats.dropped += dropped

    def _on_listener_proxied(self):
        """`_on_listener` with proxy_protocol: each datagram's PROXY header read and cut off
        (accept), the session's header put before it (send: v2), or both."""
        lsock = self._lsock
        sessions = self._sessions
        get = sessions.get
        touch = sessions.move_to_end
        buf, view = self._buf, self._view
        wildcard = self._wildcard
        if wildcard:
            pk_level, pk_type, pk_slice = self._pk
            ancsize = pktinfo.ANCBUFSIZE
        trusted = self._trusted             # None: accept is off
        counting = self._counting
        now = self._table.now = self._time()
        n = dropped = nbytes = 0
        try:
            while n < BATCH:
                try:
                    if wildcard:
                        size, anc, _flags, addr = lsock.recvmsg_into((buf,), ancsize)
                    else:
                        size, addr = lsock.recvfrom_into(buf)
                except _AGAIN:
                    break
                n += 1
                nbytes += size
                if wildcard:
                    cdata = None
                    for level, typ, cd in anc:
                        if typ == pk_type and level == pk_level:
                            cdata = cd
                            break
                    key = (addr, None if cdata is None else cdata[pk_slice])
                else:
                    key = addr
                    cdata = None
                sess = get(key)
                start = 0                   # where the payload starts, after a PROXY header
                if trusted is not None:
                    pre = None if sess is None else sess.pre
                    if pre is not None and size >= len(pre) and buf.startswith(pre):
                        start = len(pre)
                    else:
                        if sess is None and not trusted.permits(addr[0]):
                            self._untrusted(addr)
                            continue
                        start, header = self._read_header(view, size, addr)
                        if header is None:
                            continue
                        if sess is not None:
                            if not self._reheaded(sess, header, now):
                                dropped += 1
                                continue
                            sess.pre = bytes(view[:start])
                if sess is None:
                    if trusted is None or header.local:   # LOCAL: the sender is the client
                        client, told = addr, None
                    else:
                        client, told = header.source, header.destination
                    sess = self._first_proxied(key, addr, cdata, now, view, start, size,
                                               client, told)
                    if sess is None:
                        continue
                elif sess.last != now:
                    touch(key)
                    sess.last = now
                if counting:
                    sess.datagrams_in += 1
                    sess.bytes_in += size
                head = sess.head
                try:
                    if head is None:
                        sess.sock.send(view[start:size])
                    elif size - start < COPY_BELOW:     # copying a little beats sendmsg();
                        # (it always fits: room is at least 65475)
                        sess.sock.send(head + view[start:size])
                    elif size - start <= sess.room:
                        sess.sock.sendmsg((head, view[start:size]))
                    else:
                        dropped += 1
                        self._too_big(sess, size - start)
                except OSError as exc:
                    dropped += 1
                    self._upstream_error(sess, exc, 'send to')
        except Exception as exc:
            self._unexpected(exc, 'reading the listener')
        stats = self._stats
        stats.datagrams_in += n
        stats.bytes_in += nbytes
        if dropped:
            stats.dropped += dropped

    # -- admission of a new session -----------------------------------------------

    def _first(self, key, addr, cdata, now, view, size):
        """A datagram (`view[:size]`) of a client with no session: its new session, to send
        it on; or None: denied or dropped (counted here). quicroute.RoutedAdmission holds it
        instead, until the flow's ClientHello names its upstream."""
        if self._acl is not None and not self._acl.permits(addr[0]):
            self._deny(addr)
            return None
        sess = self._open(key, addr, cdata, now)
        if sess is None:
            self._stats.dropped += 1
        return sess

    def _first_proxied(self, key, addr, cdata, now, view, start: int, size: int, client,
                       told):
        """`_first` with proxy_protocol: the datagram's payload is `view[start:size]` (after
        its PROXY header, `view[:start]`), its real client `client` (the header's source, else
        the sender) and the destination the header named `told`."""
        if self._acl is not None and not self._acl.permits(client[0]):
            self._deny(client, addr)
            return None
        sess = self._open(key, addr, cdata, now, client, told)
        if sess is None:
            self._stats.dropped += 1
        elif self._trusted is not None:
            sess.pre = bytes(view[:start])
        return sess

    def _open(self, key, addr, cdata, now, client=None, told=None, pool=None):
        """A new session for sender `addr` whose real client is `client` (default: `addr`),
        to `pool` (default: the listener's), or None (counted by the caller as dropped)."""
        client = client or addr
        head = None
        if self._send_v2:
            head = self._header_for(client, told, key)
            if head is None:
                return None
        per_ip = self._per_ip
        if per_ip is not None and not per_ip.acquire(client[0]):
            self._stats.sessions_refused_per_ip += 1
            self._rl.warning('per-ip', 'udp %s: client %s is at udp.max_sessions_per_ip, '
                             'new session dropped', self._name, _who(client, addr))
            return None
        sess = None
        try:
            cap = self._table.cap
            if not cap or len(self._sessions) < cap or self._make_room(client, now):
                sess = self._connect(key, addr, cdata, now, client, pool)
        finally:
            if per_ip is not None:
                if sess is None:
                    per_ip.release(client[0])
                else:
                    sess.gated = True
        if sess is not None:
            sess.told = told
            if head is not None:
                self._prefix(sess, head)
        return sess

    def _make_room(self, client, now) -> bool:
        """The table is full: end one session for the new `client`, or refuse it."""
        table, stats = self._table, self._stats
        table.full_at = now
        victim, why = table.victim(now)
        if victim is None:
            stats.sessions_refused += 1
            self._rl.warning(('full', why), 'udp %s: %d sessions (udp.max_sessions per worker), '
                             'all talking: new client %s dropped', self._name, len(table), client)
            return False
        self._end(victim, 'limit')
        if why == UNANSWERED:
            stats.sessions_evicted_unanswered += 1
            what = 'never answered'
        else:
            stats.sessions_evicted_idle += 1
            what = 'idle %.1fs' % (now - victim.last)
        self._rl.warning(('full', why), 'udp %s: %d sessions (udp.max_sessions per worker): '
                         'ended the session of %s (%s) for new client %s',
                         self._name, table.cap, victim.client, what, client)
        return True

    # -- the PROXY protocol ----------------------------------------------------------

    def _reheaded(self, sess, header, now: float) -> bool:
        """A session's sender changed its PROXY header. A QUIC session (one with connection
        IDs: quicroute.py) takes the client it names now, as a moved client (the proxy in
        front followed its client to a new address): allow/deny, the move-back guard, its
        per-IP count, its own send: v2 header, the access log. Any other session keeps the
        client its first header named. False: the datagram is dropped (denied, a late
        packet, or no header can be made for the new client: then the session ends)."""
        if not sess.cids:
            return True
        client, told = (sess.addr, None) if header.local else (header.source, header.destination)
        if client == sess.client and told == sess.told:
            return True
        if self._acl is not None and not self._acl.permits(client[0]):
            self._deny(client, sess.addr)
            return False
        if not moves.may_move(sess, client, now):
            return False
        head = None
        if self._send_v2:
            head = self._header_for(client, told, sess.key)
            if head is None:
                self._end(sess, 'closed')
                self._stats.sessions_closed += 1
                return False
        if sess.gated and client[0] != sess.client[0]:
            self._per_ip.release(sess.client[0])
            self._per_ip.adopt(client[0])
        sess.moved = [sess.client, now, 0]
        sess.client, sess.told = client, told
        if head is not None:
            self._prefix(sess, head)
        self._stats.quic_moved += 1
        return True

    def _read_header(self, view, size: int, addr) -> tuple[int, proxy_header.ProxyHeader | None]:
        """(length, header) of the v2 PROXY header a datagram starts with; (0, None) when it
        has none (counted and logged)."""
        state, header, used, reason = proxy_header.parse(view[:size])
        if state == proxy_header.DONE and header.version == 2:
            return used, header
        if state == proxy_header.DONE:
            reason = 'a v1 PROXY header (UDP takes v2 only)'
        elif state == proxy_header.MORE:
            reason = 'the datagram ends inside its PROXY protocol header'
        self._stats.bad_headers += 1
        self._rl.warning(('proxy header', reason), 'udp %s: datagram from %s: %s; dropped',
                         self._name, addr, reason)
        return 0, None

    def _header_for(self, client, told, key) -> bytes | None:
        """send: v2 — the header of a session of `client` (None when it cannot be: logged).

        The destination is what the client's own PROXY header named (`told`), else the
        address the client sent to: the listener's, or with a wildcard listener the local
        address IP_PKTINFO named (the table key's second half).
        """
        if told is not None:
            destination = told
        elif self._wildcard and key[1] is not None:
            destination = (pktinfo.destination(self._lsock.family, key[1]), self._local[1])
        else:
            destination = self._local
        try:
            return proxy_header.v2(*_unmapped(client, destination), 'udp')
        except ValueError as exc:
            self._rl.error(('prefix', str(exc)), 'udp %s: no PROXY header for client %s: %s; '
                           'dropped', self._name, client, exc)
            return None

    @staticmethod
    def _prefix(sess, head: bytes) -> None:
        sess.head = head
        sess.room = MAX_PAYLOAD.get(sess.target.family, MAX_PAYLOAD[socket.AF_INET]) - len(head)

    # -- drops (off the hot path) ------------------------------------------------------

    def _deny(self, client, sender=None) -> None:
        self._stats.denied += 1
        self._rl.info('denied', 'udp %s: client %s denied by allow/deny',
                      self._name, _who(client, sender or client))

    def _untrusted(self, addr) -> None:
        self._stats.untrusted += 1
        self._rl.warning('untrusted', 'udp %s: datagram from %s, not in proxy_protocol.trusted; '
                         'dropped', self._name, addr)

    def _too_big(self, sess, size: int) -> None:
        self._stats.too_big += 1
        self._rl.warning(('too big', sess.target.label), 'udp %s: datagram of %d bytes from %s '
                         'does not fit beside its %d-byte PROXY protocol header (at most %d to '
                         'upstream %s); dropped', self._name, size, sess.client, len(sess.head),
                         sess.room, sess.target.label)


def _who(client, sender) -> str:
    """A client for the log: `client`, or `client via sender` behind a proxy."""
    if client is sender or client == sender:
        return str(client)
    return '%s via %s' % (client, sender)


def _unmapped(source: tuple, destination: tuple) -> tuple[tuple, tuple]:
    """(host, port) pairs, written as IPv4 when both hosts are IPv4-mapped (::ffff:a.b.c.d):
    an IPv4 client of a dual-stack socket is an IPv4 client."""
    source, destination = source[:2], destination[:2]
    a, b = _v4_of(source[0]), _v4_of(destination[0])
    if a is not None and b is not None:
        return (a, source[1]), (b, destination[1])
    return source, destination


def _v4_of(host: str) -> str | None:
    if not host.startswith('::ffff:') or '.' not in host:
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return None
    return socket.inet_ntop(socket.AF_INET, packed[12:]) if packed[:12] == _V4_MAPPED else None
