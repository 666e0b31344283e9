"""UDP sessions: one worker's half of a UDP listener — the service, session life, replies.

The master binds one SO_REUSEPORT socket per listener and worker slot; worker i
wraps socket i in a `UdpService`. The kernel's flow hash keeps a client on one
worker, so each worker's session table is private and needs no locking.

    client ──▶ listener socket ──▶ session table[client(, local addr)] ──▶ session socket ──▶ upstream
    client ◀── listener socket (sendto / sendmsg+pktinfo) ◀──────────────── session socket ◀──┘

Each session owns a connected, non-blocking UDP socket towards one upstream
server, so replies come back on that socket and need no lookup. Everything is
raw sockets: asyncio datagram transports cannot send 0-byte datagrams and cost
an extra layer per datagram. The listener socket is watched by the loop
(`add_reader`); session sockets by the worker's `Poller` (stream.py), where
a session costs one epoll_ctl and no handle (closing the socket unregisters it).

Owns: the interface the worker uses (start, drain, close, handing sessions
over on reload), opening and ending sessions, idle expiry, and the replies
(`_on_upstream`). What comes in from clients — the listener's readers and who
gets a session (allow/deny, proxy_protocol, the per-IP limit, a full table) —
is admit.py's `Admission`, an object the service builds; neither reads the
other's attributes. The service asks it for its `reader` and, on reload, to
`admit_adopted` a session (send: v2):

    UdpService ──builds──▶ Admission ──connect / end / upstream_error / unexpected──▶ UdpService
         └─ both hold: listener socket, SessionTable (active, now, full_at), UdpStats,
                       RateLimitedLog, buffer, clock, per-IP limit

The hot path (one datagram either way) is: recv, one dict lookup, one
`move_to_end`, one attribute store, send. Sockets are read until EAGAIN but at
most `BATCH` datagrams per callback, so one busy flow cannot starve the loop;
counters are added once per callback; nothing is logged per datagram. A
listener with proxy_protocol gets its own listener reader, so one without it
pays nothing for it.

Idle expiry: the table is an OrderedDict ordered by last activity (every
datagram moves its session to the end), so one periodic timer pops expired
sessions from the front: the cost is O(expired), not O(sessions). The timer
runs only while there are sessions.

A full table (`udp.max_sessions`, per worker: it bounds the worker's fds) makes
room for a new client by ending the oldest session that never got a reply,
else the least recently active one that is not talking; when every session is
talking the new client is refused. A flood from many source addresses so
churns only sessions that are not talking, and memory stays bounded by the
cap. See `SessionTable` in session.py for the rules and the definition of
talking. `per_ip` is the seam for `udp.max_sessions_per_ip` (`PerIpLimit`;
the worker passes a `GateLimit`, counted across all workers).

Access log: one line per session when it ends (`_end`), never per datagram; a
datagram refused before it has a session (allow/deny, untrusted, bad header,
the limits) writes none: it is counted and rate-logged. Status: ok (idle
expiry, udp.responses reached, stop), upstream_refused (ICMP unreachable),
limit (ended for a new client in a full table). Without an access log the
readers pay one local flag test per datagram, the reply path one attribute test.

Errors never escape a reader callback (it would stop the worker's loop): they
are counted, and logged through a `RateLimitedLog` (one line per second per
cause).
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
from collections import OrderedDict
from functools import partial

from mpproxy.proxy.io.ratelog import RateLimitedLog
from mpproxy.proxy.io.poller import Poller
from mpproxy.proxy.udp import cids, handoff, pktinfo
from mpproxy.proxy.udp.admit import Admission
from mpproxy.proxy.udp.moves import SessionMoves
from mpproxy.proxy.udp.quicroute import RoutedAdmission
from mpproxy.proxy.udp.session import TALKING, PerIpLimit, Session, SessionTable, UdpStats

BUFSIZE = 65536          # > 65507 (largest IPv4 UDP payload) and 65527 (IPv6)
MIN_SWEEP = 0.05         # seconds; the expiry timer's period is
MAX_SWEEP = 1.0          # min(idle_timeout / 4, MAX_SWEEP), at least MIN_SWEEP
DRAIN_IDLE = 2.0         # seconds a draining worker's session waits for late replies

# Errors on a session socket that mean the upstream is gone (ICMP unreachable
# reported on the connected socket): they end the session. Others (EMSGSIZE,
# ENOBUFS, ...) only cost the datagram.
_UPSTREAM_DEAD = frozenset((errno.ECONNREFUSED, errno.EHOSTUNREACH,
                            errno.ENETUNREACH, errno.EHOSTDOWN))
_AGAIN = (BlockingIOError, InterruptedError)
# Session sockets are the C-level socket type: socket.socket's Python __init__ and close()
# cost more per session than the rest of opening one.
_DGRAM_NONBLOCK = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK


class UdpService(SessionMoves):
    """The session table of one UDP listener socket in one worker."""

    def __init__(self, loop, listener, sock: socket.socket, pool, log: logging.Logger,
                 per_ip: PerIpLimit | None = None, access=None, poller: Poller | None = None,
                 clock=None, router=None, peers=None):
        self.stats = UdpStats()
        self._loop = loop
        self._poller = poller if poller is not None else Poller(loop, log)
        self._time = clock if clock is not None else loop.time   # (a test may pass its own)
        self._listener = listener
        self._name = listener.name
        self._lsock = sock
        self._lfd = sock.fileno()
        self._pool = pool
        self._log = log
        self._rl = RateLimitedLog(log)
        self._idle = float(listener.idle_timeout)
        self._period = max(MIN_SWEEP, min(self._idle / 4.0, MAX_SWEEP))
        self._table = SessionTable(listener.udp.max_sessions,       # 0 = unlimited
                                   min(TALKING, self._idle / 4.0) + self._period,
                                   self._time())    # (its `now`: see SessionTable)
        self._sessions: OrderedDict = self._table.active    # the hot path uses it directly
        self._per_ip = per_ip                   # None: no per-IP limit, nothing called
        self._access = access                   # observe.access.AccessLog, or None: no counts
        self._responses = listener.udp.responses
        self._tries = max(1, listener.next_upstream_tries)
        self._wildcard = listener.listen.is_wildcard or pktinfo.is_wildcard(sock)
        self._reading = False
        self._closed = False
        self._handed = False                    # its sessions went to the next worker(s)
        self._timer = None
        self._buf = bytearray(BUFSIZE)          # every datagram is read into this one buffer
        self._view = memoryview(self._buf)
        # router (an edge.sni.SniRouter): sni_routes, new flows routed by their QUIC server
        # name and ALPN (quicroute.py); None: every session goes to `pool`
        self._routed = {} if router is None else {   # upstream name → pool, for adopted sessions
            pool.name: pool for pool in router.values()}
        # routed sessions are also found by their QUIC connection IDs (cids.py); `peers` (a
        # worker.peers.Peers, or None: one worker) finds those of the other workers
        self._cids = None if router is None else cids.CidIndex()
        self._peers = peers
        kind, extra = (Admission, {}) if router is None else \
            (RoutedAdmission, {'router': router, 'arm': self._arm, 'cids': self._cids,
                               'move': self._move,
                               'seek': None if peers is None else self._seek})
        self._admission = kind(listener, sock, self._wildcard, self._table, self.stats,
                               self._rl, self._buf, self._time, per_ip, access is not None,
                               connect=self._connect, end=self._end,
                               upstream_error=self._upstream_error,
                               unexpected=self._unexpected, **extra)

    # -- the interface the worker uses ---------------------------------------

    def start(self) -> None:
        """Begin reading the listener socket (synchronous)."""
        if self._closed:
            raise RuntimeError('UdpService.start() after close()')
        if self._reading:
            return
        self._lsock.setblocking(False)
        if self._wildcard:
            pktinfo.enable(self._lsock)
        self._loop.add_reader(self._lfd, self._admission.reader)
        self._reading = True

    def drain(self) -> None:
        """Stop reading the listener; live sessions go on until they end.

        No client datagram reaches a session any more, so a session now only
        waits for late replies: it ends after DRAIN_IDLE of silence (or its own
        shorter idle_timeout), not after a full idle_timeout.
        """
        self._stop_reading()
        self._admission.drop_pending()
        if self._idle > DRAIN_IDLE:
            self._idle = DRAIN_IDLE
            self._period = max(MIN_SWEEP, DRAIN_IDLE / 4.0)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._sessions and not self._closed:
                self._timer = self._loop.call_later(self._period, self._sweep)

    def counters(self) -> dict[str, int]:
        """What this listener counted, keyed as observe/metrics.py's UDP_SERIES."""
        return self.stats.counters()

    def busy(self) -> bool:
        """True while any session is open."""
        return bool(self._sessions)

    def close(self, graceful: bool = False) -> None:
        """End every session now and stop reading. The listener socket stays open.

        (`graceful` is for the interface shared with TcpService: a datagram has nothing to flush.)
        """
        self._stop_reading()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._admission.drop_pending()
        sessions = list(self._sessions.values())
        for sess in sessions:
            self._end(sess)
        self.stats.sessions_closed += len(sessions)
        self._rl.flush()

    @property
    def key(self) -> tuple:
        """The listener's identity across reloads: (protocol, host, port)."""
        return self._listener.key

    # -- handing sessions over on reload (see handoff.py) ---------------------

    def export_sessions(self) -> list[tuple[dict, socket.socket]]:
        """Stop reading and take every session out of the table, oldest first.

        Returns (description, upstream socket) pairs; the sockets are still open
        and no longer watched: the caller sends them on, then closes them.
        """
        self._stop_reading()
        self._handed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._admission.drop_pending()      # flows still waiting for a ClientHello: dropped
        now = self._time()
        out = []
        for sess in self._sessions.values():
            self._poller.unwatch(sess.fd)
            out.append((handoff.describe(sess, self._wildcard, now), sess.sock))
            sess.sock = None
            if sess.cids:
                self._cids.forget(sess)
            if sess.gated:              # the next worker counts it again
                sess.gated = False
                self._per_ip.release(sess.client[0])
        self._table.clear()
        self.stats.sessions_active -= len(out)
        self.stats.sessions_handed_out += len(out)
        return out

    def end_server(self, upstream: str, label: str) -> int:
        """End the sessions with server `label` of `upstream` (maint); how many."""
        ended = [s for s in self._sessions.values() if s.target.label == label
                 and (s.pool or self._pool).name == upstream]
        for sess in ended:
            self._end(sess, 'maint')
        self.stats.sessions_closed += len(ended)
        return len(ended)

    def pause(self) -> None:
        """Stop reading the listener until `start()`; sessions go on (their replies too)."""
        self._stop_reading()

    def take_queued(self) -> list:
        """Stop reading; what the listener socket still holds, unread: [(addr, anc, data)]
        (carried to the new workers when the flows' slots change)."""
        self._stop_reading()
        return handoff.read_queued(self._lsock, self._wildcard)

    def replay(self, datagrams: list) -> None:
        """Datagrams an old worker carried over: served as if read here now."""
        self._admission.replay(handoff.Replay(datagrams, self._lsock.family))

    def adopt_sessions(self, metas: list, fds: list[int]) -> int:
        """Take over sessions a previous worker handed over; returns how many."""
        now = self._time()
        adopted = 0
        for i, fd in enumerate(fds):
            try:
                sess = handoff.rebuild(metas[i], fd, self._wildcard, now)
                ids = [bytes.fromhex(cid) for cid in metas[i].get('q', ())]
            except (IndexError, KeyError, TypeError, ValueError, OSError):
                socket.close(fd)
                continue
            if not self._admission.admit_adopted(sess):     # this generation's send: v2
                sess.sock.close()
                continue
            if 'p' in metas[i]:         # routed by name: this generation's pool of that name
                sess.pool = self._routed.get(metas[i]['p'])
            old = self._sessions.get(sess.key)
            if old is not None:
                self._end(old)
            try:
                self._poller.watch(sess.fd, partial(self._on_upstream, sess))
            except Exception as exc:
                sess.sock.close()
                self._unexpected(exc, 'watching an adopted session socket')
                continue
            if self._per_ip is not None:    # counted even over the limit: kept anyway
                self._per_ip.adopt(sess.client[0])
                sess.gated = True
            sess.target = (sess.pool or self._pool).adopt(sess.target)   # counted again
            if self._cids is not None and sess.pool is not None:    # a QUIC connection's
                sess.learn = bool(metas[i].get('L'))  # still in its handshake
                for cid in ids:
                    self._cids.learn(sess, cid)
            self._table.add(sess)
            adopted += 1
        stats = self.stats
        stats.sessions_adopted += adopted
        stats.sessions_active += adopted
        if self._sessions and self._timer is None and not self._closed:
            self._timer = self._loop.call_later(self._period, self._sweep)
        return adopted

    # -- replies (the hot path of the other direction) ----------------------

    def _on_upstream(self, sess, events=0):
        """One upstream reply → the client.

        One datagram per callback: request/response traffic has one reply
        waiting, and reading on to EAGAIN would cost a syscall and an
        exception per reply; the loop calls again while more are queued.
        """
        sock = sess.sock
        if sock is None:            # ended earlier in this loop iteration
            return
        stats = self.stats
        try:
            try:
                size = sock.recv_into(self._buf)
            except _AGAIN:
                return
            except OSError as exc:
                self._upstream_error(sess, exc, 'reply from')
                return
            try:
                anc = sess.anc
                if anc is None:
                    self._lsock.sendto(self._view[:size], sess.addr)
                else:
                    self._lsock.sendmsg((self._view[:size],), anc, 0, sess.addr)
                stats.datagrams_out += 1
                stats.bytes_out += size
            except OSError as exc:
                stats.dropped += 1
                self._client_error(sess.addr, exc)
            sess.replies += 1
            if sess.learn:          # QUIC, in its handshake: the server's connection IDs
                self._learned(sess, size)
            if self._access is not None:
                sess.bytes_out += size
            responses = self._responses
            if responses and sess.replies >= responses:
                self._end(sess)
                stats.sessions_completed += 1
            else:
                now = self._table.now
                if sess.last != now:
                    sess.last = now
                    self._sessions.move_to_end(sess.key)
        except Exception as exc:
            self._unexpected(exc, 'relaying replies')

    # -- session life ---------------------------------------------------------

    def _connect(self, key, addr, cdata, now, client, pool=None):
        """Open the session: a socket connected to a server of `pool` (default: the
        listener's), watched, in the table; or None."""
        routed = pool
        if pool is None:
            pool = self._pool
        sock = target = None
        for target in pool.candidates(client if pool.needs_client else None, self._tries):
            # next_upstream_tries: a local failure tries the next server
            try:
                sock = _socket.socket(target.family, _DGRAM_NONBLOCK)
            except OSError as exc:      # EMFILE, ENFILE: no other server would help
                pool.release(target)
                self._rl.error('socket', 'udp %s: cannot create a socket: %s', self._name, exc)
                return None
            try:
                sock.connect(target.sockaddr)
                break
            except OSError as exc:
                pool.release(target)
                sock.close()
                sock = None
                self._rl.warning(('connect', target.label), 'udp %s: cannot connect to %s: %s',
                                 self._name, target.label, exc)
        if sock is None:
            if target is None:
                self._rl.warning('no servers', 'udp %s: upstream %s has no servers, datagram '
                                 'from %s dropped', self._name,
                                 self._listener.upstream if routed is None else routed.name, client)
            return None
        anc = None
        if cdata is not None:
            anc = pktinfo.reply_ancdata(self._lsock.family, cdata)
        sess = Session(key, addr, sock, anc, target, now, client)
        sess.pool = routed
        try:
            self._poller.watch(sess.fd, partial(self._on_upstream, sess))
        except Exception as exc:
            sock.close()
            pool.release(target)
            self._unexpected(exc, 'watching a session socket')
            return None
        self._table.add(sess)
        stats = self.stats
        stats.sessions_created += 1
        stats.sessions_active += 1
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(self._period, self._sweep)
        return sess

    def _end(self, sess, status: str = 'ok') -> None:
        """OPEN → CLOSED. The caller counts why; `status` is the access log's."""
        sock = sess.sock
        if sock is None:
            return
        sess.sock = None
        self._table.remove(sess)
        if sess.cids:
            self._cids.forget(sess)
        if sess.gated:
            sess.gated = False
            self._per_ip.release(sess.client[0])
        self._poller.close_socket(sess.fd, sock)     # (which takes it out of the epoll)
        (sess.pool or self._pool).release(sess.target)
        self.stats.sessions_active -= 1
        if self._access is not None:
            self._access.write(self._name, 'udp', sess.client, sess.target.sockaddr, status,
                               sess.bytes_in, sess.bytes_out, None, self._time() - sess.started,
                               (sess.datagrams_in, sess.replies))

    def _sweep(self):
        """The expiry timer: end sessions idle for idle_timeout, from the table's front."""
        self._timer = None
        sessions = self._sessions
        table = self._table
        try:
            table.now = now = self._time()
            cutoff = now - self._idle
            expired = 0
            while sessions:
                sess = next(iter(sessions.values()))
                if sess.last > cutoff:
                    break
                self._end(sess)
                expired += 1
            self.stats.sessions_expired += expired
            self._admission.expire(now)         # sni_routes: flows held past their deadline
            if table.full_at is not None and now - table.full_at >= self._rl.interval:
                # the table stopped overflowing: write out the suppressed counts now,
                # not at the next overflow or at close()
                table.full_at = None
                self._rl.flush()
        except Exception as exc:
            self._unexpected(exc, 'expiring sessions')
        if (sessions or self._admission.pending) and not self._closed:
            self._timer = self._loop.call_later(self._period, self._sweep)

    def _arm(self) -> None:
        """Make sure the sweep timer runs (a flow is held: quicroute.py)."""
        if self._timer is None and not self._closed:
            self._timer = self._loop.call_later(self._period, self._sweep)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            try:
                self._loop.remove_reader(self._lfd)
            except Exception:
                pass

    # -- errors (off the hot path) ---------------------------------------------

    def _upstream_error(self, sess, exc: OSError, what: str) -> None:
        """An error on a session socket: the upstream is gone, or one datagram is lost."""
        if isinstance(exc, _AGAIN):         # socket buffer full: the datagram is lost
            return
        label = sess.target.label
        if exc.errno in _UPSTREAM_DEAD:
            (sess.pool or self._pool).failed(sess.target)
            self._end(sess, 'upstream_refused')
            self.stats.sessions_failed += 1
            self._rl.warning((exc.errno, label), 'udp %s: %s upstream %s: %s; session of %s ended',
                             self._name, what, label, exc.strerror or exc, sess.client)
        else:
            self._rl.warning((exc.errno, label), 'udp %s: %s upstream %s: %s; datagram dropped',
                             self._name, what, label, exc.strerror or exc)

    def _client_error(self, addr, exc: OSError) -> None:
        if isinstance(exc, _AGAIN):
            return
        self._rl.warning(('client', exc.errno), 'udp %s: send to client %s: %s; reply dropped',
                         self._name, addr, exc.strerror or exc)

    def _unexpected(self, exc: BaseException, where: str) -> None:
        try:
            self._rl.error(('bug', where), 'udp %s: unexpected error %s: %r',
                           self._name, where, exc, exc_info=exc)
        except Exception:
            pass
