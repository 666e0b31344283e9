"""UDP sessions survive a reload: handed from the old worker to the new one of each slot."""

from __future__ import annotations

import signal
import socket
import threading
import time

from helpers.backends import UdpEcho
from helpers.configs import listener, udp_config
from helpers.net import free_port
from helpers.proc import wait_for


class Pinger:
    """A UDP client sending a numbered datagram every `interval`; records replies."""

    def __init__(self, port: int, interval: float = 0.01, host='127.0.0.1'):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, port))
        self.sock.settimeout(0.05)
        self.interval = interval
        self.sent = 0
        self.replies: dict[int, int] = {}           # seq -> upstream source port
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self):
        deadline = time.monotonic() + 30
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.sock.send(b'%d' % self.sent)
            self.sent += 1
            time.sleep(self.interval)   # the sending cadence itself, not a wait for a condition

    def _recv(self):
        while True:
            try:
                data = self.sock.recv(100)
            except socket.timeout:
                if self.stop.is_set() and len(self.replies) >= self.sent:
                    return
                continue
            except OSError:
                return
            port, seq = data.split(b'|')
            self.replies[int(seq)] = int(port)

    def finish(self, timeout=3.0):
        self.stop.set()
        self.threads[0].join(2)
        wait_for(lambda: len(self.replies) >= self.sent, timeout,
                 what=f'replies to all {self.sent} datagrams (got {len(self.replies)})')
        self.sock.close()




def test_udp_sessions_survive_reload_with_same_upstream_source_port(proxies):
    backend = UdpEcho(tag_source=True)
    try:
        port = free_port()
        proxy = proxies(udp_config(port, backend.address, workers=2)).start(wait_workers=2)
        pingers = [Pinger(port) for _ in range(6)]
        wait_for(lambda: all(len(p.replies) >= 5 for p in pingers), 5, what='sessions up')
        old_workers = set(proxy.workers())
        proxy.write_config(udp_config(port, backend.address, workers=2,
                                      extra={'idle_timeout': '45s'}))
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active')
        sent_at_reload = [p.sent for p in pingers]
        wait_for(lambda: all(len(p.replies) >= s + 20 for p, s in zip(pingers, sent_at_reload)), 5,
                 what='replies after the reload')
        for p in pingers:
            p.finish()
        for p in pingers:
            assert len(p.replies) == p.sent, f'lost {p.sent - len(p.replies)} of {p.sent}'
            assert len(set(p.replies.values())) == 1, 'the upstream saw a new source port'
        log = proxy.log()
        assert 'handed' in log and 'took over' in log, log
        new_workers = set(proxy.serving_workers())
        assert new_workers and not new_workers & old_workers
        # the old workers had nothing left to finish: they exit at once
        wait_for(lambda: not set(proxy.workers()) & old_workers, 5, what='old workers gone')
    finally:
        backend.close()


def test_udp_sessions_survive_many_reloads(proxies):
    backend = UdpEcho(tag_source=True)
    try:
        port = free_port()
        proxy = proxies(udp_config(port, backend.address, workers=1)).start(wait_workers=1)
        pinger = Pinger(port)
        wait_for(lambda: len(pinger.replies) >= 5, 5, what='a session')
        for gen in range(2, 7):
            proxy.signal(signal.SIGHUP)
            proxy.wait_log(f'generation {gen} active')
        pinger.finish()
        assert len(pinger.replies) == pinger.sent
        assert len(set(pinger.replies.values())) == 1
    finally:
        backend.close()


def test_sessions_of_a_removed_udp_listener_are_closed(proxies):
    backend = UdpEcho(tag_source=True)
    try:
        kept, removed = free_port(), free_port()
        both = udp_config(kept, backend.address, workers=1)
        both['listeners'].append(listener(removed, [backend.address], 'udp'))
        proxy = proxies(both).start(wait_workers=1)
        a, b = Pinger(kept), Pinger(removed)
        wait_for(lambda: len(a.replies) >= 3 and len(b.replies) >= 3, 5, what='sessions')
        proxy.write_config(udp_config(kept, backend.address, workers=1))
        proxy.signal(signal.SIGHUP)
        proxy.wait_log('generation 2 active')
        proxy.wait_log('closed 1 of removed listeners')
        b.stop.set()
        a.finish()
        assert len(a.replies) == a.sent and len(set(a.replies.values())) == 1
        b.sock.close()
    finally:
        backend.close()
