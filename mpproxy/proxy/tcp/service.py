"""TCP listeners: one `TcpService` per listener in each worker.

A client connection is accepted by the service's `Acceptor` (accept.py) on the
shared listening socket, checked (allow/deny, the shared limits; or, with
`proxy_protocol.accept`, only that the peer is trusted: the rest waits for its
header) and handed to a new `Relay` (relay.py), which puts it on the worker's
poller. Refused clients are reset before any relay exists.

With an access log, each relay writes its line when it is forgotten (`forget`),
and each client refused here one line (denied / limit) before it is reset.
"""

from __future__ import annotations

import _socket
import asyncio
import socket
import struct

from mpproxy.config.schema import Listener
from mpproxy.config.values import format_sockaddr
from mpproxy.proxy.edge import acl, proxy_header, sni
from mpproxy.proxy.io.ratelog import RateLimitedLog
from mpproxy.proxy.io.poller import Poller
from mpproxy.proxy.io.wheel import Wheel
from mpproxy.proxy.tcp import accept
from mpproxy.proxy.tcp.accept import Acceptor
from mpproxy.proxy.tcp.relay import Relay, RelayContext, TcpCounts
from mpproxy.shared import limits
from mpproxy.upstream.pool import UpstreamPool


ADMITTED = (None, None)                  # admit(): nothing counted, nothing refused
REFUSED_DENIED = (None, 'denied')
REFUSED_LIMIT = (None, 'limit')


