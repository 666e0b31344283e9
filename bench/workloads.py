"""The throughput workloads: one measurement each, through one proxy (or direct).

Each returns a `Sample`: the value (None when the run failed), whether a correctness check
failed (wrk: non-2xx/3xx responses or socket errors; iperf3: an error; udpload: a reply that
differs from its request), and a note saying what went wrong. The QUIC workloads' runs are
in bench/quic.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Sample:
    value: float | None
    bad: bool = False
    note: str = ''
    cpu: float | None = None   # the proxy's CPU use meanwhile, % of one core (workers summed)
    count: float | None = None     # QUIC: the work done (handshakes, MB), for cpu_per
    cpu_per: float | None = None   # QUIC: the proxy's CPU seconds per unit of `count`


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str
    port_key: str              # which listener of the proxy it uses
    target: tuple[str, float] | None  # ('>=', 1.1): mpproxy/nginx must be >= 1.1
    memory: bool = False
    quic: bool = False         # run by bench/quic.py: mpproxy and direct only


WORKLOADS = {w.name: w for w in (
    Workload('keepalive', 'TCP keep-alive req/resp (wrk)', 'req/s', 'http', ('>=', 1.1)),
    Workload('newconn', 'TCP new connections (wrk, Connection: close)', 'conn/s', 'http', ('>=', 1.0)),
    Workload('bulk1', 'TCP bulk, 1 stream (iperf3)', 'Gbit/s', 'iperf', ('>=', 1.1)),
    Workload('bulk8', 'TCP bulk, 8 streams (iperf3 -P 8)', 'Gbit/s', 'iperf', ('>=', 1.1)),
    Workload('udp', 'UDP req/resp, 64 steady clients', 'req/s', 'udp', ('>=', 1.2)),
    Workload('udpnew', 'UDP new source port per request', 'req/s', 'udpnew', ('>=', 1.2)),
    Workload('quicnew', 'QUIC new handshakes (aioquic, 16 at a time)', 'hs/s', 'quicsni', None,
             quic=True),
    Workload('quicsteady', 'QUIC steady, one connection (4 x 256 KiB streams)', 'Mbit/s',
             'quicsni', None, quic=True),
    Workload('quicinit', 'QUIC Initial from a new source port per request (udpload)', 'req/s',
             'quicinit', None, quic=True),
    Workload('memtcp', 'memory per idle TCP pair (5,000)', 'KiB', 'hold', ('<=', 0.5), True),
    Workload('memudp', 'memory per UDP session (5,000)', 'KiB', 'udp', ('<=', 1.0), True),
)}


def _taskset(cpu: str | None) -> list[str]:
    return ['taskset', '-c', cpu] if cpu is not None else []


def _run(argv: list[str], seconds: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)


def wrk(port: int, seconds: int, cpu: str | None, close: bool, threads: int = 1,
        conns: int = 32) -> Sample:
    argv = _taskset(cpu) + ['wrk', f'-t{threads}', f'-c{conns}', f'-d{seconds}s']
    if close:
        argv += ['-H', 'Connection: close']
    argv.append(f'http://127.0.0.1:{port}/')
    try:
        out = _run(argv, seconds)
    except subprocess.TimeoutExpired:
        return Sample(None, True, 'wrk timed out')
    m = re.search(r'^Requests/sec:\s+([\d.]+)', out.stdout, re.M)
    if out.returncode != 0 or not m:
        return Sample(None, True, f'wrk failed: {(out.stderr or out.stdout).strip()[:200]}')
    notes = []
    non2xx = re.search(r'Non-2xx or 3xx responses:\s+(\d+)', out.stdout)
    if non2xx and int(non2xx.group(1)):
        notes.append(f'{non2xx.group(1)} non-2xx/3xx')
    errs = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)',
                     out.stdout)
    if errs and any(int(x) for x in errs.groups()):
        notes.append('socket errors: connect {}, read {}, write {}, timeout {}'.format(*errs.groups()))
    total = re.search(r'^\s*(\d+) requests in', out.stdout, re.M)
    if total and int(total.group(1)) == 0:
        notes.append('no requests completed')
    return Sample(float(m.group(1)), bool(notes), '; '.join(notes))


def iperf3(port: int, seconds: int, cpu: str | None, streams: int) -> Sample:
    argv = _taskset(cpu) + ['iperf3', '-c', '127.0.0.1', '-p', str(port), '-t', str(seconds),
                            '-P', str(streams), '-J', '--connect-timeout', '3000']
    for attempt in range(3):           # "the server is busy" right after the previous test
        try:
            out = _run(argv, seconds)
        except subprocess.TimeoutExpired:
            return Sample(None, True, 'iperf3 timed out')
        try:
            result = json.loads(out.stdout)
        except json.JSONDecodeError:
            return Sample(None, True, f'iperf3 printed no JSON: {out.stderr.strip()[:200]}')
        error = result.get('error')
        if error and 'busy' in error and attempt < 2:
            time.sleep(1.0)
            continue
        if error:
            return Sample(None, True, f'iperf3: {error}')
        try:
            bps = result['end']['sum_received']['bits_per_second']
        except KeyError:
            return Sample(None, True, 'iperf3: no receiver sum')
        return Sample(bps / 1e9)
    return Sample(None, True, 'iperf3: server busy')


def udpload(binary: str, port: int, seconds: int, cpu: str | None, new: bool,
            clients: int = 64, payload: str | None = None) -> Sample:
    """udpload's load; with `payload` (a file, and `new`) every request is that file's bytes."""
    argv = _taskset(cpu) + [binary, 'load', str(port), str(clients), str(seconds)]
    if new:
        argv.append('new')
        if payload:
            argv.append(payload)
    try:
        out = _run(argv, seconds)
    except subprocess.TimeoutExpired:
        return Sample(None, True, 'udpload timed out')
    try:
        replies, bad, timeouts, elapsed = out.stdout.split()
        replies, bad, timeouts, elapsed = int(replies), int(bad), int(timeouts), float(elapsed)
    except ValueError:
        return Sample(None, True, f'udpload failed: {out.stderr.strip()[:200]}')
    notes = []
    if bad:
        notes.append(f'{bad} wrong replies')
    if replies == 0:
        notes.append('no replies')
    if timeouts:                      # a lost datagram is re-sent: slower, not wrong
        notes.append(f'{timeouts} lost datagrams re-sent')
    return Sample(replies / elapsed, bool(bad) or replies == 0, '; '.join(notes), count=replies)


def measure(workload: str, port: int, seconds: int, cpu: str | None, udpload_bin: str,
            multi: bool = False) -> Sample:
    """One run of a throughput workload against 127.0.0.1:port."""
    threads, conns = (2, 64) if multi else (1, 32)
    if workload == 'keepalive':
        return wrk(port, seconds, cpu, close=False, threads=threads, conns=conns)
    if workload == 'newconn':
        return wrk(port, seconds, cpu, close=True, threads=threads, conns=conns)
    if workload in ('bulk1', 'bulk8'):
        return iperf3(port, seconds, cpu, 1 if workload == 'bulk1' else 8)
    if workload in ('udp', 'udpnew'):
        return udpload(udpload_bin, port, seconds, cpu, new=workload == 'udpnew')
    raise ValueError(workload)
