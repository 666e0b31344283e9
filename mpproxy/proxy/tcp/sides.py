"""The two protocols of a relay, one per socket: what a relay reads, and its flow control.

Bytes flow by one routine, `Side.data_received`, whichever the direction: what one
side reads is written to its peer's transport, and the peer's `pause_writing` (its
write buffer over the high-water mark) pauses this side's reading through
`flow_paused`, so a slow reader never makes the proxy buffer without bound.

With `upload_rate` / `download_rate`, the client / upstream side is a throttled
variant: after each read it works out when those bytes are due at the rate and,
when that is later than now, stops reading until then (nginx's
`proxy_upload_rate`, per connection). Reading resumes only when neither the
rate nor the peer's backpressure holds it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpproxy.proxy.tcp.relay import Relay

SLACK = 0.001             # seconds: a throttled side ahead by less than this is not paused


class Side(asyncio.Protocol):
    """One end of a relay: forwards what it reads to `peer`, and mirrors its flow control."""

    __slots__ = ('relay', 'peer', 'transport', 'eof', 'lost', 'received')

    def __init__(self, relay: 'Relay'):
        self.relay = relay
        self.peer: Side | None = None
        self.transport = None     # its stream.Stream (the transport API a side uses)
        self.eof = False          # this side sent us FIN
        self.lost = False         # connection_lost was called
        self.received = 0         # bytes read from this side

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.on_eof(self)
        return True               # keep the other direction open

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.flow_paused(True)

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.lost:
            peer.flow_paused(False)

    def flow_paused(self, on: bool) -> None:
        """The peer cannot take more (on) or can again (off): stop or go on reading."""
        if on:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def stop(self) -> None:
        """The relay is closing: cancel what this side scheduled."""

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.relay.on_lost(self, exc)


class ClientSide(Side):
    """The accepted side; also buffers what arrives before the upstream is connected."""

    __slots__ = ('early',)

    def __init__(self, relay: 'Relay'):
        super().__init__(relay)
        self.early: list[bytes] | None = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.pause_reading()
        self.relay.start(transport)

    def data_received(self, data: bytes) -> None:
        early = self.early
        if early is not None:     # uvloop may deliver data after pause_reading()
            early.append(data)
            self.received += len(data)
            if self.relay.peeking:
                self.relay.peek()
            return
        Side.data_received(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.early is None:
            self.relay.on_eof(self)
        elif self.relay.peeking:
            self.relay.peek(eof=True)
        return True


class UpstreamSide(Side):
    __slots__ = ('target',)

    def __init__(self, relay: 'Relay', target):
        super().__init__(relay)
        self.target = target

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.relay._opened(self)  # at once: data may follow before the connecting task resumes


class _Discard:
    """Stands in for a peer once a relay is finishing: what is read is dropped."""

    __slots__ = ('transport', 'lost')

    def __init__(self):
        self.transport = self
        self.lost = False

    def write(self, data) -> None:
        pass

    def flow_paused(self, on: bool) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_DISCARD = _Discard()



class Throttled:
    """Reads at most `rate` bytes a second on average (mixed into a Side; state in its slots)."""

    __slots__ = ()
    STATE = ('rate', 'due', 'flow', 'held', 'timer')

    def throttle(self, rate: int) -> None:
        self.rate = float(rate)
        self.due = 0.0            # loop time when the bytes read so far are due at the rate
        self.flow = False         # the peer's backpressure holds reading
        self.held = False         # the rate holds reading
        self.timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        loop = self.relay.loop if self.relay is not None else None
        if loop is None:
            return
        now = loop.time()
        due = self.due = max(self.due, now) + len(data) / self.rate
        if due - now > SLACK and not self.held and not self.lost:
            self.held = True
            self.transport.pause_reading()
            self.timer = loop.call_later(due - now, self._due)

    def _due(self) -> None:
        self.timer = None
        self.held = False
        if not self.flow and not self.lost and self.relay is not None:
            self.transport.resume_reading()

    def flow_paused(self, on: bool) -> None:
        self.flow = on
        if on:
            self.transport.pause_reading()
        elif not self.held:
            self.transport.resume_reading()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ThrottledClientSide(Throttled, ClientSide):
    __slots__ = Throttled.STATE


class ThrottledUpstreamSide(Throttled, UpstreamSide):
    __slots__ = Throttled.STATE
