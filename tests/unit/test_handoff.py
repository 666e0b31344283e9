"""The UDP session handoff protocol: send_all() and Receiver over a real socketpair."""

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


def test_sessions_and_fds_arrive_in_batches_and_done():
    old, new = pair()
    socks = [udp_socket() for _ in range(handoff.BATCH + 5)]
    items = [({'i': i}, s) for i, s in enumerate(socks)]
    sent, failed = handoff.send_all(old, [(('udp', '127.0.0.1', 53), items)])
    assert (sent, failed) == (len(socks), 0)
    batches = read_all(handoff.Receiver(new))
    assert [len(fds) for _, _, fds in batches] == [handoff.BATCH, 5]
    metas = [m for _, ms, _ in batches for m in ms]
    assert [m['i'] for m in metas] == list(range(len(socks)))
    for (key, _, fds), start in zip(batches, (0, handoff.BATCH)):
        assert key == ('udp', '127.0.0.1', 53)
        for offset, fd in enumerate(fds):   # the same kernel socket: same local address
            got = socket.socket(fileno=fd)
            assert got.getsockname() == socks[start + offset].getsockname()
            got.close()
    for s in socks:
        s.close()
    old.close()
    new.close()


def test_malformed_message_is_skipped_and_its_fds_closed():
    old, new = pair()
    s = udp_socket()
    socket.send_fds(old, [b'not json'], [s.fileno()])
    old.send(b'{"done": true}')
    before = len(os.listdir('/proc/self/fd'))
    assert read_all(handoff.Receiver(new)) == []
    assert len(os.listdir('/proc/self/fd')) <= before   # the received fd was closed
    s.close()
    old.close()
    new.close()


def test_eof_ends_the_receiver():
    old, new = pair()
    old.send(json.dumps({'listener': ['udp', '::1', 5], 'sessions': []}).encode())
    old.close()
    batches = read_all(handoff.Receiver(new))
    assert batches == [(('udp', '::1', 5), [], [])]
    new.close()


def test_a_closed_peer_fails_the_send_and_counts_it():
    old, new = pair()
    new.close()
    s = udp_socket()
    sent, failed = handoff.send_all(old, [(('udp', '127.0.0.1', 1), [({}, s)])])
    assert (sent, failed) == (0, 1)
    s.close()
    old.close()
