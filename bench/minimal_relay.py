"""The least a Python relay can do per connection, for README "What stands in the way".

A TCP relay with no features at all (no timeouts, limits, logs, balancing, error handling
worth the name) on the same design as mpproxy's data path: an edge-triggered epoll of its
own, watched by a uvloop loop. It measures CPython's floor per new connection here:

    taskset -c 0 .venv/bin/python bench/minimal_relay.py 27090 BACKEND_PORT &
    taskset -c 1 wrk -t1 -c32 -d5s -H 'Connection: close' http://127.0.0.1:27090/

Listens on 127.0.0.1 only. Not used by mpproxy or by scripts/bench.
"""

import select
import socket
import sys

import uvloop

IN, OUT, RDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
ERR, HUP, ET = select.EPOLLERR, select.EPOLLHUP, select.EPOLLET
MASK = IN | OUT | RDHUP | ET
BUF = 65536
handlers = {}


class Side:
    __slots__ = ('sock', 'fd', 'peer', 'pending', 'readable', 'eof', 'connecting', 'shut',
                 'closed', 'hangup')

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = None
        self.pending = None       # bytes the socket did not take yet
        self.readable = self.eof = self.connecting = self.shut = self.closed = False
        self.hangup = False

    def event(self, ev):
        if ev & (IN | RDHUP | HUP | ERR):
            self.readable = True
            if ev & (RDHUP | HUP | ERR):
                self.hangup = True
        if ev & OUT:
            if self.connecting:
                self.connecting = False
                if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    close_pair(self)
                    return
            if self.pending is not None and not self.flush():
                return
            if self.peer.readable:
                self.peer.pump()
        if self.readable and not self.connecting:
            self.pump()

    def flush(self):
        try:
            n = self.sock.send(self.pending)
        except BlockingIOError:
            return False
        except OSError:
            close_pair(self)
            return False
        if n < len(self.pending):
            self.pending = self.pending[n:]
            return False
        self.pending = None
        if self.peer.eof and not self.shut:
            self.shut = True
            self.sock.shutdown(socket.SHUT_WR)
            if self.eof:
                close_pair(self)
        return True

    def pump(self):
        """Read and forward until the kernel is empty or the peer cannot take more."""
        peer = self.peer
        if peer.pending is not None or peer.connecting or self.closed:
            return
        while True:
            try:
                data = self.sock.recv(BUF)
            except BlockingIOError:
                self.readable = False
                return
            except OSError:
                close_pair(self)
                return
            if not data:
                self.readable = False
                self.eof = True
                if not peer.shut:
                    peer.shut = True
                    try:
                        peer.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                if peer.eof:
                    close_pair(self)
                return
            try:
                n = peer.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                close_pair(self)
                return
            if n < len(data):
                peer.pending = data[n:]
                return
            if len(data) < BUF and not self.hangup:
                self.readable = False
                return


def close_pair(side):
    for s in (side, side.peer):
        if s is not None and not s.closed:
            s.closed = True
            handlers.pop(s.fd, None)
            s.sock.close()


def main():
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    loop = uvloop.new_event_loop()
    epoll = select.epoll()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', port))
    listener.listen(4096)
    listener.setblocking(False)
    upstream = ('127.0.0.1', upstream_port)

    def on_epoll():
        for fd, ev in epoll.poll(0, 512):
            handler = handlers.get(fd)
            if handler is not None:
                handler(ev)

    def on_accept():
        for _ in range(8):
            try:
                fd, _addr = listener._accept()
            except BlockingIOError:
                return
            client = Side(socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd))
            client.sock.setblocking(False)
            up = Side(socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK))
            up.connecting = True
            client.peer, up.peer = up, client
            up.sock.connect_ex(upstream)
            for side in (client, up):
                handlers[side.fd] = side.event
                epoll.register(side.fd, MASK)

    loop.add_reader(epoll.fileno(), on_epoll)
    loop.add_reader(listener.fileno(), on_accept)
    loop.run_forever()


if __name__ == '__main__':
    main()
