"""Idle TCP connections for the memory test of scripts/bench.

    hold.py server PORT STATUSFILE      accept on 127.0.0.1:PORT and hold every connection
                                        without reading; STATUSFILE holds the number of live
                                        connections (rewritten when it changes)
    hold.py client PORT N [HOLD]        open N connections to 127.0.0.1:PORT in paced batches,
                                        print "ready <connected> <failed>", keep them open until
                                        stdin closes or HOLD seconds (default 300) pass

The server notices a closed connection (readable, and a peek reads EOF) and forgets it; a
connection that sends data is left unread and no longer watched. Loopback only, and bounded:
the server stops after --max-seconds (default 3600), the client after HOLD.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import sys
import time

BATCH = 100
BATCH_PAUSE = 0.01
CONNECT_TIMEOUT = 5.0


def server(port: int, status_file: str, max_seconds: float = 3600.0) -> None:
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(('127.0.0.1', port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ)
    live: set[socket.socket] = set()
    written = -1
    deadline = time.monotonic() + max_seconds

    def publish() -> None:
        nonlocal written
        if written != len(live):
            tmp = status_file + '.tmp'
            with open(tmp, 'w') as f:
                f.write(f'{len(live)}\n')
            os.replace(tmp, status_file)
            written = len(live)

    publish()
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.1):
            if key.fileobj is lsock:
                for _ in range(256):
                    try:
                        conn, _addr = lsock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    live.add(conn)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            conn = key.fileobj
            sel.unregister(conn)
            try:
                closed = conn.recv(1, socket.MSG_PEEK) == b''
            except OSError:
                closed = True
            if closed:
                live.discard(conn)
                conn.close()
        publish()


def client(port: int, n: int, hold: float = 300.0) -> None:
    socks: list[socket.socket] = []
    connected = failed = 0
    for start in range(0, n, BATCH):
        batch = []
        for _ in range(min(BATCH, n - start)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(('127.0.0.1', port))
            batch.append(s)
        poller = select.poll()
        pending = {s.fileno(): s for s in batch}
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while pending and time.monotonic() < deadline:
            for fd, _ev in poller.poll(100):
                s = pending.pop(fd)
                poller.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected += 1
                    socks.append(s)
                else:
                    failed += 1
                    s.close()
        failed += len(pending)
        for s in pending.values():
            s.close()
        time.sleep(BATCH_PAUSE)
    print(f'ready {connected} {failed}', flush=True)
    end = time.monotonic() + hold
    while time.monotonic() < end:              # until stdin closes
        r, _, _ = select.select([sys.stdin], [], [], 0.2)
        if r and not os.read(sys.stdin.fileno(), 4096):
            break
    for s in socks:
        s.close()


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == 'server':
        server(int(argv[1]), argv[2])
        return 0
    if len(argv) >= 3 and argv[0] == 'client':
        client(int(argv[1]), int(argv[2]), float(argv[3]) if len(argv) > 3 else 300.0)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
