"""QUIC sessions that follow their client: `SessionMoves`, the part of `UdpService` that moves
a routed session to its client's new address (sni_routes only; see cids.py for why and when).

    a reply of a routed session, in the handshake ──▶ _learned: the server's ID → CidIndex
    a new flow's datagram with a session's ID ──▶ (admission) _move: re-keyed here
    ... or, a short header no ID here matches ──▶ _seek: asked of the other workers
                                                   (worker/peers.py) ──▶ give, there ──▶ take, here

A mixin, not an object of its own (as worker/handover.py is the Worker's): moving a session
is session life, and reads what the service owns (its table, poller, pools, per-IP limit,
counters, the CidIndex `_cids` and the peers `_peers`) as the service's other methods do.
"""

from __future__ import annotations

from mpproxy.proxy.udp import cids, handoff, pktinfo

BACK_AFTER = 1.0          # seconds in which the first BACK_LATE packets from the address a
BACK_LATE = 3             # session just left are taken for late ones, reordered, and dropped
                          # (not followed back); a client that goes on sending from there is
                          # followed back (an attacker's one packet does not lock it out)


def may_move(sess, client, now: float) -> bool:
    """Whether `sess` may follow its client to `client` now (see BACK_AFTER); counts the
    packets it does not follow."""
    moved = sess.moved
    if moved is None or moved[0] != client or now - moved[1] >= BACK_AFTER \
            or moved[2] >= BACK_LATE:
        return True
    moved[2] += 1
    return False


class SessionMoves:
    """UdpService's methods for QUIC sessions that follow their client (see the module doc)."""

    def _learned(self, sess, size: int) -> None:
        """A reply of a routed session still in its QUIC handshake (in the buffer): the ID
        its server chose, from a long header; the first short header ends the learning."""
        buf = self._buf
        if buf[0] & 0x80:
            self._cids.learn(sess, cids.server_cid(buf, size))
        else:
            sess.learn = False

    def _move(self, sess, key, addr, cdata, now: float, client=None, told=None) -> None:
        """A packet from `addr` carried an ID of `sess`: its client moved there (NAT
        rebinding). The session is found by the new address, and its replies go there.
        With proxy_protocol.accept `client` and `told` are what the packet's header named
        (the caller puts the session's new send: v2 header in place)."""
        old = sess.client
        client = client or addr
        self._table.rekey(sess, key)
        sess.addr, sess.client, sess.told = addr, client, told
        sess.moved = [old, now, 0]
        sess.anc = None if cdata is None else pktinfo.reply_ancdata(self._lsock.family, cdata)
        sess.last = now
        if sess.gated and old[0] != client[0]:      # counted under its new IP from now on
            self._per_ip.release(old[0])
            self._per_ip.adopt(client[0])
        self.stats.quic_moved += 1
        self._rl.info(('moved', 'here'), 'udp %s: QUIC connection of %s moved to %s', self._name,
                      old, client)

    def _seek(self, key, addr, cdata, probe: bytes, client, told, question: int) -> int | None:
        """Ask the other workers for the session whose ID `probe` (a short header) carries:
        the client moved, and the kernel now steers its flow to this worker. (`client`,
        `told`: what its PROXY header named, with proxy_protocol.accept.) Returns how many
        were asked (None: one could not be); each answers (`answered`) or gives the session."""
        anc = None if cdata is None else pktinfo.reply_ancdata(self._lsock.family, cdata)
        where = {'a': list(addr), 'd': key[1].hex() if self._wildcard and key[1] else None,
                 'n': [[lv, ty, bytes(cd).hex()] for lv, ty, cd in anc] if anc else None}
        if client is not None and client != addr:
            where['c'] = list(client)
        if told is not None:
            where['t'] = list(told)
        return self._peers.seek(self.key, where, probe, question)

    def answered(self, question: int, kept: bool) -> None:
        """A worker has no session for our question (`kept`: has it and keeps it)."""
        if not self._closed:
            self._admission.answered(question, kept, self._time())

    def give(self, probe: bytes, where: dict, send) -> str | None:
        """Another worker got a packet with an ID of one of our sessions from a new client
        address (`where`: its 'a', 'd', 'n' (and 'c', 't') as handoff.describe writes them):
        the session goes to it with `send(meta, fd)` (True once sent), to serve the client
        there. Returns 'given'; 'kept' when the session stays here (its client left that
        address less than BACK_AFTER ago, or the send failed); None: not ours."""
        sess = None if self._cids is None else self._cids.find(probe, len(probe))
        if sess is None or sess.sock is None or self._closed:
            return None
        now = self._time()
        if not may_move(sess, tuple(where.get('c') or where['a']), now):
            return 'kept'
        meta = handoff.describe(sess, self._wildcard, now)
        for field in ('a', 'd', 'n', 'c', 't'):         # where the client is now
            meta.pop(field, None)
            if where.get(field) is not None:
                meta[field] = where[field]
        meta.setdefault('d', None)
        meta.setdefault('n', None)
        meta['m'] = list(sess.client)                   # the client it leaves (BACK_AFTER)
        if not send(meta, sess.fd):
            return 'kept'
        self._poller.unwatch(sess.fd)
        sess.sock.close()
        sess.sock = None
        self._table.remove(sess)
        self._cids.forget(sess)
        if sess.gated:
            sess.gated = False
            self._per_ip.release(sess.client[0])
        (sess.pool or self._pool).release(sess.target)
        self.stats.sessions_active -= 1
        self.stats.sessions_handed_out += 1
        self._rl.info(('moved', 'peer'), 'udp %s: QUIC connection of %s moved to %s (another '
                      'worker)', self._name, sess.client, tuple(where.get('c') or where['a']))
        return 'given'

    def take(self, meta: dict, fd: int) -> None:
        """A session another worker gave us (`give`): its client now reaches this worker;
        what we held of that flow meanwhile goes on to it."""
        if self.adopt_sessions([meta], [fd]) != 1:
            self._rl.warning(('moved', 'bad'), 'udp %s: a QUIC connection moved to this worker '
                             'could not be taken over: closed', self._name)
            return
        addr = tuple(meta['a'])
        dst = bytes.fromhex(meta['d']) if meta['d'] else None
        sess = self._sessions.get((addr, dst) if self._wildcard else addr)
        if sess is not None and (self._closed or self._handed):   # (asked before this worker
            self._end(sess)                             # stopped or handed its sessions on)
            self.stats.sessions_closed += 1
            return
        if sess is not None:            # (paused or draining: kept as any session)
            self.stats.quic_moved += 1
            if meta.get('m'):
                sess.moved = [tuple(meta['m']), self._time(), 0]
            self._admission.settle(sess)
