"""The channel between the workers of one generation: QUIC sessions that follow their client.

The kernel steers a UDP flow to a worker by its source address (shared/steer.py). A
QUIC client whose NAT rebinds it comes from a new address, and its flow may now reach
another worker than the one holding its session (proxy/udp/cids.py). That worker asks
the others for the session (`seek`: the packet's first bytes, which hold the connection
ID, and where the client is now); the one that has it hands it over (`UdpService.give`:
its description and its upstream socket, as on a reload), and the asking worker serves
it from then on (`UdpService.take`): same upstream socket, replies to the new address.
Every other worker answers: with the session, or "not here" (or "here, but kept": its
client left that address just now), so that the asking worker knows at once when no
worker has it (the flow is then unrouted, as any flow that is not QUIC).

The master makes the channel when the generation's config routes QUIC by name and has
more than one worker: a SOCK_DGRAM socketpair per slot, whose receiving end only that
slot's worker keeps and whose sending ends every worker of the generation keeps (a
worker that replaces a dead one gets the same ends). Only processes holding those fds
can write to it. Every send is non-blocking: a question that cannot be sent is not asked
(the datagram is dropped; the next packet asks again); a worker that left a question
unanswered for SILENT is not asked until it answers again; an answer or a session that
cannot be sent back leaves the flow waiting until its deadline (then dropped: the next
packet asks again), and the session where it was.

    message = JSON {"w": listener, "q": n, "from": slot, "at": {a, d, n, c, t}} "\\n" probe
            | JSON {"x": listener, "q": n, "k": kept, "from": slot}         (no session)
            | JSON {"g": listener, "s": meta, "from": slot} + the session's fd  (the session)
"""

from __future__ import annotations

import json
import logging
import socket

from mpproxy.proxy.io.ratelog import RateLimitedLog
from mpproxy.proxy.udp import cids

MAX_MESSAGE = 8192        # a seek (probe and address) or a give (one session's description)
READS = 64                # messages read per callback
SILENT = 1.0              # seconds a worker may leave a question unanswered (or not take one)
                          # before it is no longer asked, until it answers again


class Peers:
    """One worker's end of the channel: its inbox (`rx`) and every slot's sending end."""

    def __init__(self, loop, slot: int, rx: socket.socket, txs: list[socket.socket],
                 services: dict, log: logging.Logger):
        self._loop = loop
        self._slot = slot
        self._rx = rx
        self._txs = txs
        self._services = services       # listener key -> its service (the worker's by_listener)
        self._rl = RateLimitedLog(log)
        self._due: dict[int, float] = {}    # slot -> since when a question to it is unanswered
        for sock in (rx, *txs):
            sock.setblocking(False)

    def start(self) -> None:
        self._loop.add_reader(self._rx.fileno(), self._on_message)

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._rx.fileno())
        except Exception:
            pass

    def seek(self, listener: tuple, where: dict, probe: bytes, question: int) -> int | None:
        """Ask every other worker for the session of `listener` whose connection ID the
        short-header packet starting with `probe` carries; `where` the client is now.
        Returns how many were asked; None when one could not be (its inbox is full: ask
        again with the next packet). A worker silent for SILENT (dead, in its respawn back-off,
        stalled) is not asked nor waited for, until it answers again (a worker that
        replaces a dead one answers what waited in the slot's inbox)."""
        head = json.dumps({'w': list(listener), 'q': question, 'from': self._slot,
                           'at': where}).encode()
        message = head + b'\n' + bytes(probe[:cids.PROBE])
        now = self._loop.time()
        due = self._due
        asked = 0
        for slot, tx in enumerate(self._txs):
            if slot == self._slot:
                continue
            since = due.get(slot)
            if since is not None and now - since > SILENT:
                continue
            if since is None:
                due[slot] = now
            try:
                tx.send(message)
            except OSError as exc:
                self._rl.warning(('seek', slot), 'cannot ask worker %d for a moved QUIC '
                                 'connection: %s', slot, exc.strerror or exc)
                return None
            asked += 1
        return asked

    def _give_to(self, slot: int, listener: list, meta: dict, fd: int) -> bool:
        try:
            socket.send_fds(self._txs[slot], [json.dumps({'g': listener, 's': meta,
                                                          'from': self._slot}).encode()], [fd])
            return True
        except OSError as exc:
            self._rl.warning(('give', slot), 'cannot hand a moved QUIC connection to worker '
                             '%d: %s; it stays here', slot, exc.strerror or exc)
            return False

    def _on_message(self) -> None:
        for _ in range(READS):
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._rx, MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                self._handle(data, fds)
            except Exception as exc:    # noqa: BLE001 - a bad message never stops the worker
                self._rl.error(('peer', type(exc).__name__), 'bad message from another '
                               'worker: %r', exc)
            finally:
                for fd in fds:          # (an fd taken over is -1 by now)
                    if fd >= 0:
                        _close(fd)

    def _handle(self, data: bytes, fds: list[int]) -> None:
        head, _, probe = data.partition(b'\n')
        message = json.loads(head)
        if 'w' in message:
            service = self._services.get(tuple(message['w']))
            slot = int(message['from'])
            if not 0 <= slot < len(self._txs) or slot == self._slot:
                return
            given = None
            if service is not None:
                given = service.give(probe, message['at'],
                                     lambda meta, fd: self._give_to(slot, message['w'], meta, fd))
            if given != 'given':
                try:
                    self._txs[slot].send(json.dumps({'x': message['w'], 'q': message['q'],
                                                     'k': given == 'kept',
                                                     'from': self._slot}).encode())
                except OSError as exc:
                    self._rl.warning(('answer', slot), 'cannot answer worker %d about a moved '
                                     'QUIC connection: %s', slot, exc.strerror or exc)
        elif 'x' in message:
            self._due.pop(message.get('from'), None)          # it answers
            service = self._services.get(tuple(message['x']))
            if service is not None:
                service.answered(int(message['q']), bool(message['k']))
        elif 'g' in message and fds:
            self._due.pop(message.get('from'), None)
            service = self._services.get(tuple(message['g']))
            if service is not None:
                fd, fds[0] = fds[0], -1     # the service owns it now (closes it if unwanted)
                service.take(message['s'], fd)


def _close(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass
