"""The UDP session handoff protocol: send_all() and Receiver over real socketpairs, and
read_queued() / Replay over a real UDP socket."""

import json
import os
import socket

from mpproxy.proxy.udp import handoff


def pair():
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def udp_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('127.0.0.1', 0))
    return s


def read_all(receiver):
    out = []
    for _ in range(1000):
        out.extend(receiver.read())
        if receiver.done:
            return out
    raise AssertionError('receiver never finished')


def test_sessions_and_fds_arrive_in_batches_and_eof_ends():
    old, new = pair()
    socks = [udp_socket() for _ in range(handoff.BATCH + 5)]
    items = [({'i': i, 'a': ['127.0.0.1', i]}, s) for i, s in enumerate(socks)]
    sent, failed = handoff.send_all([old], [(('udp', '127.0.0.1', 53), items)])
    assert (sent, failed) == (len(socks), 0)
    old.close()
    batches = read_all(handoff.Receiver(new))
    assert [len(fds) for _, _, fds, _ in batches] == [handoff.BATCH, 5]
    metas = [m for _, ms, _, _ in batches for m in ms]
    assert [m['i'] for m in metas] == list(range(len(socks)))
    for (key, _, fds, _), start in zip(batches, (0, handoff.BATCH)):
        assert key == ('udp', '127.0.0.1', 53)
        for offset, fd in enumerate(fds):   # the same kernel socket: same local address
            got = socket.socket(fileno=fd)
            assert got.getsockname() == socks[start + offset].getsockname()
            got.close()
    for s in socks:
        s.close()
    new.close()


def test_malformed_message_is_skipped_and_its_fds_closed():
    old, new = pair()
    s = udp_socket()
    socket.send_fds(old, [b'not json'], [s.fileno()])
    old.send(b'{"done": true}')       # (an older mpproxy's end marker: not the end, EOF is)
    receiver = handoff.Receiver(new)
    before = len(os.listdir('/proc/self/fd'))
    assert receiver.read() == [] and not receiver.done
    assert len(os.listdir('/proc/self/fd')) <= before   # the received fd was closed
    old.close()
    assert read_all(receiver) == []
    s.close()
    new.close()


def test_eof_ends_the_receiver():
    old, new = pair()
    old.send(json.dumps({'listener': ['udp', '::1', 5], 'sessions': []}).encode())
    old.close()
    batches = read_all(handoff.Receiver(new))
    assert batches == [(('udp', '::1', 5), [], [], [])]
    new.close()


def test_a_closed_peer_fails_the_send_and_counts_it():
    old, new = pair()
    new.close()
    s = udp_socket()
    sent, failed = handoff.send_all([old], [(('udp', '127.0.0.1', 1), [({'a': ['x', 1]}, s)])])
    assert (sent, failed) == (0, 1)
    s.close()
    old.close()


def test_sessions_and_carried_datagrams_are_routed_to_their_inboxes_and_eof_needs_every_sender():
    """Two old workers write to the inboxes of two new ones, each item to the inbox its
    client's address routes to; an inbox ends only when both senders closed it."""
    inbox = [pair() for _ in range(2)]            # (sending end, receiving end) per new slot
    senders = [[socket.socket(fileno=os.dup(inbox[j][0].fileno())) for j in range(2)]
               for _ in range(2)]
    for send_end, _ in inbox:                     # the master's copies
        send_end.close()
    receivers = [handoff.Receiver(recv_end) for _, recv_end in inbox]
    route = lambda addr: addr[1] % 2              # noqa: E731 - the port's parity picks the slot
    key = ('udp', '127.0.0.1', 53)
    socks = [udp_socket() for _ in range(6)]
    items = [({'a': ['127.0.0.1', 1000 + i]}, s) for i, s in enumerate(socks)]
    carried = [(('127.0.0.1', 2001), None, b'odd'), (('127.0.0.1', 2002), None, b'even' * 9000)]
    assert handoff.send_all(senders[0], [(key, items[:3])], route, [(key, carried)]) == (3, 0)
    for sock in senders[0]:
        sock.close()
    got = [r.read() for r in receivers]
    assert not any(r.done for r in receivers)     # the other old worker still holds them
    assert handoff.send_all(senders[1], [(key, items[3:])], route) == (3, 0)
    for sock in senders[1]:
        sock.close()
    for j, r in enumerate(receivers):
        got[j] += read_all(r)
    for j in range(2):
        ports = [m['a'][1] for _, metas, _, _ in got[j] for m in metas]
        assert ports and all(p % 2 == j for p in ports)
        assert sum(len(fds) for _, _, fds, _ in got[j]) == len(ports)
        for _, _, fds, _ in got[j]:
            for fd in fds:
                os.close(fd)
    assert [c for _, _, _, cs in got[1] for c in cs] == [(('127.0.0.1', 2001), [], b'odd')]
    assert [c for _, _, _, cs in got[0] for c in cs] == [(('127.0.0.1', 2002), [], b'even' * 9000)]
    for s in socks:
        s.close()
    for _, recv_end in inbox:
        recv_end.close()


def test_read_queued_takes_what_the_socket_holds_and_replay_serves_it_in_order():
    lsock = udp_socket()
    client = udp_socket()
    for i in range(5):
        client.sendto(b'd%d' % i, lsock.getsockname())
    queued = []
    deadline_reads = 0
    while len(queued) < 5 and deadline_reads < 1000:   # loopback: they are queued at once
        queued += handoff.read_queued(lsock, wildcard=False)
        deadline_reads += 1
    assert [d for _, _, d in queued] == [b'd%d' % i for i in range(5)]
    assert all(addr == client.getsockname() for addr, _, _ in queued)
    replay = handoff.Replay(queued, socket.AF_INET)
    buf = bytearray(100)
    n, addr = replay.recvfrom_into(buf)
    assert (bytes(buf[:n]), addr) == (b'd0', client.getsockname()) and len(replay) == 4
    for i in range(1, 5):
        n, anc, _flags, addr = replay.recvmsg_into((buf,), 64)
        assert bytes(buf[:n]) == b'd%d' % i and anc == []
    try:
        replay.recvfrom_into(buf)
        raise AssertionError('an empty replay must raise BlockingIOError')
    except BlockingIOError:
        pass
    assert handoff.read_queued(lsock, wildcard=False) == []
    lsock.close()
    client.close()
