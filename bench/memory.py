"""The memory workloads: RSS growth of a proxy's worker per idle TCP pair and per UDP session.

Each is run on a freshly started proxy (so memory freed by an earlier test cannot be reused
and hide the cost), after a small warm-up, and reads VmRSS of the worker before and while the
connections / sessions are held.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

from procs import Procs, rss_kib, udp_ping
from servers import HERE, Proxy
from workloads import Sample

SETTLE = 1.0


def _hold_count(workdir: Path) -> int:
    try:
        return int((workdir / 'hold.count').read_text())
    except (OSError, ValueError):
        return -1


def _wait_hold(workdir: Path, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _hold_count(workdir) == want:
            return True
        time.sleep(0.05)
    return False


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode().strip() if r else ''


def _worker(proxy: Proxy) -> int:
    pids = proxy.workers()
    if len(pids) != 1:
        raise RuntimeError(f'{proxy.name}: expected one worker process, found {pids}')
    return pids[0]


def mem_tcp(proxy: Proxy, procs: Procs, workdir: Path, n: int, cpu: str | None) -> Sample:
    """KiB of worker RSS per idle connection pair, `n` pairs held through the proxy."""
    port = proxy.ports['hold']
    client = [sys.executable, str(HERE / 'hold.py'), 'client', str(port)]
    if not _wait_hold(workdir, 0, 15):
        return Sample(None, True, 'hold server still has connections from before')
    warm = procs.start(f'hold-warm-{proxy.name}', client + ['50', '10'], cpu,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = _readline(warm, 30)
    _wait_hold(workdir, 50, 10)
    warm.stdin.close()
    warm.wait(15)
    procs.stop(warm)
    if not line.startswith('ready 50 ') or not _wait_hold(workdir, 0, 15):
        return Sample(None, True, f'warm-up failed ({line!r})')
    time.sleep(SETTLE)
    pid = _worker(proxy)
    before = rss_kib(pid)
    holder = procs.start(f'hold-client-{proxy.name}', client + [str(n), '300'], cpu,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = _readline(holder, 120).split()
        if len(line) != 3 or line[0] != 'ready':
            return Sample(None, True, f'hold client: {line!r}')
        connected, failed = int(line[1]), int(line[2])
        if not _wait_hold(workdir, n, 30):
            return Sample(None, True, f'{connected} connected, {failed} failed, '
                                      f'{_hold_count(workdir)} reached the backend')
        time.sleep(SETTLE)
        after = rss_kib(pid)
    finally:
        _release(holder, procs)
    _wait_hold(workdir, 0, 30)
    return Sample((after - before) / n, False, f'RSS {before} -> {after} KiB')


def mem_udp(proxy: Proxy, procs: Procs, udpload: str, n: int, cpu: str | None) -> Sample:
    """KiB of worker RSS per UDP session, `n` client sockets each sending one datagram."""
    port = proxy.ports['udp']
    for i in range(3):                              # warm-up: a few sessions
        if not udp_ping(port, payload=f'warm {i}'.encode()):
            return Sample(None, True, 'warm-up datagram got no reply')
    time.sleep(SETTLE)
    pid = _worker(proxy)
    before = rss_kib(pid)
    holder = procs.start(f'udp-sessions-{proxy.name}', [udpload, 'sessions', str(port), str(n), '300'],
                         cpu, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = _readline(holder, 120).split()
        if len(line) != 4 or line[0] != 'ready':
            return Sample(None, True, f'udpload sessions: {line!r}')
        replies, bad, missing = (int(x) for x in line[1:])
        time.sleep(SETTLE)
        after = rss_kib(pid)
    finally:
        _release(holder, procs)
    note = f'RSS {before} -> {after} KiB; {replies} replies'
    if bad or missing:
        note += f', {bad} wrong, {missing} missing'
    return Sample((after - before) / n, bool(bad or missing), note)


def _release(holder, procs: Procs) -> None:
    """Tell a holder to let go (EOF on its stdin), give it time, then stop it for sure."""
    if holder.stdin:
        holder.stdin.close()
    try:
        holder.wait(15)
    except subprocess.TimeoutExpired:
        pass
    procs.stop(holder)
