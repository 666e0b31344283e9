"""Handing live UDP sessions from a draining worker to its successor in the same slot.

On a reload the master gives the new worker of slot i one end of a
SOCK_SEQPACKET socketpair and, once the new generation serves, the old worker
of slot i the other end. The old worker stops reading its UDP sockets and
sends every session: a JSON description plus the connected upstream socket as
an SCM_RIGHTS fd, in batches of `BATCH`, then a final `done` message. The new
worker adopts them and only then starts reading the UDP sockets, so the
datagrams that arrive meanwhile wait in the kernel's queues, replies keep
their path, and the upstream sees the same source port before and after.

    message = JSON {"listener": [proto, host, port], "sessions": [meta, ...]}  + fds (same order)
            | JSON {"done": true}

Both sides bound the exchange in time; a session that cannot be sent is closed
by the old worker and counted, one that arrives for a listener the new config
no longer has is closed by the new worker and counted.
"""

from __future__ import annotations

import json
import socket
import time

from mpproxy.proxy.udp.session import Session
from mpproxy.upstream.pool import Target

BATCH = 64                # fds per message (SCM_RIGHTS allows 253)
MAX_MESSAGE = 1 << 17     # bytes; 64 sessions' metadata is far below this
SEND_TIMEOUT = 2.0        # seconds the old worker may spend handing over


def send_all(sock: socket.socket, batches, timeout: float = SEND_TIMEOUT) -> tuple[int, int]:
    """Send `batches` of (listener_key, [(meta, session_socket), ...]) then `done`.

    Blocking with a deadline (the old worker is draining; this takes
    milliseconds for thousands of sessions). Returns (sent, failed) counts;
    the caller closes its copies of every session socket afterwards.
    """
    deadline = time.monotonic() + timeout
    sent = failed = 0
    sock.setblocking(True)
    ok = True
    for key, items in batches:
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            left = deadline - time.monotonic()
            if not ok or left <= 0:
                failed += len(chunk)
                ok = False
                continue
            sock.settimeout(left)
            payload = json.dumps({'listener': list(key),
                                  'sessions': [meta for meta, _ in chunk]}).encode()
            try:
                socket.send_fds(sock, [payload], [s.fileno() for _, s in chunk])
                sent += len(chunk)
            except OSError:
                failed += len(chunk)
                ok = False
    if ok:
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.send(b'{"done": true}')
        except OSError:
            pass
    return sent, failed


class Receiver:
    """The new worker's side: feed it readable events, it yields adopted batches."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self.done = False

    def read(self) -> list[tuple[tuple, list, list[int]]]:
        """Read what is there: [(listener_key, metas, fds)]; sets `done` at the end or EOF."""
        batches = []
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
                message = json.loads(data)
                if message.get('done'):
                    self.done = True
                    for fd in fds:
                        _close_fd(fd)
                    break
                key = tuple(message['listener'])
                metas = message['sessions']
            except (ValueError, KeyError, TypeError, AttributeError):
                for fd in fds:
                    _close_fd(fd)
                continue
            batches.append((key, metas, fds))
        return batches


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
