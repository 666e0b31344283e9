"""Running out of file descriptors (EMFILE): the worker pauses accepting, logs, and recovers.

libuv's own accept path would accept and close every pending connection when the process
is out of files; mpproxy's leaves them in the backlog, so each is served once files free up.
"""

from __future__ import annotations

import collections
import socket
import time

from helpers.configs import tcp_config, with_keys
from helpers.net import connect, free_port
from helpers.proc import wait_for

NOFILE = 40           # a worker needs ~15 at rest; each relay takes 2 more


def cpu_seconds(pid: int) -> float:
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0      # utime + stime, in ticks


def test_out_of_files_pauses_accepting_and_serves_the_backlog_later(proxies, tcp_echo):
    port = free_port()
    config = with_keys(tcp_config(port, tcp_echo.address, workers=1,
                                  extra={'connect_timeout': '60s'}), worker_rlimit_nofile=NOFILE)
    proxy = proxies(config).start(wait_workers=1)
    [worker] = proxy.workers()
    # An accepted client whose upstream socket() fails for lack of files waits (up to
    # connect_timeout) for a file, like the clients still in the backlog.
    clients = []
    try:
        for i in range(30):                    # far more than 40 files allow: the rest queue
            sock = connect(port)
            sock.settimeout(5)
            sock.sendall(b'client %d;' % i)
            clients.append(sock)
        served = []
        for i, sock in enumerate(clients):     # those that fit are served now
            sock.settimeout(0.3 if served else 5)
            try:
                data = sock.recv(100)
            except socket.timeout:
                continue
            assert data == b'client %d;' % i
            served.append(i)
        waiting = [i for i in range(len(clients)) if i not in served]
        assert served and len(waiting) >= 5, (served, waiting)
        proxy.wait_log('Too many open files')
        # paused, not spinning: the worker's CPU time stays flat while the backlog waits
        before = cpu_seconds(worker)
        time.sleep(2.0)                        # the stall under test: nothing may happen
        assert cpu_seconds(worker) - before < 0.3
        # rate-limited: at most one line a second per cause, not one per failed call
        lines = [l for l in proxy.log().splitlines() if 'Too many open files' in l]
        per_second = collections.Counter((l[:19], l.split(': ')[2].split(' failed')[0]) for l in lines)
        assert max(per_second.values()) == 1, per_second
        assert any('similar suppressed' in l for l in lines), lines
        # the waiting clients were not reset: freeing files serves them, in the order of need
        for i in served:
            clients[i].close()
        for i in waiting:
            sock = clients[i]
            sock.settimeout(5)
            assert sock.recv(100) == b'client %d;' % i
            sock.sendall(b'more')
            assert sock.recv(100) == b'more'
            sock.close()                       # frees files for the next one
    finally:
        for sock in clients:
            sock.close()
    assert proxy.workers() == [worker], 'the worker crashed or was replaced'
    log = proxy.log()
    assert 'Traceback' not in log and 'unexpected' not in log
    assert 'is down' not in log, 'running out of files is not the upstream server failing'
    wait_for(lambda: connect(port).close() is None, 5, what='accepting again')