class TcpService:
    """One TCP listener in one worker: accepts on the (shared) socket, runs the relays."""

    def __init__(self, loop, listener: Listener, sock: socket.socket, pool: UpstreamPool, log,
                 sni_router: 'sni.SniRouter | None' = None, gate: 'limits.Gate | None' = None,
                 access=None, shared: bool = True, poller: Poller | None = None):
        self.loop = loop
        self.poller = poller if poller is not None else Poller(loop, log)
        self.wheel = Wheel(loop, log)     # the relays' timeouts
        self.listener = listener
        self.sock = sock
        self.family = int(sock.family)    # (the property costs 0.5 us a read)
        self.pool = pool
        self.log = log
        self.sni = sni_router             # with sni_routes: server name -> pool
        self.acl = acl.for_listener(listener)
        pp = listener.proxy_protocol      # trusted: who may send a PROXY header (accept: true)
        self.trusted = acl.Acl(allow=pp.trusted) if pp.accept else None
        self.send_header = {'v1': proxy_header.v1, 'v2': proxy_header.v2}.get(pp.send)
        self.gate = gate                  # the shared limits, or None
        self.access = access              # the worker's observe.access.AccessLog, or None
        self.counts = TcpCounts()         # read by counters() (observe/metrics.py)
        self.ratelog = RateLimitedLog(log)
        self.relays: set[Relay] = set()
        self.starved: set[Relay] = set()  # relays waiting for a file for their upstream socket
        room = self._room if gate is not None and gate.max_total else None
        # Who needs the client's address at accept; otherwise a relay asks for it (getpeername)
        # only if it logs an error about the client.
        needs_address = (self.trusted is not None or self.acl is not None or gate is not None
                         or access is not None or self.send_header is not None
                         or pool.needs_client or sni_router is not None)
        self.acceptor = Acceptor(loop, sock, self._accepted, self.ratelog, listener.name, room,
                                 accept.BATCH_SHARED if shared else accept.BATCH,
                                 anonymous=not needs_address)
        self.ctx = RelayContext(loop, listener, self.poller, self.wheel, pool, log, self.ratelog,
                                sni=sni_router, trusted=self.trusted,
                                send_header=self.send_header, access=access, counts=self.counts,
                                relays=self.relays, admit=self.admit, forget=self.forget,
                                starving=self.starving, out_of_files=self.acceptor.out_of_files)

    def counters(self) -> dict[str, int]:
        """What this listener counted, keyed as observe/metrics.py's TCP_SERIES; open
        connections count the bytes they relayed so far."""
        counts = self.counts
        received, sent = counts.received, counts.sent
        for relay in self.relays:
            received += relay.client.received
            upstream = relay.upstream
            if upstream is not None:
                sent += upstream.received
        return {'accepted': counts.accepted, 'denied': counts.denied,
                'limited': counts.limited, 'bad_headers': counts.bad_headers,
                'failed': counts.failed,
                'received_bytes': received, 'sent_bytes': sent, 'active': len(self.relays)}

    async def start(self) -> None:
        await _open_emfile_reserve(self.loop)
        try:      # accepted sockets inherit it from the listener: no setsockopt per client
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.acceptor.start()

    def _accepted(self, fd: int, address) -> None:
        """A new client (an accepted fd): check it, then hand it to a Relay."""
        self.counts.accepted += 1
        if address is None:              # accept4(): non-blocking, and nothing to check
            self._take(fd, None, None)
            return
        if self.trusted is None:
            key, refused = self.admit(address)
        elif self.trusted.permits(address[0]):
            key, refused = ADMITTED       # checked once its PROXY header tells who it is
        else:
            self.counts.denied += 1
            self.ratelog.warning('untrusted', 'tcp %s: client %s is not in '
                                 'proxy_protocol.trusted; closing', self.listener.name,
                                 format_sockaddr(address))
            key, refused = None, 'denied'
        if refused is not None:
            _reset(socket.socket(self.family, socket.SOCK_STREAM, 0, fd))
            if self.access is not None:
                self.access.refused(self.listener.name, 'tcp', address, refused)
            return
        self._take(fd, address, key)

    def _take(self, fd: int, address, key) -> None:
        """An admitted client: a Relay for its fd."""
        sock = _socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
        relay = Relay(self.ctx, address)
        relay.limit_key = key
        try:
            if address is not None:
                sock.setblocking(False)
            relay.start(sock)
        except OSError as exc:
            sock.close()
            self._release(key)
            self.ratelog.error(('wrap', exc.errno), 'tcp %s: cannot take client %s: %s',
                               self.listener.name, format_sockaddr(address), exc.strerror or exc)

    def admit(self, address) -> tuple[bytes | None, str | None]:
        """allow/deny, then the shared limits, for a client at `address`: (its key in the
        limits or None when nothing is counted, None) when admitted; (None, the access
        log's status: 'denied' or 'limit') when refused, counted and logged here."""
        if self.acl is not None and not self.acl.permits(address[0]):
            self.counts.denied += 1
            self.ratelog.info('denied', 'tcp %s: client %s denied by allow/deny',
                              self.listener.name, format_sockaddr(address))
            return REFUSED_DENIED
        gate = self.gate
        if gate is None:
            return ADMITTED
        key = limits.ip_key(address[0])
        why = gate.try_acquire(key)
        if why is None:
            return key, None
        self.counts.limited += 1
        self.ratelog.warning(('limit', why), 'tcp %s: client %s refused: %s (%d) reached',
                             self.listener.name, format_sockaddr(address), why,
                             gate.max_total if why == 'max_connections' else gate.max_per_ip)
        return REFUSED_LIMIT

    def _room(self) -> bool:
        gate = self.gate
        return gate.count(gate.index) < gate.max_total

    def _release(self, key) -> None:
        if key is not None:
            self.gate.release(key)

    def forget(self, relay: Relay) -> None:
        self.relays.discard(relay)
        self.counts.received += relay.client.received
        if relay.upstream is not None:
            self.counts.sent += relay.upstream.received
        self._release(relay.limit_key)
        relay.limit_key = None
        if relay.files_deadline is not None:
            self.starving(relay, False)
        if not self.starved:
            self.acceptor.freed()
        if self.access is not None:
            self._log_relay(relay)

    def _log_relay(self, relay: Relay) -> None:
        """The access log line of a relay that ended (see observe/access.py for the fields)."""
        target = relay.target or relay.trying             # connected to, else tried last
        upstream = relay.upstream
        self.access.write(
            self.listener.name, 'tcp', relay.client_addr,
            target.sockaddr if target is not None else None, relay.status or 'ok',
            relay.client.received, upstream.received if upstream is not None else 0,
            relay.connect_time if relay.target is not None else None,
            self.loop.time() - relay.started)

    def end_server(self, upstream: str, label: str) -> int:
        """Close the relays connected to server `label` of `upstream` (maint); how many."""
        ended = 0
        for relay in list(self.relays):
            target = relay.target
            if target is not None and target.label == label and relay.pool.name == upstream:
                relay.close()
                ended += 1
        return ended

    def starving(self, relay: Relay, on: bool) -> None:
        """`relay` waits (on) or no longer waits (off) for a file for its upstream socket."""
        if on:
            self.starved.add(relay)
        else:
            self.starved.discard(relay)
            relay.files_deadline = None
        self.acceptor.hold('out of files', bool(self.starved))

    def drain(self) -> None:
        """Stop accepting and close this worker's copy of the listening socket; relays
        already open go on. Once every process that holds the socket closed it (at QUIT: the
        master and every worker; on a reload the new workers keep theirs), the kernel
        refuses new clients instead of queueing them for nobody (nginx closes its listening
        sockets on QUIT the same way)."""
        self.acceptor.stop()
        if self.sock.fileno() >= 0:
            self.sock.close()

    def busy(self) -> bool:
        return bool(self.relays)

    def close(self, graceful: bool = False) -> None:
        """Stop accepting and end every relay: with FIN after what is buffered, or at once."""
        self.drain()
        for relay in list(self.relays):
            if graceful:
                relay.finish()
            else:
                relay.abort()
        self.ratelog.flush()


async def _open_emfile_reserve(loop) -> None:
    """Make libuv open its one-time reserve fd now rather than later.

    libuv opens /dev/null once per loop, with the loop's first stream handle (a
    reserve it frees on EMFILE). Relays do not use libuv streams (tcp/end.py),
    but the health checker's connects do: a worker that opens it at boot has a
    flat fd count from then on, so a leak shows as a leak.
    """
    a, b = socket.socketpair()
    try:
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        transport.abort()
    finally:
        b.close()


_LINGER_RESET = struct.pack('ii', 1, 0)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): a refused client holds no state here or in TIME_WAIT."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()
