"""A UDP session and the counters of a UDP service (see udp.py for how they are used)."""

from __future__ import annotations


class UdpStats:
    """Counters of one UdpService. Read them as attributes or with `as_dict()`."""

    __slots__ = ('datagrams_in', 'datagrams_out', 'sessions_created', 'sessions_expired',
                 'sessions_completed', 'sessions_failed', 'sessions_closed',
                 'sessions_active', 'dropped', 'sessions_handed_out', 'sessions_adopted', 'denied')

    # datagrams_in       datagrams read from clients (including dropped ones)
    # datagrams_out      replies sent to clients
    # sessions_created   sessions opened
    # sessions_expired   ended by idle_timeout
    # sessions_completed ended after udp.responses replies
    # sessions_failed    ended by an upstream error (ECONNREFUSED, unreachable)
    # sessions_closed    ended by close()
    # sessions_handed_out  given to the next worker of this slot on reload
    # sessions_adopted   taken over from the previous worker of this slot
    # denied             datagrams from clients that allow/deny refuse
    # sessions_active    open now (= created + adopted - the five above)
    # dropped            datagrams lost either way: table full, no server,
    #                    send errors to an upstream or to a client

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return 'UdpStats(%s)' % ', '.join('%s=%d' % kv for kv in self.as_dict().items())


class Session:
    """One client flow: a connected socket to one upstream server.

    ::

        client datagram, no session ──(table full / no server)──▶ dropped
                    │ socket(); connect(server); add_reader
                    ▼
                  OPEN ◀── a datagram either way: last = now, move to table end
                    │
                    ├─ idle_timeout without datagrams ──▶ expired  ┐
                    ├─ reply number udp.responses sent ─▶ completed │
                    ├─ ECONNREFUSED / unreachable ──────▶ failed   ├─▶ CLOSED
                    └─ UdpService.close() ──────────────▶ closed   ┘   (remove_reader,
                                                                       close socket,
                                                                       out of table,
                                                                       sock = None)

    A CLOSED session is never reopened; the client's next datagram creates a
    new session (new socket, new source port, next server in balancing order).
    """

    __slots__ = ('key', 'addr', 'sock', 'fd', 'anc', 'target', 'replies', 'last')

    def __init__(self, key, addr, sock, anc, target, now):
        self.key = key              # table key: addr, or (addr, local dst) for wildcards
        self.addr = addr            # client address, as recvfrom() gave it
        self.sock = sock            # connected upstream socket; None once CLOSED
        self.fd = sock.fileno()
        self.anc = anc              # sendmsg() pktinfo for wildcard listeners, else None
        self.target = target        # upstream.pool.Target
        self.replies = 0            # replies received from the upstream
        self.last = now             # loop.time() of the last datagram either way
