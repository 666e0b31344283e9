"""A relay: one client connection and its upstream connection, from accept to close.

One object per connection: `Relay` holds the connection's state and its two
sockets, each an `End` (end.py) that writes what it reads straight to the other.
The service hands it an accepted socket (`start`); the relay reads its preamble
(preamble.py: a PROXY header, a ClientHello), connects to an upstream server,
then the bytes go both ways until both are done.

A relay's states (its `state` field; the names in states.py)::

    PREAMBLE --routed--> CONNECTING --connected--> RELAYING --one side's FIN--> HALF_CLOSED
        |                 |      ^                    |        (passed on)          |
        |    out of files |      | a file is free     |                             | the other FIN,
        |                 v      |                    |                             | half_close_timeout
        |            WAITING_FOR_FILES                |                             v
        +-- bad header, denied, no route, ------------+-- RST, idle_timeout, ----> CLOSED
            every try failed (CONNECTING too)             a FIN with half_close: false  ^
    RELAYING, HALF_CLOSED --drain deadline--> FINISHING --both FINs, or the abort------+

`status` names why a relay ended when it was not its peers' doing (the access
log's status; None = ok): upstream_refused / timeout (every try failed; the
last one refused or timed out), idle_timeout (idle or half-close timeout),
bad_header, denied, limit (preamble.py), no_route (sni). `started`, `routed`
and `connect_time` are only read by the access log (loop times; zero without it).

Both ends are closed explicitly once both directions are done, and a relay
stays in its service's table until both report `on_lost`.
"""

from __future__ import annotations

import socket
import time

from mpproxy.config.schema import Keepalive
from mpproxy.config.values import format_sockaddr
from mpproxy.proxy.tcp import accept
from mpproxy.proxy.tcp.end import End, ThrottledEnd
from mpproxy.proxy.tcp.preamble import Preamble
from mpproxy.proxy.tcp.states import (CLOSED, CONNECTING, FINISHING, HALF_CLOSED, PREAMBLE,
                                      RELAYING, WAITING_FOR_FILES)

IDLE_TICKS = 4


class TcpCounts:
    """What one TCP listener counts in one worker (read by its service's `counters()`):
    clients accepted, refused (denied, limit, bad PROXY header), failed (no upstream could
    be connected), and the bytes that relays which ended read from clients and upstreams."""

    __slots__ = ('accepted', 'denied', 'limited', 'bad_headers', 'failed', 'received', 'sent')

    def __init__(self):
        self.accepted = self.denied = self.limited = self.bad_headers = self.failed = 0
        self.received = self.sent = 0


class RelayContext:
    """What a relay uses of its listener, one per listener and worker (STYLE rule 12: a
    per-connection object gets a small context, not its owner): the listener's settings,
    the loop, poller, wheel and default pool, the preamble's rules, logs, counts, the set of
    open relays, and the service's callbacks."""

    __slots__ = ('loop', 'listener', 'poller', 'wheel', 'pool', 'sni', 'trusted',
                 'send_header', 'log', 'ratelog', 'access', 'counts', 'relays', 'admit',
                 'forget', 'starving', 'out_of_files')

    def __init__(self, loop, listener, poller, wheel, pool, log, ratelog, *, sni=None,
                 trusted=None, send_header=None, access=None, counts=None, relays=None,
                 admit=None, forget=None, starving=None, out_of_files=None):
        self.loop = loop
        self.listener = listener          # config.schema.Listener: the settings
        self.poller = poller              # io.poller.Poller: the relays' sockets
        self.wheel = wheel                # io.wheel.Wheel: the relays' timeouts
        self.pool = pool                  # the listener's upstream (SNI may pick another)
        self.log = log
        self.ratelog = ratelog
        self.sni = sni                    # edge.sni.SniRouter, with sni_routes
        self.trusted = trusted            # edge.acl.Acl of proxy_protocol.trusted (accept)
        self.send_header = send_header    # proxy_protocol.send: v1 or v2 writer, or None
        self.access = access              # observe.access.AccessLog, or None
        self.counts = counts if counts is not None else TcpCounts()
        self.relays = relays if relays is not None else set()   # open relays
        self.admit = admit                # admit(address) -> (limit key, refused reason)
        self.forget = forget              # forget(relay): it ended
        self.starving = starving          # starving(relay, on): waits for a file, or not
        self.out_of_files = out_of_files  # out_of_files(what, exc): accepting pauses


