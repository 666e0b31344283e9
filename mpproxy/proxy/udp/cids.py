"""QUIC connection IDs of the routed sessions of one UDP listener in one worker.

A QUIC client's packets name the connection by the destination connection ID (DCID)
the server chose, whatever address they come from. A NAT that rebinds the client (a
new source port, or address) therefore shows the proxy a new flow whose packets carry
the DCID of a session it already has. `CidIndex` maps the IDs of every routed session
to it, so that such a flow goes on through the same session (the same upstream socket:
the server sees no change) and the replies follow the client to its new address.

Which IDs a session is found by (at most PER_SESSION, each MIN_CID..MAX_CID bytes): the
source connection ID of every long-header packet the server sends (its Initial, Handshake
and Retry packets name the ID the client then sends to); the session's reply path reads
them until the server's first short-header packet, then never again.

Not the ID the client's first Initial names: the client chose it, anyone who saw that
datagram could send it again from elsewhere, and it is only used until the server's first
answer (a client that rebinds within that round trip starts over: its Initial is a new
flow, routed afresh).

IDs the server hands out later travel encrypted (NEW_CONNECTION_ID frames): a client
that switches to one of them on purpose while it moves (RFC 9000 9.5) is not followed;
a NAT rebinding keeps the ID it had, and is. IDs shorter than MIN_CID are not kept:
they would be guessed too easily (a packet with a session's ID moves its replies).

A short-header packet does not say how long its DCID is: the index keeps the lengths
of the IDs it holds (servers use one length) and tries each. Any first byte with the top
bit clear is read as a short header: a client may grease the fixed bit (RFC 9287), and
the match is exact on 8 bytes or more.
"""

from __future__ import annotations

MIN_CID = 8               # bytes: shorter IDs are not kept
MAX_CID = 20              # RFC 9000 17.2: a connection ID has at most 20 bytes
PER_SESSION = 4           # IDs kept per session
PROBE = 1 + MAX_CID       # the bytes of a datagram that hold any short header's DCID


def server_cid(data, size: int) -> bytes | None:
    """The source connection ID of a long-header packet (a server's Initial, Handshake
    or Retry) at the start of `data[:size]`; None for a short header, a Version
    Negotiation packet or a header too short to hold it."""
    if size < 7 or not data[0] & 0x80 or data[1:5] == b'\0\0\0\0':
        return None
    dcil = data[5]
    at = 6 + dcil
    if dcil > MAX_CID or size <= at:
        return None
    scil = data[at]
    if not MIN_CID <= scil <= MAX_CID or size < at + 1 + scil:
        return None
    return bytes(data[at + 1:at + 1 + scil])


def is_short(data, size: int) -> bool:
    """A QUIC short-header (1-RTT) packet long enough to carry a kept DCID: the top bit
    clear. (Not the fixed bit too: a peer may grease it, RFC 9287.)"""
    return size > MIN_CID and not data[0] & 0x80


class CidIndex:
    """Connection ID → its session, for one listener in one worker (see the module doc).

    A session's IDs are listed in its `cids` (None until it has one); `forget()` takes
    them all out when it ends or leaves the worker.
    """

    __slots__ = ('by_id', 'lengths')

    def __init__(self):
        self.by_id: dict[bytes, object] = {}
        self.lengths: dict[int, int] = {}      # ID length → how many IDs of that length

    def __len__(self) -> int:
        return len(self.by_id)

    def learn(self, sess, cid: bytes | None) -> bool:
        """Find `sess` by `cid` from now on; False when it is not kept (its length, the
        session already has PER_SESSION IDs, or another session has it)."""
        if cid is None or not MIN_CID <= len(cid) <= MAX_CID:
            return False
        cids = sess.cids
        if cids is None:
            cids = sess.cids = []
        elif cid in cids or len(cids) >= PER_SESSION:
            return False
        if self.by_id.setdefault(cid, sess) is not sess:
            return False
        cids.append(cid)
        self.lengths[len(cid)] = self.lengths.get(len(cid), 0) + 1
        return True

    def forget(self, sess) -> None:
        """Take every ID of `sess` out of the index."""
        cids = sess.cids
        if not cids:
            return
        sess.cids = None
        by_id, lengths = self.by_id, self.lengths
        for cid in cids:
            if by_id.get(cid) is sess:
                del by_id[cid]
                left = lengths[len(cid)] - 1
                if left:
                    lengths[len(cid)] = left
                else:
                    del lengths[len(cid)]

    def find(self, data, size: int):
        """The session whose ID the QUIC packet at the start of `data[:size]` is sent to,
        or None."""
        if not self.by_id or size < 1 + MIN_CID:
            return None
        first = data[0]
        by_id = self.by_id
        if first & 0x80:                                # long header: the DCID is sized
            if size < 6:
                return None
            dcil = data[5]
            if not MIN_CID <= dcil <= MAX_CID or size < 6 + dcil:
                return None
            return by_id.get(bytes(data[6:6 + dcil]))
        for length in self.lengths:                     # short header (the top bit clear,
            if size > length:                           # the fixed bit maybe greased): try
                sess = by_id.get(bytes(data[1:1 + length]))     # each length held
                if sess is not None:
                    return sess
        return None
