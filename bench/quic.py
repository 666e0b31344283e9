"""The QUIC workloads of scripts/bench (issue 16): their backends, measurements and table.

    quicnew     new QUIC handshakes per second: each a new client socket, a full handshake
                with SNI (the server's certificate checked), then CONNECTION_CLOSE
    quicsteady  one established QUIC connection, 4 streams at a time each fetching 256 KiB
    quicinit    udpload's udpnew at full speed with a real QUIC Initial (aioquic's, 1200 bytes,
                its whole ClientHello) as every request: each a new source port, so a new
                session whose name is read, echoed once (`udp.responses: 1`); mpproxy's limit

Each runs three ways ("variants"): `mpproxy` through a udp listener with sni_routes (a.bench
and b.bench to their own aioquic server; quicinit: both to udpload's echo), `mpproxy-udp`
through plain udp listeners (one per server; quicinit: the udpnew listener), with no QUIC
reading: what sni_routes adds is the difference, and `direct`. nginx and HAProxy cannot route
QUIC by name (n/a). The QUIC ends are bench/quicpeer.py (aioquic, the `bench` extra), run as
separate processes on the load CPU; aioquic in Python is the limit of quicnew's and
quicsteady's rates, so the table also gives mpproxy's worker CPU time per handshake / per MB
(at a few % of a core, where each datagram wakes the worker: more per unit than at full load).

Ports: backends 26460 (a.bench), 26461 (b.bench); mpproxy base + 6 sni_routes, + 7 / + 8
plain to a / b, + 9 quicinit's sni_routes (26506-26509). The aioquic listeners' idle_timeout
is IDLE, so in quicnew sessions end at the rate they start, as in a steady state; the
handshake client keeps each port HOLD seconds after its connection closed, since a new
connection from the address of a session that is still open would go where that session
goes (mpproxy keys sessions by address).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from procs import Procs
from workloads import WORKLOADS, Sample
from workloads import udpload as udpload_run

HERE = Path(__file__).resolve().parent
PEER = HERE / 'quicpeer.py'
NAMES = ('a.bench', 'b.bench')
BACKEND = {'quic.a': 26460, 'quic.b': 26461}
KEYS = ('quicsni', 'quic.a', 'quic.b', 'quicinit')   # after servers.KEYS in a proxy's ports
VARIANTS = ('mpproxy', 'mpproxy-udp', 'direct')
TITLES = {'mpproxy': 'mpproxy sni_routes', 'mpproxy-udp': 'mpproxy plain udp',
          'direct': 'direct'}
CONCURRENCY = 16            # handshakes in flight
MAX_PER_SECOND = 5000       # the handshake loop's count bound, per second of the measurement
STREAMS, SIZE = 4, 256 * 1024
IDLE = 2                    # s, the QUIC listeners' idle_timeout
HOLD = IDLE + 1.0           # s, a closed connection's port kept: idle + one sweep (0.5 s) + margin
INITIAL = 'quic-initial.bin'  # in the workdir: quicinit's request
PER = {'quicnew': 'handshake', 'quicsteady': 'MB', 'quicinit': 'session'}


def mpproxy_yaml(ports: dict, echo: int) -> tuple[str, str]:
    """(the `upstreams:` block, the listener lines) of mpproxy's QUIC listeners; `echo` is
    udpload's echo port (quicinit's listener is the udpnew listener with sni_routes)."""
    ups = (f'upstreams:\n  qa: {{servers: ["127.0.0.1:{BACKEND["quic.a"]}"]}}\n'
           f'  qb: {{servers: ["127.0.0.1:{BACKEND["quic.b"]}"]}}\n'
           f'  echo: {{servers: ["127.0.0.1:{echo}"]}}\n')
    listeners = (
        f'  - {{listen: "127.0.0.1:{ports["quicsni"]}", protocol: udp, idle_timeout: {IDLE}s,\n'
        f'     sni_routes: {{"{NAMES[0]}": qa, "{NAMES[1]}": qb}}}}\n'
        f'  - {{listen: "127.0.0.1:{ports["quic.a"]}", protocol: udp, upstream: qa, '
        f'idle_timeout: {IDLE}s}}\n'
        f'  - {{listen: "127.0.0.1:{ports["quic.b"]}", protocol: udp, upstream: qb, '
        f'idle_timeout: {IDLE}s}}\n'
        f'  - {{listen: "127.0.0.1:{ports["quicinit"]}", protocol: udp, idle_timeout: 10m,\n'
        f'     udp: {{responses: 1}}, sni_routes: {{"{NAMES[0]}": echo, "{NAMES[1]}": echo}}}}\n')
    return ups, listeners


def targets(variant: str, ports: dict) -> list[tuple[str, int]]:
    """(server name, port) per name: one port for both through sni_routes, else one each."""
    if variant == 'mpproxy':
        return [(name, ports['quicsni']) for name in NAMES]
    return [(NAMES[0], ports['quic.a']), (NAMES[1], ports['quic.b'])]


def _client(args: list[str], cpu: str | None, seconds: float) -> dict:
    argv = (['taskset', '-c', cpu] if cpu is not None else []) + [sys.executable, str(PEER)] + args
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return {'error': 'quicpeer timed out'}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {'error': f'quicpeer failed: {out.stderr.strip()[-300:]}'}


def aioquic_initials(name: str) -> list[bytes]:
    """The datagrams an aioquic client sends first to connect as `name` (ALPN h3)."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    client = QuicConnection(configuration=QuicConfiguration(is_client=True, server_name=name,
                                                            alpn_protocols=['h3']))
    client.connect(('127.0.0.1', 443), now=0.0)
    return [datagram for datagram, _ in client.datagrams_to_send(now=0.0)]


