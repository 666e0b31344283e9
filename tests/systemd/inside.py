"""The container's side of tests/systemd: run by the container's python3 (Debian's, the
standard library only) through `nsenter`, or as a service by `systemd-run`. All traffic
stays on the container's own loopback.

    inside.py echo PORT PREFIX            TCP server: answers each read with PREFIX + data
    inside.py dns PORT DELAY NAME=IP...   DNS server: answers A queries after DELAY seconds
    inside.py roundtrip PORT DATA [SECS]  one connection: send DATA, print the answer
    inside.py then PORT DATA CMD...       run CMD, then at once one round trip; prints
                                          CMD's exit code, then the answer
    inside.py hold PORT                   one connection kept open; stdin drives it:
                                          `send DATA` -> prints the answer, `close`
    inside.py start-watch UNIT PORT       `systemctl start --no-block UNIT`, then samples
                                          its state and whether PORT listens, until active;
                                          one echo round trip at once then; prints JSON
    inside.py try-write PATH...           create a file in each PATH: prints PATH ok|ERRNO
    inside.py children PID                the pids of PID's children, as JSON

Every wait has a deadline; every answer is one line on stdout.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

TIMEOUT = 5.0


def echo(port: str, prefix: str) -> None:
    head = prefix.encode()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                self.request.sendall(head + data)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(('127.0.0.1', int(port)), Handler) as server:
        server.serve_forever()


def dns(port: str, delay: str, *records: str) -> None:
    """A records from NAME=IP; AAAA gets no data; other names NXDOMAIN. Each answer waits
    DELAY seconds in a thread of its own, so a slow answer holds up no other."""
    table = dict(record.split('=', 1) for record in records)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(('127.0.0.1', int(port)))

    def answer(data: bytes, addr) -> None:
        time.sleep(float(delay))
        labels, i = [], 12
        while data[i]:
            labels.append(data[i + 1:i + 1 + data[i]].decode().lower())
            i += 1 + data[i]
        qtype, = struct.unpack_from('!H', data, i + 1)
        ip = table.get('.'.join(labels))
        rcode = 3 if ip is None else 0
        rdata = [socket.inet_aton(ip)] if ip is not None and qtype == 1 else []
        out = data[:2] + struct.pack('!HHHHH', 0x8180 | rcode, 1, len(rdata), 0, 0)
        out += data[12:i + 5]
        for one in rdata:
            out += b'\xc0\x0c' + struct.pack('!HHIH', 1, 1, 1, 4) + one
        sock.sendto(out, addr)

    while True:
        data, addr = sock.recvfrom(512)
        if len(data) >= 17:
            threading.Thread(target=answer, args=(data, addr), daemon=True).start()


def _exchange(sock: socket.socket, data: bytes) -> str:
    sock.sendall(data)
    return sock.recv(65536).decode()


def roundtrip(port: str, data: str, timeout: str = str(TIMEOUT)) -> None:
    try:
        with socket.create_connection(('127.0.0.1', int(port)), timeout=float(timeout)) as sock:
            print(_exchange(sock, data.encode()))
    except OSError as exc:
        print(f'error {errno.errorcode.get(exc.errno, exc)}')


def then(port: str, data: str, *command: str) -> None:
    """CMD, then the round trip with no delay: no interpreter to start in between."""
    code = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=sys.stderr,
                          timeout=120).returncode
    print(code)
    roundtrip(port, data)


def hold(port: str) -> None:
    sock = socket.create_connection(('127.0.0.1', int(port)), timeout=TIMEOUT)
    print('connected', flush=True)
    for line in sys.stdin:
        command, _, data = line.rstrip('\n').partition(' ')
        if command == 'close':
            break
        try:
            print(_exchange(sock, data.encode()) or 'eof', flush=True)
        except OSError as exc:
            print(f'error {errno.errorcode.get(exc.errno, exc)}', flush=True)
    sock.close()
    print('closed', flush=True)


def _listening(port: int) -> bool:
    """A TCP socket of this network namespace listens on 127.0.0.1:port (/proc/net/tcp)."""
    want = '0100007F:%04X' % port
    with open('/proc/net/tcp') as f:
        return any(line.split()[1] == want and line.split()[3] == '0A' for line in f)


def _show(unit: str, *props: str) -> dict[str, str]:
    out = subprocess.run(['systemctl', 'show', unit, '-p', ','.join(props)],
                         capture_output=True, text=True, timeout=TIMEOUT).stdout
    return dict(line.split('=', 1) for line in out.splitlines() if '=' in line)


def start_watch(unit: str, port: str, limit: str = '30') -> None:
    """Samples of (seconds since the start job, ActiveState, SubState, listening) from the
    start job until the unit is active or failed; at once then, one echo round trip."""
    start = time.monotonic()
    subprocess.run(['systemctl', 'start', '--no-block', unit], check=True, timeout=TIMEOUT)
    samples, first = [], None
    while time.monotonic() - start < float(limit):
        state = _show(unit, 'ActiveState', 'SubState')
        samples.append([round(time.monotonic() - start, 3), state['ActiveState'],
                        state['SubState'], _listening(int(port))])
        if state['ActiveState'] in ('active', 'failed', 'inactive') and len(samples) > 1:
            break
        time.sleep(0.02)
    if samples and samples[-1][1] == 'active':
        try:
            with socket.create_connection(('127.0.0.1', int(port)), timeout=1.0) as sock:
                sock.settimeout(1.0)
                first = _exchange(sock, b'at once')
        except OSError as exc:
            first = f'error {errno.errorcode.get(exc.errno, exc)}'
    print(json.dumps({'samples': samples, 'first': first}))


def try_write(*paths: str) -> None:
    for path in paths:
        name = os.path.join(path, f'mpproxy-check-{os.getpid()}')
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            print(path, errno.errorcode.get(exc.errno, str(exc.errno)))
            continue
        os.close(fd)
        print(path, 'ok', name)


def children(pid: str) -> None:
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        print(json.dumps([int(p) for p in f.read().split()]))


COMMANDS = {'echo': echo, 'dns': dns, 'roundtrip': roundtrip, 'then': then, 'hold': hold,
            'start-watch': start_watch, 'try-write': try_write, 'children': children}

if __name__ == '__main__':
    COMMANDS[sys.argv[1]](*sys.argv[2:])
