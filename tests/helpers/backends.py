"""Real servers on loopback, each in its own thread(s): a TCP server with a per-connection
handler (`TcpBackend`, `echo_handler`, `tagged_backend`, `HeaderEcho`), a UDP server
(`UdpServer`, `UdpEcho`) and a DNS server over UDP and TCP (`DnsServer`). The test closes
what it starts (the fixtures of conftest.py do it for theirs)."""

from __future__ import annotations

import socket
import struct
import threading
import time

from helpers.net import recv_exactly

from mpproxy.proxy.edge import proxy_header


def _address(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


class TcpBackend:
    """A threaded TCP server on loopback; `handler(conn)` runs per connection in a thread."""

    def __init__(self, handler, host='127.0.0.1', port=0):
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(512)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.handler = handler
        self.peers: list[tuple] = []
        self.conns: list[socket.socket] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return _address(self.host, self.port)

    def _accept(self):
        while not self.closed.is_set():
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def echo_handler(conn: socket.socket):
    """Echo until the client's FIN, then FIN back."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def tagged_backend(tag: bytes, port: int = 0) -> TcpBackend:
    """A backend that answers every connection with its tag, then echoes (on `port`: a
    server coming back where it was)."""
    def handler(conn):
        conn.sendall(tag)
        echo_handler(conn)
    return TcpBackend(handler, port=port)


class HeaderEcho(TcpBackend):
    """Reads a PROXY header (if any) off each connection, records it, echoes the rest."""

    def __init__(self, host='127.0.0.1'):
        self.headers: list = []             # (ProxyHeader or None, the raw bytes)
        super().__init__(self._handle, host)

    def _handle(self, conn: socket.socket):
        conn.settimeout(5)
        data = b''
        while True:
            state, header, used, _ = proxy_header.parse(data)
            if state != proxy_header.MORE:
                break
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        if state == proxy_header.DONE:
            self.headers.append((header, data[:used]))
            data = data[used:]
        else:
            self.headers.append((None, b''))
        if data:
            conn.sendall(data)
        echo_handler(conn)


class UdpServer:
    """A UDP server in a thread: `answer(data, addr)` returns the reply, or None for none."""

    def __init__(self, host='127.0.0.1', port=0):
        family = socket.AF_INET6 if ':' in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.2)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return _address(self.host, self.port)

    def answer(self, data: bytes, addr) -> bytes | None:
        raise NotImplementedError

    def _run(self):
        while not self.stop.is_set():
            try:
                data, addr = self.sock.recvfrom(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self.answer(data, addr)
            if reply is not None:
                try:
                    self.sock.sendto(reply, addr)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.sock.close()


class UdpEcho(UdpServer):
    """A UDP echo server; records the source address of every datagram.

    `tag_source`: each reply starts with `<source port>|`, so a client can tell which
    upstream socket (session) carried its datagram.
    """

    def __init__(self, host='127.0.0.1', prefix=b'', port=0, tag_source=False):
        self.prefix = prefix
        self.tag_source = tag_source
        self.sources: list[tuple] = []
        super().__init__(host, port)

    def answer(self, data: bytes, addr) -> bytes:
        self.sources.append(addr)
        tag = b'%d|' % addr[1] if self.tag_source else b''
        return tag + self.prefix + data


class DnsServer(UdpServer):
    """A DNS server on 127.0.0.1 answering over UDP and TCP on one port.

    `records`: name -> [address, ...]; IPv4 addresses answer A queries, IPv6 ones AAAA. A
    name it does not know gets NXDOMAIN; a known name without the asked type, no data.
    Records carry the TTL `ttls.get(name, ttl)`; `rcodes` (name -> rcode, e.g. 2 SERVFAIL)
    makes it fail a name instead. Over UDP an answer longer than 512 bytes
    (no EDNS here, whatever the query offers) is cut to the records that fit and has TC
    set; over TCP it is whole. `silent = True` makes it stop answering. `asked` lists every
    query as (time.monotonic(), name, 'A' | 'AAAA' | type number, 'udp' | 'tcp').
    """

    UDP_LIMIT = 512
    TYPES = {1: 'A', 28: 'AAAA'}

    def __init__(self, records: dict[str, list[str]], ttl: int = 1):
        self.records = records
        self.ttl = ttl
        self.ttls: dict[str, int] = {}
        self.rcodes: dict[str, int] = {}
        self.silent = False
        self.queries = 0
        self.asked: list[tuple[float, str, object, str]] = []
        for _ in range(20):                      # a port that is free for both UDP and TCP
            super().__init__()
            try:
                self.tcp = TcpBackend(self._serve_stream, self.host, self.port)
                return
            except OSError:
                super().close()
        raise OSError('DnsServer: found no port free for both UDP and TCP')

    def names_asked(self, qtype='A', transport=None) -> list[str]:
        """The names of the queries of `qtype` (over `transport`, or either), in order."""
        return [name for _, name, kind, how in list(self.asked)
                if kind == qtype and transport in (None, how)]

    def answer(self, data: bytes, addr) -> bytes | None:
        return self._reply(data, 'udp')

    def _serve_stream(self, conn: socket.socket):
        """Length-prefixed queries on one TCP connection until the client closes it."""
        conn.settimeout(5)
        while True:
            head = recv_exactly(conn, 2)
            if len(head) < 2:
                return
            data = recv_exactly(conn, struct.unpack('!H', head)[0])
            reply = self._reply(data, 'tcp')
            if reply is None:
                return
            conn.sendall(struct.pack('!H', len(reply)) + reply)

    def _reply(self, data: bytes, transport: str) -> bytes | None:
        self.queries += 1
        if len(data) < 17:
            return None
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode().lower())
            i += 1 + data[i]
        qtype, = struct.unpack_from('!H', data, i + 1)
        question = data[12:i + 5]
        name = '.'.join(labels)
        self.asked.append((time.monotonic(), name, self.TYPES.get(qtype, qtype), transport))
        if self.silent:
            return None
        ips = self.records.get(name)
        family = {1: socket.AF_INET, 28: socket.AF_INET6}.get(qtype)
        rdatas = [socket.inet_pton(family, ip) for ip in ips or ()
                  if family and (':' in ip) == (family == socket.AF_INET6)]
        rcode = self.rcodes.get(name, 3 if ips is None else 0)
        flags, body, count = 0x8180 | rcode, b'', 0
        if rcode:
            rdatas = []
        ttl = self.ttls.get(name, self.ttl)
        for rdata in rdatas:
            record = b'\xc0\x0c' + struct.pack('!HHIH', qtype, 1, ttl, len(rdata)) + rdata
            if transport == 'udp' and 12 + len(question) + len(body) + len(record) > self.UDP_LIMIT:
                flags |= 0x0200                   # TC: the client should ask over TCP
                break
            body += record
            count += 1
        return data[:2] + struct.pack('!HHHHH', flags, 1, count, 0, 0) + question + body

    def close(self):
        super().close()
        tcp = getattr(self, 'tcp', None)
        if tcp is not None:
            tcp.close()

