"""Handing live UDP sessions (and queued datagrams) from draining workers to new ones.

Every worker that takes over gets an inbox: the receiving end of a SOCK_SEQPACKET
socketpair whose sending end the master keeps. When the new workers serve, the
master hands the sending ends to the old workers (with a reload from a master's
own generation, or at QUIT from the old master of a binary upgrade, which got
them from the new master). Each old worker stops reading its UDP sockets and
sends every session to the inbox of the slot its client's flow reaches now
(`route`): a JSON description plus the connected upstream socket as an
SCM_RIGHTS fd, in batches of `BATCH`. With the same number of slots a session
stays in its slot (one inbox, no routing). When the number changes, the master
first steers the listener's flows to the new slots (shared/steer.py), and each
old worker also reads what its listener socket still holds and carries those
datagrams, unread by anyone, to the inbox of their flow's new slot.

A new worker adopts what arrives and starts reading its UDP sockets only at EOF,
when every sender (the master's copy, every old worker's) is closed: the
datagrams that arrive meanwhile wait in the kernel's queues, replies keep their
path, the upstream sees the same source port before and after, and no datagram
is read by two workers.

    message = JSON {"listener": [proto, host, port], "sessions": [meta, ...]}  + fds (same order)
            | JSON {"listener": [...], "carried": [[addr, anc, length], ...]} "\n" payloads

Both sides bound the exchange in time; a session that cannot be sent is closed
by the old worker and counted, one that arrives for a listener the new config
no longer has is closed by the new worker and counted.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque

from mpproxy.proxy.udp import pktinfo
from mpproxy.proxy.udp.session import Session
from mpproxy.upstream.pool import Target

BATCH = 64                # fds per message (SCM_RIGHTS allows 253)
CARRY_BYTES = 65536       # payload bytes per message of carried datagrams (and one more)
MAX_MESSAGE = 1 << 18     # bytes a message may have: 64 sessions' metadata, or carried bytes
SEND_TIMEOUT = 2.0        # seconds an old worker may spend handing over
MAX_CARRIED = 4096        # datagrams an old worker reads out of a listener socket to carry


class _Outbox:
    __slots__ = ('sock', 'ok')

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.ok = True


def send_all(outboxes: list[socket.socket], batches, route=None, carried=(),
             timeout: float = SEND_TIMEOUT) -> tuple[int, int]:
    """Send `batches` of (listener_key, [(meta, session_socket), ...]) and `carried` of
    (listener_key, [(addr, anc, data), ...]) to the inboxes of `outboxes`.

    `route(addr)` names the outbox of a client address (None: every one to the first).
    Blocking with a deadline (the old worker is draining; this takes milliseconds for
    thousands of sessions). Returns (sent, failed) session counts (a failed outbox fails
    what was left for it; carried datagrams are not counted); the caller closes its
    copies of every session socket and of `outboxes` afterwards.
    """
    deadline = time.monotonic() + timeout
    boxes = [_Outbox(sock) for sock in outboxes]
    for box in boxes:
        box.sock.setblocking(True)
    sent = failed = 0
    for key, items in batches:
        for box, chunk in _split(boxes, items, route, lambda item: item[0]['a']):
            for start in range(0, len(chunk), BATCH):
                part = chunk[start:start + BATCH]
                payload = json.dumps({'listener': list(key),
                                      'sessions': [meta for meta, _ in part]}).encode()
                if _send(box, deadline, payload, [s.fileno() for _, s in part]):
                    sent += len(part)
                else:
                    failed += len(part)
    for key, datagrams in carried:
        for box, chunk in _split(boxes, datagrams, route, lambda item: item[0]):
            for part in _by_size(chunk):
                head = json.dumps({'listener': list(key), 'carried': [
                    [list(addr), _anc_out(anc), len(data)] for addr, anc, data in part]})
                _send(box, deadline, b''.join([head.encode(), b'\n', *(d for _, _, d in part)]), [])
    return sent, failed


def _split(boxes, items, route, addr_of):
    """[(outbox, its items)], in the order of `items` within each."""
    if route is None or len(boxes) == 1:
        return [(boxes[0], items)] if items else []
    out: dict[int, list] = {}
    for item in items:
        index = route(tuple(addr_of(item)))
        out.setdefault(index if 0 <= index < len(boxes) else 0, []).append(item)
    return [(boxes[i], chunk) for i, chunk in sorted(out.items())]


def _by_size(datagrams):
    part, size = [], 0
    for item in datagrams:
        part.append(item)
        size += len(item[2])
        if size >= CARRY_BYTES:
            yield part
            part, size = [], 0
    if part:
        yield part


def _send(box: _Outbox, deadline: float, payload: bytes, fds: list[int]) -> bool:
    left = deadline - time.monotonic()
    if not box.ok or left <= 0:
        box.ok = False
        return False
    try:
        box.sock.settimeout(left)
        socket.send_fds(box.sock, [payload], fds)
        return True
    except OSError:
        box.ok = False
        return False


def _anc_out(anc):
    return [[level, typ, bytes(data).hex()] for level, typ, data in anc] if anc else None


class Receiver:
    """A new worker's inbox: feed it readable events, it yields what arrived; `done` at EOF
    (every sender closed)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self.done = False

    def read(self) -> list[tuple[tuple, list, list[int], list]]:
        """Read what is there: [(listener_key, metas, fds, carried datagrams)], where carried
        datagrams are (addr, anc, data); sets `done` at EOF."""
        out = []
        while not self.done:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, BATCH)
            except BlockingIOError:
                break
            except OSError:
                self.done = True
                break
            if not data:
                self.done = True
                for fd in fds:
                    _close_fd(fd)
                break
            try:
                head, _, payload = data.partition(b'\n')
                message = json.loads(head)
                if message.get('done'):           # (an older mpproxy's end marker)
                    raise ValueError('no listener')
                key = tuple(message['listener'])
                if 'carried' in message:
                    out.append((key, [], [], _carried_in(message['carried'], payload)))
                    for fd in fds:
                        _close_fd(fd)
                    continue
                metas = message['sessions']
            except (ValueError, KeyError, TypeError, AttributeError):
                for fd in fds:
                    _close_fd(fd)
                continue
            out.append((key, metas, fds, []))
        return out


