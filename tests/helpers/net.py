"""The client side on loopback: free ports, TCP connections and echo round trips, UDP
clients, a PROXY-protocol exchange, an HTTP request, a TLS ClientHello, `EchoProber`
(echo connections in a thread that must never fail) and `UdpFleet` (many UDP clients on a
fixed cadence, in one thread). Every socket has a timeout and every
read a bound."""

from __future__ import annotations

import http.client
import random
import selectors
import socket
import threading
import time

RECV_TIMEOUT = 2.0          # a UDP client's per-recv timeout
PAYLOAD = b'hello through the proxy'


def _fixed_ports() -> range | None:
    """The largest run of ports below the kernel's ephemeral range (which port 0 draws from,
    for every client and upstream socket too), if it has 5,000 ports; else None."""
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(10000, low) if low - 10000 >= 5000 else None


_FIXED = _fixed_ports()
_given: set[int] = set()


def free_port(kind=socket.SOCK_STREAM, host='127.0.0.1') -> int:
    """A port free for both TCP and UDP on `host` right now, never given before in this run.

    Taken below the ephemeral range: a port from bind(0) could be drawn again, between this
    call and the proxy's bind, by any socket bound to port 0 (a test's client, a proxy's
    upstream socket); one out of that range can only collide with another test run's.
    """
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
    for _ in range(200):
        port = 0 if _FIXED is None else random.choice(_FIXED)
        if port in _given:
            continue
        try:
            with socket.socket(family, kind) as s:
                s.bind((host, port))
                port = s.getsockname()[1]
            if port in _given:
                continue
            with socket.socket(family, other) as s:
                s.bind((host, port))
        except OSError:
            continue
        _given.add(port)
        return port
    raise RuntimeError('no free port')


def port_free(port: int, host: str = '127.0.0.1') -> bool:
    """True when a TCP socket can bind `port` now (nothing holds it any more)."""
    try:
        with socket.socket() as s:
            s.bind((host, port))
        return True
    except OSError:
        return False


# -- TCP -------------------------------------------------------------------------------------

def connect(port: int, host='127.0.0.1', timeout: float = 5.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks, total = [], 0
    while total < limit:
        data = sock.recv(65536)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b''.join(chunks)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """`n` bytes from `sock`, or fewer when it reaches EOF first."""
    data = b''
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def echo_roundtrip(port: int, payload: bytes, host='127.0.0.1') -> bytes:
    """Send `payload` (from a thread), half-close, and read to EOF: what came back."""
    with connect(port, host) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
        sender.start()
        got = recv_all(sock)
        sender.join(10)
    return got


def first_bytes(port: int, n: int) -> bytes:
    """The first `n` bytes a new connection to `port` receives (a tagged backend's tag)."""
    with connect(port) as sock:
        return recv_exactly(sock, n)


def exchange(port: int, data: bytes, host='127.0.0.1', source=None, timeout=5.0) -> bytes:
    """Send `data`, half-close, read to EOF (b'' when the proxy resets or closes)."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        try:
            s.connect((host, port))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)
        except OSError:
            return b''


# -- UDP -------------------------------------------------------------------------------------

def client(family: int = socket.AF_INET, timeout: float = RECV_TIMEOUT) -> socket.socket:
    """A UDP client socket with a per-recv timeout."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(timeout)
    return sock


def roundtrip(sock: socket.socket, payload: bytes, dest: tuple) -> tuple[bytes, tuple]:
    """Send one datagram to `dest`; return the reply and the address it came from."""
    sock.sendto(payload, dest)
    return sock.recvfrom(70000)


# -- HTTP, TLS -------------------------------------------------------------------------------

def get(port: int, path: str, method: str = 'GET', timeout: float = 5.0):
    """(status, Content-Type, body) of one HTTP request to 127.0.0.1:`port`."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader('Content-Type'), response.read()
    finally:
        conn.close()


def status_code(port: int, path: str) -> int | None:
    """The HTTP status of GET `path` on 127.0.0.1:`port`, or None when nothing answers."""
    try:
        return get(port, path, timeout=2)[0]
    except OSError:
        return None


def metric_total(admin: int, name: str) -> int:
    """The sum of every series of metric `name` (all labels) on the admin endpoint's /metrics."""
    status, _, body = get(admin, '/metrics')
    assert status == 200
    total = 0
    for line in body.decode().splitlines():
        if line.startswith(name):
            total += int(float(line.rsplit(' ', 1)[1]))
    return total


def client_hello(server_name=None, alpn=()) -> bytes:
    """The ClientHello Python's ssl module sends for `server_name`, offering the ALPN
    protocols `alpn` (a real TLS client's)."""
    import ssl
    ctx = ssl.create_default_context()
    if server_name is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class EchoProber:
    """Echo connection after connection in a thread (a client that must never notice a
    reload, an upgrade or a fault), bounded by `seconds` and `limit`; every failure is kept."""

    def __init__(self, port: int, seconds: float = 12.0, limit: int = 3000, pause: float = 0.0):
        self.port, self.seconds, self.limit, self.pause = port, seconds, limit, pause
        self.ok = 0
        self.failures: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        n = 0
        while not self.stop.is_set() and n < self.limit and time.monotonic() < end:
            payload = b'client %d' % n
            try:
                got = echo_roundtrip(self.port, payload)
                if got == payload:
                    self.ok += 1
                else:
                    self.failures.append((n, got))
            except OSError as exc:
                self.failures.append((n, repr(exc)))
            n += 1
            if self.pause:
                self.stop.wait(self.pause)      # pacing, so the bound covers the whole test

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)