def start_backends(procs: Procs, workdir: Path, cpu: str | None) -> list:
    """The two aioquic servers, each answering a handshake, and quicinit's Initial (in
    `workdir`); raises RuntimeError if any is missing."""
    try:
        initials = aioquic_initials(NAMES[0])
    except ImportError as e:
        raise RuntimeError(f'{e} (the bench extra: pip install -e ".[bench]")') from None
    if len(initials) != 1:
        raise RuntimeError(f'aioquic\'s ClientHello takes {len(initials)} datagrams, not one')
    (workdir / INITIAL).write_bytes(initials[0])
    started = []
    for name, key in zip(NAMES, BACKEND):
        started.append(procs.start(f'backend-{name}', [sys.executable, str(PEER), 'server', name,
                                                       str(BACKEND[key])], cpu))
    deadline = time.monotonic() + 20
    for proc, name in zip(started, NAMES):
        log = workdir / f'backend-{name}.log'
        while not (log.exists() and 'ready' in log.read_text(errors='replace')):
            if proc.poll() is not None or time.monotonic() > deadline:
                for p in started:
                    procs.stop(p)
                tail = procs.log_tail(f'backend-{name}')
                raise RuntimeError(f'aioquic server {name} did not start (needs the bench extra: '
                                   f'pip install -e ".[bench]"):\n{tail}')
            time.sleep(0.05)
    check = _client(['handshakes', _arg(targets('direct', BACKEND)), '3', '2', '1', '0'], cpu, 3)
    if check.get('ok') != 2:
        for p in started:
            procs.stop(p)
        raise RuntimeError(f'the aioquic servers do not complete a handshake: {check}')
    return started


def _arg(pairs: list[tuple[str, int]]) -> str:
    return ','.join(f'{name}={port}' for name, port in pairs)