def _carried_in(entries, payload: bytes) -> list:
    out, pos = [], 0
    for addr, anc, length in entries:
        data = payload[pos:pos + int(length)]
        pos += int(length)
        anc = [(int(lv), int(ty), bytes.fromhex(cd)) for lv, ty, cd in anc] if anc else []
        out.append((tuple(addr), anc, data))
    return out


def read_queued(lsock: socket.socket, wildcard: bool, limit: int = MAX_CARRIED) -> list:
    """What a listener socket still holds, unread by anyone: [(addr, anc, data)] (at most
    `limit`; the rest stays for the socket's next reader)."""
    out = []
    lsock.setblocking(False)
    while len(out) < limit:
        try:
            if wildcard:
                data, anc, _flags, addr = lsock.recvmsg(65536, pktinfo.ANCBUFSIZE)
            else:
                data, addr = lsock.recvfrom(65536)
                anc = None
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            continue              # an error queued on the socket: it is consumed; read on
        out.append((addr, anc, data))
    return out


class Replay:
    """Stands for a listener socket in a reader (admit.py): serves carried datagrams, as
    `recvfrom_into` / `recvmsg_into` would, then EAGAIN."""

    def __init__(self, datagrams, family: int):
        self._items = deque(datagrams)
        self.family = family

    def __len__(self) -> int:
        return len(self._items)

    def recvfrom_into(self, buf):
        if not self._items:
            raise BlockingIOError
        addr, _anc, data = self._items.popleft()
        buf[:len(data)] = data
        return len(data), addr

    def recvmsg_into(self, buffers, ancsize=0):
        if not self._items:
            raise BlockingIOError
        addr, anc, data = self._items.popleft()
        buffers[0][:len(data)] = data
        return len(data), anc or [], 0, addr


def _close_fd(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass


def describe(sess: Session, wildcard: bool, now: float) -> dict:
    """A session as JSON-able data; its socket travels beside it as an fd."""
    dst = sess.key[1] if wildcard else None
    target = sess.target
    meta = {'a': list(sess.addr), 'd': dst.hex() if dst else None,
            'n': [[lv, ty, bytes(cd).hex()] for lv, ty, cd in sess.anc] if sess.anc else None,
            'f': target.family, 's': list(target.sockaddr), 'l': target.label,
            'g': max(0.0, now - sess.last), 'r': sess.replies,
            'o': max(0.0, now - sess.started),            # age and counts: for the access log
            'i': [sess.datagrams_in, sess.bytes_in, sess.bytes_out]}
    if sess.client != sess.addr:        # the real client its PROXY header named
        meta['c'] = list(sess.client)
    if sess.told is not None:           # ... and the destination it named
        meta['t'] = list(sess.told)
    if sess.pool is not None:           # routed by its QUIC server name: the upstream's name
        meta['p'] = sess.pool.name
    if sess.cids:                       # ... and the connection IDs it is found by (cids.py)
        meta['q'] = [cid.hex() for cid in sess.cids]
    if sess.learn:                      # ... still reading its server's replies for more
        meta['L'] = 1
    return meta


def rebuild(meta: dict, fd: int, wildcard: bool, now: float) -> Session:
    """The session `describe` made, around the received fd (raises on bad data)."""
    addr = tuple(meta['a'])
    dst = bytes.fromhex(meta['d']) if meta['d'] else None
    anc = [(lv, ty, bytes.fromhex(cd)) for lv, ty, cd in meta['n']] if meta['n'] else None
    target = Target(int(meta['f']), tuple(meta['s']), str(meta['l']))
    last = now - float(meta['g'])
    replies = int(meta['r'])
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    client = tuple(meta['c']) if meta.get('c') else None
    told = tuple(meta['t']) if meta.get('t') else None
    sess = Session((addr, dst) if wildcard else addr, addr, sock, anc, target, last, client)
    sess.replies = replies
    sess.told = told
    if 'o' in meta:               # (absent from a worker of an older mpproxy)
        sess.started = now - float(meta['o'])
        sess.datagrams_in, sess.bytes_in, sess.bytes_out = (int(v) for v in meta['i'])
    return sess