class UdpFleet:
    """`n` UDP clients, each sending a numbered datagram every `interval` to 127.0.0.1:`port`
    from its own source port, all driven by one thread (bounded: at most `limit` seconds).
    The backend is a `UdpEcho(tag_source=True)`: each reply names the upstream source port
    (the session) that carried it. `finish()` stops sending and waits for the replies."""

    def __init__(self, port: int, n: int = 50, interval: float = 0.01, limit: float = 60.0):
        self.dest = ('127.0.0.1', port)
        self.socks = []
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(('127.0.0.1', 0))
            sock.setblocking(False)
            self.socks.append(sock)
        self.interval = interval
        self.limit = limit
        self.sent = [0] * n
        self.replies: list[dict[int, int]] = [{} for _ in range(n)]   # seq -> upstream port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        selector = selectors.DefaultSelector()
        for i, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_READ, i)
        deadline = time.monotonic() + self.limit
        next_send = time.monotonic()
        quiet_until = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if not self.stop.is_set() and now >= next_send:
                for i, sock in enumerate(self.socks):
                    try:
                        sock.sendto(b'%d' % self.sent[i], self.dest)
                        self.sent[i] += 1
                    except OSError:
                        pass
                next_send += self.interval
            elif self.stop.is_set():
                quiet_until = quiet_until or now + 5.0
                if now >= quiet_until or self.complete():
                    break
            for key, _ in selector.select(max(0.0, min(next_send - time.monotonic(), 0.01))):
                i = key.data
                while True:
                    try:
                        data = self.socks[i].recv(200)
                    except (BlockingIOError, OSError):
                        break
                    port, _, seq = data.partition(b'|')
                    self.replies[i][int(seq)] = int(port)
        selector.close()

    def answered(self, at_least: int) -> bool:
        """Every client got at least this many replies."""
        return all(len(r) >= at_least for r in self.replies)

    def complete(self) -> bool:
        return all(len(r) >= s for r, s in zip(self.replies, self.sent))

    def finish(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        for sock in self.socks:
            sock.close()

    def lost(self) -> list[int]:
        """Per client: datagrams sent and never answered."""
        return [s - len(r) for r, s in zip(self.replies, self.sent)]

    def ports(self) -> list[set[int]]:
        """Per client: the upstream source ports its replies came through."""
        return [set(r.values()) for r in self.replies]
