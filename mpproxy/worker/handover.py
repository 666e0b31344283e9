"""UDP sessions handed from a slot's old worker to its new one on reload (the worker side).

`Handover` is a mixin of `process.Worker` (it owns no state of its own). A new worker
started with a handoff socket keeps its UDP listeners unread until the sessions of
its slot's predecessor arrived (`_on_handoff`, batches decoded by proxy/udp/handoff.py)
or the master closed the socket, then starts reading (`_start_udp`). A draining
worker told to hand over sends every live session, with its connected upstream
socket, to the successor (`_hand_over`).
"""

from __future__ import annotations

import socket

from mpproxy.observe import log as logmod
from mpproxy.proxy.udp import handoff
from mpproxy.proxy.udp.service import UdpService

log = logmod.log


class Handover:
    __slots__ = ()

    def _udp_services(self) -> list[UdpService]:
        return [s for s in self.services if isinstance(s, UdpService)]

    def _start_udp(self) -> None:
        if not self.draining:
            for service in self._udp_services():
                service.start()

    def _on_handoff(self) -> None:
        by_key = {s.key: s for s in self._udp_services()}
        for key, metas, fds in self.receiver.read():
            service = by_key.get(key)
            if service is None:   # the listener is gone from the new config
                for fd in fds:
                    socket.close(fd)
                self.handoff_lost += len(fds)
                continue
            self.handoff_adopted += service.adopt_sessions(metas, fds)
        if self.receiver.done:
            self._handoff_done()

    def _handoff_done(self) -> None:
        if self.receiver is None:
            return
        self.handoff_timer.cancel()
        self.loop.remove_reader(self.spec.handoff.fileno())
        self.spec.handoff.close()
        self.receiver = None
        if self.handoff_adopted or self.handoff_lost:
            log.info('took over %d UDP session(s) from the previous worker%s', self.handoff_adopted,
                     f', closed {self.handoff_lost} of removed listeners' if self.handoff_lost else '')
        self._start_udp()

    def _hand_over(self, sock: socket.socket) -> None:
        """Draining on reload: give this worker's UDP sessions to the successor."""
        batches = [(s.key, s.export_sessions()) for s in self._udp_services()]
        try:
            sent, failed = handoff.send_all(sock, batches)
        finally:
            for _, items in batches:
                for _, session_sock in items:
                    session_sock.close()
            sock.close()
        if sent or failed:
            log.info('handed %d UDP session(s) to the new worker%s', sent,
                     f'; {failed} could not be sent and were closed' if failed else '')