def measure(workload: str, variant: str, ports: dict, seconds: int, cpu: str | None,
            udpload: str, workdir: Path) -> Sample:
    """One run of `workload` through `variant`; `count` is what PER names."""
    if workload == 'quicinit':
        port = ports['quicinit'] if variant == 'mpproxy' else ports['udpnew']
        return udpload_run(udpload, port, seconds, cpu, new=True,
                           payload=str(workdir / INITIAL))
    pairs = targets(variant, ports)
    if workload == 'quicnew':
        got = _client(['handshakes', _arg(pairs), str(seconds), str(MAX_PER_SECOND * seconds),
                       str(CONCURRENCY), str(HOLD)], cpu, seconds + HOLD)
    else:
        name, port = pairs[0]
        got = _client(['steady', name, str(port), str(seconds), str(STREAMS), str(SIZE)],
                      cpu, seconds)
    if 'ok' not in got:
        return Sample(None, True, got.get('error', 'no result'))
    notes = []
    if got['wrong']:
        notes.append(f'{got["wrong"]} wrong')
    if got['failed']:
        notes.append(f'{got["failed"]} failed')
    if got['error']:
        notes.append(f'first: {got["error"][:120]}')
    elapsed = got['elapsed']
    if workload == 'quicnew':
        value, count = got['ok'] / elapsed, got['ok']
    else:
        value, count = got['bytes'] * 8 / 1e6 / elapsed, got['bytes'] / 1e6
    return Sample(value, bool(got['wrong'] or got['failed']) or not got['ok'], '; '.join(notes),
                  count=count or None)


def parse_cost() -> str:
    """µs for edge.quic.ClientHelloReader to read one aioquic ClientHello, in this process."""
    try:
        from mpproxy.proxy.edge.quic import DONE, ClientHelloReader
        initials = aioquic_initials(NAMES[0])
    except ImportError as e:
        return f'not measured ({e})'
    runs = []
    for _ in range(5):
        t0, n = time.perf_counter(), 2000
        for _ in range(n):
            reader = ClientHelloReader()
            state = next(s for s in map(reader.feed, initials) if s == DONE)
        runs.append((time.perf_counter() - t0) / n * 1e6)
    assert state == DONE and reader.server_name == NAMES[0]
    return (f'{min(runs):.0f} µs (best of 5 x 2,000, {len(initials)} datagram(s) of '
            f'{", ".join(str(len(d)) for d in initials)} bytes)')


def table(results: dict[str, dict[str, list[Sample]]], fmt) -> str:
    """The QUIC rows: the three variants, their ratios, mpproxy's CPU per unit of work."""
    from report import median
    cols = ['workload', 'unit'] + [TITLES[v] for v in VARIANTS] + [
        'sni_routes / plain', 'sni_routes / direct',
        'mpproxy CPU per unit: sni_routes / plain (difference)']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    units = {'quicnew': ('hs/s', 'µs per handshake'), 'quicsteady': ('Mbit/s', 'µs per MB'),
             'quicinit': ('req/s', 'µs per session')}
    for name, per in results.items():
        m = {v: median(per.get(v, [])) for v in VARIANTS}
        unit, per_unit = units[name]
        row = [WORKLOADS[name].title, unit]
        row += [fmt(m[v].value, unit) + (' !' if m[v].bad else '') if m[v] else ''
                for v in VARIANTS]
        for other in ('mpproxy-udp', 'direct'):
            a, b = m['mpproxy'], m[other]
            row.append(f'{a.value / b.value:.2f}' if a and b and a.value and b.value else '')
        a, b = m['mpproxy'], m['mpproxy-udp']
        if a and b and a.cpu_per is not None and b.cpu_per is not None:
            us_a, us_b = round(a.cpu_per * 1e6), round(b.cpu_per * 1e6)
            row.append(f'{us_a} / {us_b} ({us_a - us_b:+d}) {per_unit}')
        else:
            row.append('')
        lines.append('| ' + ' | '.join(row) + ' |')
    lines += ['', 'Each round, in order, with mpproxy\'s CPU time per unit and notes:', '']
    for name, per in results.items():
        unit = units[name][0]
        parts = []
        for v in VARIANTS:
            samples = per.get(v, [])
            if samples:
                vals = ' '.join(fmt(s.value, unit) + ('!' if s.bad else '')
                                + (f' ({s.cpu_per * 1e6:.0f} µs)' if s.cpu_per is not None
                                   else '') for s in samples)
                notes = sorted({s.note for s in samples if s.note})
                parts.append(f'{TITLES[v]} {vals}' + (f' ({"; ".join(notes)})' if notes else ''))
        lines.append(f'- {name}: ' + ' · '.join(parts))
    return '\n'.join(lines)


