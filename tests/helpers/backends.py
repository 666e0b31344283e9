"""Real servers on loopback, each in its own thread(s): a TCP server with a per-connection
handler (`TcpBackend`, `echo_handler`, `tagged_backend`, `HeaderEcho`), a UDP server
(`UdpServer`, `UdpEcho`) and a DNS responder (`DnsServer`). The test closes what it starts
(the fixtures of conftest.py do it for theirs)."""

from __future__ import annotations

import socket
import struct
import threading

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


def tagged_backend(tag: bytes) -> TcpBackend:
    """A backend that answers every connection with its tag, then echoes."""
    def handler(conn):
        conn.sendall(tag)
        echo_handler(conn)
    return TcpBackend(handler)


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
    """Answers A queries from `records` (name -> [ipv4, ...]); AAAA gets no data; unknown
    names get NXDOMAIN. `silent = True` makes it stop answering."""

    def __init__(self, records: dict[str, list[str]]):
        self.records = records
        self.silent = False
        self.queries = 0
        super().__init__()

    def answer(self, data: bytes, addr) -> bytes | None:
        self.queries += 1
        if self.silent or len(data) < 17:
            return None
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode().lower())
            i += 1 + data[i]
        qtype, = struct.unpack_from('!H', data, i + 1)
        question = data[12:i + 5]
        ips = self.records.get('.'.join(labels))
        rcode = 3 if ips is None else 0
        answers = [socket.inet_aton(ip) for ip in ips or ()] if qtype == 1 else []
        out = data[:2] + struct.pack('!HHHHH', 0x8180 | rcode, 1, len(answers), 0, 0) + question
        for rdata in answers:
            out += b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, 1, 4) + rdata
        return out
