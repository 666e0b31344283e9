"""UDP sessions handed from draining workers to new ones (the worker side; the protocol is
proxy/udp/handoff.py).

`Handover` is a mixin of `process.Worker` (it owns no state of its own). A new worker
started with an inbox keeps its UDP listeners unread until every sender closed it:
the sessions of its predecessors are adopted as they arrive (`_on_handoff`), the
datagrams they carried are served once all is in, then it starts reading
(`_handoff_done`). A draining worker told to hand over sends every live session,
with its connected upstream socket, to the inbox of the slot its client's flow now
reaches (`_hand_over`).
"""

from __future__ import annotations

import socket
from functools import partial

from mpproxy.observe import log as logmod
from mpproxy.proxy.udp import handoff
from mpproxy.proxy.udp.service import UdpService
from mpproxy.shared import steer

log = logmod.log

MAX_CARRIED = 65536       # datagrams a new worker keeps from its predecessors until EOF


class Handover:
    __slots__ = ()

    def _udp_services(self) -> list[UdpService]:
        return [s for s in self.services if isinstance(s, UdpService)]

    def _start_udp(self) -> None:
        if not self.draining and not self.udp_paused and self.receiver is None:
            for service in self._udp_services():
                service.start()

    def _on_handoff(self) -> None:
        by_key = {s.key: s for s in self._udp_services()}
        for key, metas, fds, carried in self.receiver.read():
            service = by_key.get(key)
            if service is None:   # the listener is gone from the new config
                for fd in fds:
                    socket.close(fd)
                self.handoff_lost += len(fds)
                continue
            if fds:
                self.handoff_adopted += service.adopt_sessions(metas, fds)
            if carried:
                room = MAX_CARRIED - sum(len(d) for _, d in self.carried)
                self.carried.append((service, carried[:max(0, room)]))
        if self.receiver.done:
            self._handoff_done()

    def _handoff_done(self) -> None:
        if self.receiver is None:
            return
        if self.handoff_timer is not None:
            self.handoff_timer.cancel()
        self.loop.remove_reader(self.spec.handoff.fileno())
        self.spec.handoff.close()
        self.receiver = None
        carried, self.carried = self.carried, []
        for service, datagrams in carried:   # before the socket: what came first goes first
            service.replay(datagrams)
        if self.handoff_adopted or self.handoff_lost:
            log.info('took over %d UDP session(s) from the previous worker(s)%s%s',
                     self.handoff_adopted,
                     f', {sum(len(d) for _, d in carried)} datagram(s) they had not read'
                     if carried else '',
                     f', closed {self.handoff_lost} of removed listeners' if self.handoff_lost
                     else '')
        self._start_udp()

    def _hand_over(self, inboxes: list[socket.socket], slots: int | None) -> None:
        """Draining: give this worker's UDP sessions to the new workers. `slots`: the
        listeners' flows were just steered to that many slots (inbox i = slot i): each
        session goes to the slot of its client, with what the listener socket still
        holds; None: all to inboxes[0], this slot's successor."""
        services = self._udp_services()
        carried = [(s.key, s.take_queued()) for s in services] if slots is not None else []
        batches = [(s.key, s.export_sessions()) for s in services]
        route = None if slots is None else partial(steer.slot_of, slots=slots)
        try:
            sent, failed = handoff.send_all(inboxes, batches, route, carried)
        finally:
            for _, items in batches:
                for _, session_sock in items:
                    session_sock.close()
            for inbox in inboxes:
                inbox.close()
        moved = sum(len(d) for _, d in carried)
        if sent or failed or moved:
            log.info('handed %d UDP session(s) to the new worker(s)%s%s', sent,
                     f' with {moved} datagram(s) not yet read' if moved else '',
                     f'; {failed} could not be sent and were closed' if failed else '')