class Relay(Preamble):
    """One client connection and its upstream connection."""

    __slots__ = ('ctx', 'loop', 'client', 'upstream', 'early', 'client_addr', 'target',
                 'candidates',
                 'trying', 'seen', 'quiet', 'timer', 'half_timer', 'state',
                 'connecting', 'pool', 'peeking', 'files_deadline', 'limit_key',
                 'local_addr', 'status', 'started', 'routed', 'connect_time',
                 'connect_started')

    def __init__(self, ctx: RelayContext, client_addr):
        self.ctx = ctx
        self.loop = ctx.loop
        self.client: End | None = None              # the accepted socket (start)
        self.upstream: End | None = None            # the connected upstream socket
        self.early: list[bytes] | None = []         # client bytes until the upstream is
                                                    # linked (None from then on)
        self.client_addr = client_addr              # (host, port, ...) as accept() gave it;
                                                    # None: not asked (client_address())
        self.target = None                          # the server connected to
        self.candidates = None                      # iterator over the servers to try
        self.trying = None                          # the server being connected to
        self.seen = 0                               # bytes relayed when the idle timer last ran
        self.quiet = 0                              # idle ticks in a row without a byte
        self.half_timer = None                      # a wheel.Entry (half_close_timeout)
        self.timer = None                           # a wheel.Entry (connect, idle, preamble)
                                                    # or a TimerHandle (out-of-files retry)
        self.state = PREAMBLE
        self.connecting: End | None = None          # the upstream socket being connected
        self.pool = ctx.pool
        self.peeking = None                         # a preamble stage: 'proxy' or 'sni'
        self.files_deadline = None                  # out of files: retry connecting until then
        self.limit_key = None                       # the client's key in the shared limits
        self.local_addr = None                      # the address the client connected to, as
                                                    # its PROXY header said
        self.status = None                          # why it ended, for the access log
        self.started = self.loop.time() if ctx.access is not None else 0.0
        self.routed = self.connect_time = 0.0       # first connect try; its duration
        self.connect_started = 0.0                  # when the last connect began (monotonic;
                                                    # the loop's clock has 1 ms steps)

    # -- CONNECTING ---------------------------------------------------------------------
    def start(self, sock) -> None:
        """Take the accepted client socket (raises OSError when it cannot be registered)."""
        ctx = self.ctx
        rate = ctx.listener.upload_rate
        if rate:
            self.client = ThrottledEnd.accepted(self, ctx.poller, sock).throttle(self.loop, rate)
        else:
            self.client = End.accepted(self, ctx.poller, sock)
        ctx.relays.add(self)
        self.begin()              # the preamble, then _route()

    def hold(self, data: bytes) -> None:
        """Client bytes before the upstream is linked: kept for it (and peeked at)."""
        self.early.append(data)
        if self.peeking:
            self.peek()

    def _route(self, pool) -> None:
        self.state = CONNECTING
        self.pool = pool
        if self.ctx.access is not None:
            self.routed = self.loop.time()
        self.candidates = iter(pool.candidates(
            self.client_address() if pool.needs_client else None,
            self.ctx.listener.next_upstream_tries))
        self._try_next()

    def client_address(self):
        """The client's (host, port); asked of the socket the first time if accept() did not
        say (None if the client is gone by then)."""
        addr = self.client_addr
        if addr is None:
            addr = self.client_addr = self.client.peername()
        return addr

    def _try_next(self) -> None:
        """Connect to the next candidate server, or close the client when none is left."""
        target = next(self.candidates, None)
        if target is None:
            if self.status is None:
                self.status = 'upstream_refused'
            self.ctx.counts.failed += 1
            self.ctx.log.error('no upstream could be connected for client %s, listener: %s; '
                                   'closing the client connection',
                                   format_sockaddr(self.client_address()), self.ctx.listener.name)
            self.close()
            return
        self.trying = target
        self._connect()

    def _connect(self) -> None:
        """One connect to `self.trying`: an End (end.py) and one timer."""
        target = self.trying
        rate = self.ctx.listener.download_rate
        self.connect_started = time.monotonic()
        try:
            end = (ThrottledEnd if rate else End).connect(self, self.ctx.poller, target.family,
                                                          target.sockaddr)
        except OSError as exc:
            self.connect_failed(exc)
            return
        if rate:
            end.throttle(self.loop, rate)
        self.connecting = end
        self.timer = self.ctx.wheel.call_later(self.ctx.listener.connect_timeout,
                                                   self._connect_timed_out)

    def _connect_timed_out(self) -> None:
        self.timer = None
        stream, self.connecting = self.connecting, None
        if stream is not None:
            stream.abort()
            self.connect_failed(None)

    def connect_failed(self, exc: OSError | None) -> None:
        """The connect to `self.trying` failed (`exc`) or timed out (None)."""
        self.connecting = None
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
        if self.state is CLOSED:
            return
        if exc is not None and exc.errno in accept.EXHAUSTED:
            if self._wait_for_files(exc):
                return            # not the server's fault: the same server, once a file is free
            self.pool.release(self.trying)
            self.status = 'upstream_refused'
            self.ctx.counts.failed += 1
            self.ctx.log.error('no file for an upstream connection in %gs, client: %s, '
                                   'listener: %s; closing the client connection',
                                   self.ctx.listener.connect_timeout,
                                   format_sockaddr(self.client_address()), self.ctx.listener.name)
            self.close()
            return
        self.pool.release(self.trying)
        self.pool.failed(self.trying)
        reason = 'timed out' if exc is None else _oserror_text(exc)
        self.status = 'timeout' if exc is None else 'upstream_refused'
        self.ctx.log.warning('connect() to %s failed (%s) while connecting to upstream, '
                                 'client: %s, listener: %s', self.trying.label, reason,
                                 format_sockaddr(self.client_address()), self.ctx.listener.name)
        self._try_next()

    def _wait_for_files(self, exc: OSError) -> bool:
        """Out of files for the upstream socket: retry this server soon, for at most
        connect_timeout (False when that time is up). Meanwhile the service accepts no
        one: a new client would take the file this one waits for."""
        now = self.loop.time()
        svc = self.ctx
        if self.files_deadline is None:
            self.files_deadline = now + svc.listener.connect_timeout
            svc.starving(self, True)
        elif now >= self.files_deadline:
            svc.starving(self, False)
            return False
        svc.out_of_files('socket() for an upstream connection', exc)
        self.state = WAITING_FOR_FILES
        self.timer = self.loop.call_later(accept.PAUSE_MIN, self._retry_connect)
        return True

    def _retry_connect(self) -> None:
        self.timer = None
        if self.state is not CLOSED:
            self.state = CONNECTING
            self._connect()

    # -- OPEN ---------------------------------------------------------------------------
    def opened(self, upstream: End) -> None:
        """The connect to `self.trying` succeeded: link the ends, send what was held."""
        self.connecting = None
        if self.state is CLOSED:          # the client went away while we were connecting
            upstream.close()
            return
        self.state = RELAYING
        if self.files_deadline is not None:
            self.ctx.starving(self, False)
        self.target = self.trying
        self.pool.succeeded(self.target, time.monotonic() - self.connect_started)
        self.status = None                          # an earlier try's failure is not the end
        if self.ctx.access is not None:
            self.connect_time = self.loop.time() - self.routed
        client = self.client
        self.upstream = upstream
        client.peer = upstream
        upstream.peer = client
        keepalive = self.ctx.listener.keepalive
        if keepalive is not None:
            _set_keepalive(client.sock, keepalive)
            _set_keepalive(upstream.sock, keepalive)
        early, self.early = self.early, None
        if self.ctx.send_header is not None:
            upstream.write(self._proxy_header())
        if early:
            upstream.write(b''.join(early))
        if client.lost:           # the client went away while we were connecting
            self.close()
            return
        self._arm_idle()
        if client.eof:            # its FIN came while we were connecting
            self.on_eof(client)
        if self.state is CLOSED:
            return
        client.flow_paused(False)     # reading starts, unless the upload rate holds it

    def _proxy_header(self) -> bytes:
        """proxy_protocol.send: the client and the address it connected to, v1 or v2."""
        local = self.local_addr or self.client.sockname()
        return self.ctx.send_header(self.client_addr[:2], local[:2])

    def on_eof(self, end: End) -> None:
        """`end`'s peer sent FIN: pass it on (half-close), or close when both did."""
        if self.early is not None:        # before the upstream is linked: the client's
            if self.peeking:
                self.peek(eof=True)
            return                        # (opened() looks at client.eof)
        if self.state is FINISHING:
            if self.client.eof and self.upstream.eof:
                self.close()
            return
        peer = end.peer
        if peer is None or self.state is CLOSED:
            return
        if peer.eof:              # both directions are done
            self.close()
            return
        if peer.closing or not self.ctx.listener.half_close:  # half_close: false: one FIN
            self.close()          # ends both (what both sockets hold is sent first)
            return
        peer.write_eof()          # pass the FIN on; the other direction goes on
        if self.state is not HALF_CLOSED:   # half_close_timeout is not extended by traffic
            self.state = HALF_CLOSED
            self.half_timer = self.ctx.wheel.call_later(
                self.ctx.listener.half_close_timeout, self._on_half_close_timeout)

    def on_lost(self, end: End, exc) -> None:
        if self.state is not CLOSED:
            self.close()
        self._maybe_forget()

    # -- timers -------------------------------------------------------------------------
    # Idle time is checked by a timer that ticks every idle_timeout / IDLE_TICKS and compares
    # the byte counters, so the data path never reads the clock: a pair is closed after
    # between idle_timeout and (1 + 1/IDLE_TICKS) x idle_timeout without a byte either way.
    def _arm_idle(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.seen = self.client.received + self.upstream.received
        self.quiet = 0
        self.timer = self.ctx.wheel.call_later(self.ctx.listener.idle_timeout / IDLE_TICKS,
                                                   self._on_idle_tick)

    def _on_idle_tick(self) -> None:
        self.timer = None
        if self.state is CLOSED:
            return
        total = self.client.received + self.upstream.received
        if total != self.seen:
            self.seen = total
            self.quiet = 0
        else:
            self.quiet += 1
            if self.quiet > IDLE_TICKS:
                self.ctx.log.info('idle timeout, closing client %s',
                                      format_sockaddr(self.client_address()))
                self.status = 'idle_timeout'
                self.close()
                return
        self.timer = self.ctx.wheel.call_later(self.ctx.listener.idle_timeout / IDLE_TICKS,
                                                   self._on_idle_tick)

    def _on_half_close_timeout(self) -> None:
        self.half_timer = None
        if self.state is not CLOSED:
            self.ctx.log.info('half-close timeout, closing client %s',
                                  format_sockaddr(self.client_address()))
            self.status = 'idle_timeout'
            self.close()

    # -- CLOSED -------------------------------------------------------------------------
    def close(self) -> None:
        """Close both ends (flushing what they hold); idempotent."""
        if self.state is CLOSED:
            return
        self.state = CLOSED
        for timer in (self.timer, self.half_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.half_timer = None
        stream, self.connecting = self.connecting, None
        if stream is not None:    # still connecting: the try is over
            stream.abort()
            if self.target is None:
                self.pool.release(self.trying)
        for end in (self.client, self.upstream):
            if end is not None:
                end.stop()
                if not end.lost:
                    end.close()
        self._maybe_forget()

    def finish(self) -> None:
        """The drain deadline: FIN both ways now and drop what still arrives.

        A plain close() with unread input would make the kernel send RST; this
        lingering close lets each peer read to EOF first. The relay closes when
        both peers answered with FIN; the worker aborts what is left later.
        """
        if self.state is CLOSED or self.state is FINISHING:
            return
        upstream = self.upstream
        if upstream is None:       # still connecting: nothing to flush
            self.close()
            return
        self.state = FINISHING
        for end in (self.client, upstream):
            end.peer = _DISCARD
            if end.lost or end.closing:
                continue
            end.write_eof()
            end.resume_reading()
        if self.client.eof and upstream.eof:
            self.close()

    def abort(self) -> None:
        """Close both ends now, dropping buffered data (fast stop)."""
        self.close()
        for end in (self.client, self.upstream):
            if end is not None and not end.lost:
                end.abort()

    def _maybe_forget(self) -> None:
        if self.state is not CLOSED:
            return
        for end in (self.client, self.upstream):
            if end is not None and not end.lost:
                return
        if self.client.relay is None:
            return                                       # forgotten already
        self.ctx.forget(self)
        if self.target is not None:
            self.pool.release(self.target)
        self.client.peer = self.client.relay = None     # break the cycles: freed by refcount,
        if self.upstream is not None:                    # not by the cyclic GC
            self.upstream.peer = self.upstream.relay = None
        self.candidates = None



class _Discard:
    """Stands in for an end's peer once a relay is finishing: what is read is dropped."""

    __slots__ = ()
    lost = False

    def write(self, data) -> None:
        pass

    def flow_paused(self, on: bool) -> None:
        pass


_DISCARD = _Discard()


def _set_keepalive(sock, ka: Keepalive) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if ka.idle is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(ka.idle)))
        if ka.interval is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(ka.interval)))
        if ka.count is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, ka.count)
    except OSError:
        pass


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or str(exc)

