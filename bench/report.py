"""The tables of scripts/bench, the machine and versions, and BENCHMARKS.md (newest run first)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

from workloads import WORKLOADS, Sample

PROXY_TITLES = {'mpproxy': 'mpproxy', 'nginx': 'nginx', 'haproxy': 'HAProxy', 'direct': 'direct'}
RUNS_MARKER = '<!-- runs: newest first; scripts/bench inserts each new run below this line -->'
HEADER = f"""# Benchmarks

Written by `scripts/bench` (issue 7): mpproxy next to nginx `stream {{}}` and HAProxy `mode tcp`
on loopback, with the same backends and load generators in the same run. In the first table each
proxy has one worker pinned to CPU 0 (`taskset -c 0`), and the backends and load generators share
CPU 1. In the second table each proxy has two workers and nothing is pinned. Each workload runs the
proxies in turn (A B C D, then B C D A, ...) for several rounds, and each cell is the median.

- `!` marks a cell where a correctness check failed in some round. wrk: non-2xx/3xx responses or
  socket errors. iperf3: an error. UDP: a reply that differs from its request, or a missing one.
- `mpproxy/nginx` is the ratio of the medians. For memory, lower is better. A ratio that two
  decimals would round across its target is shown with three (1.098 against >= 1.1).
- HAProxy does not proxy UDP (n/a). Neither nginx nor HAProxy routes QUIC by server name (n/a):
  the QUIC rows compare mpproxy (`sni_routes`) with direct, and in a table of their own also
  with mpproxy's plain UDP forwarding, with mpproxy's CPU time per handshake, MB or session.
- "proxy CPU %" is the CPU time the proxy's worker(s) used during the measurement, as a median
  in % of one core.
- "per CPU-second" compares work done per CPU-second of the proxy. Where the load generator's core
  is the limit (the proxy well below 100 % and close to "direct"), it says more than the raw ratio.
- Backends: nginx `return 200 "ok\\n"` (keep-alive, 1 worker), `iperf3 -s`, `udpload echo`
  (bench/udpload.c), bench/hold.py for idle connections, and two aioquic servers
  (bench/quicpeer.py) for QUIC.
- Every proxy runs with its defaults except the open-files limits the memory test needs. nginx's
  and HAProxy's relay buffers are 16 KiB by default (`proxy_buffer_size`, `tune.bufsize`).

The numbers are noisy on a 2-core machine. Compare ratios within one run, not across runs.
How the data path is built, and what stands in the way of the targets not met, with
measurements: README.md, "Performance".

{RUNS_MARKER}
"""


def median(samples: list[Sample]) -> Sample | None:
    """The median of the values; bad if any run was bad. None when nothing was measured."""
    if not samples:
        return None
    values = [s.value for s in samples if s.value is not None]
    bad = any(s.bad for s in samples) or len(values) < len(samples)
    notes = sorted({s.note for s in samples if s.note})
    cpus = [s.cpu for s in samples if s.cpu is not None]
    pers = [s.cpu_per for s in samples if s.cpu_per is not None]
    return Sample(statistics.median(values) if values else None, bad, '; '.join(notes),
                  statistics.median(cpus) if cpus else None,
                  cpu_per=statistics.median(pers) if pers else None)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return '—'
    if unit == 'Gbit/s':
        return f'{value:.1f}'
    if unit == 'KiB':
        return f'{value:.2f}'
    return f'{value / 1000:.1f}k' if value >= 10000 else f'{value:.0f}'


def cell(s: Sample | None, unit: str, applicable: bool = True) -> str:
    if not applicable:
        return 'n/a'
    if s is None:
        return ''
    return fmt(s.value, unit) + (' !' if s.bad else '')


def ratio_and_verdict(name: str, results: dict[str, Sample | None]) -> tuple[str, str]:
    w = WORKLOADS[name]
    mp, ng = results.get('mpproxy'), results.get('nginx')
    if not mp or not ng or mp.value is None or not ng.value or w.target is None:
        return '', ''
    r = mp.value / ng.value
    op, target = w.target

    def holds(x: float) -> bool:
        return x >= target if op == '>=' else x <= target

    met = holds(r) and not mp.bad
    shown = f'{r:.2f}'
    if holds(float(shown)) != holds(r):
        shown = f'{r:.3f}'        # 1.098 is not 1.10: never round across the target
    return shown, ('met' if met else 'missed')


def per_cpu_ratio(results: dict[str, Sample | None]) -> str:
    """mpproxy/nginx in work per CPU-second of the proxy: fair when the load side is the limit."""
    mp, ng = results.get('mpproxy'), results.get('nginx')
    if not mp or not ng or not mp.value or not ng.value or not mp.cpu or not ng.cpu:
        return ''
    return f'{(mp.value / mp.cpu) / (ng.value / ng.cpu):.2f}'


def cpu_cell(results: dict[str, Sample | None], proxies: list[str]) -> str:
    parts = [f'{results[p].cpu:.0f}' for p in proxies
             if p != 'direct' and results.get(p) and results[p].cpu is not None]
    return ' / '.join(parts)


def applicable(proxy: str, name: str) -> bool:
    if proxy == 'haproxy' and name in ('udp', 'udpnew', 'memudp'):
        return False
    if proxy in ('nginx', 'haproxy') and WORKLOADS[name].quic:    # no QUIC routing by name
        return False
    if proxy == 'direct' and WORKLOADS[name].memory:
        return False
    return True


def table(results: dict[str, dict[str, list[Sample]]], proxies: list[str],
          with_targets: bool = True) -> str:
    """A markdown table: one row per workload, medians per proxy, mpproxy/nginx."""
    cols = ['workload', 'unit'] + [PROXY_TITLES[p] for p in proxies] + ['mpproxy/nginx']
    if with_targets:
        cols += ['target', '']
    cpu_names = [PROXY_TITLES[p] for p in proxies if p != 'direct']
    cols += ['proxy CPU % (' + ' / '.join(cpu_names) + ')', 'mpproxy/nginx per CPU-second']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    for name, per_proxy in results.items():
        w = WORKLOADS[name]
        medians = {p: median(per_proxy.get(p, [])) for p in proxies}
        row = [w.title, w.unit + (' per pair' if name == 'memtcp' else
                                  ' per session' if name == 'memudp' else '')]
        row += [cell(medians[p], w.unit, applicable(p, name)) for p in proxies]
        ratio, verdict = ratio_and_verdict(name, medians)
        row.append(ratio)
        if with_targets:
            row += [f'{w.target[0]} {w.target[1]:.1f}' if w.target else '', verdict]
        row += [cpu_cell(medians, proxies), per_cpu_ratio(medians)]
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def details(results: dict[str, dict[str, list[Sample]]], proxies: list[str]) -> str:
    """Every round's value, and every note (errors, lost datagrams, RSS figures)."""
    out = []
    for name, per_proxy in results.items():
        w = WORKLOADS[name]
        parts = []
        for p in proxies:
            samples = per_proxy.get(p, [])
            if not samples:
                continue
            vals = ' '.join(fmt(s.value, w.unit) + ('!' if s.bad else '')
                            + (f' ({s.cpu:.0f}% CPU)' if s.cpu is not None else '') for s in samples)
            notes = sorted({s.note for s in samples if s.note})
            parts.append(f'{PROXY_TITLES[p]} {vals}' + (f' ({"; ".join(notes)})' if notes else ''))
        if parts:
            out.append(f'- {name}: ' + ' · '.join(parts))
    return '\n'.join(out)


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 'not found'
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else 'unknown'


def machine() -> str:
    model = 'unknown'
    try:
        m = re.search(r'^model name\s*:\s*(.+)$', Path('/proc/cpuinfo').read_text(), re.M)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f'{os.cpu_count()} CPUs ({model}), Linux {platform.release()}'


def versions() -> str:
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = 'not installed'
    nginx = _first_line(['nginx', '-v']).replace('nginx version: ', '')
    haproxy = re.sub(r'^HAProxy version (\S+).*', r'HAProxy \1', _first_line(['haproxy', '-v']))
    wrk = re.sub(r'^(wrk \S+).*', r'\1', _first_line(['wrk', '-v']))
    iperf = re.sub(r'^iperf (\S+).*', r'iperf3 \1', _first_line(['iperf3', '--version']))
    try:
        import aioquic
        quic = f', aioquic {aioquic.__version__}'
    except ImportError:
        quic = ''
    return (f'Python {platform.python_version()}, uvloop {uv}, {nginx}, {haproxy}, {wrk}, '
            f'{iperf}{quic}')


def write_benchmarks(path: Path, section: str) -> None:
    """Insert `section` as the newest run, keeping every earlier run below it."""
    old = path.read_text() if path.exists() else ''
    history = old.partition(RUNS_MARKER)[2] if RUNS_MARKER in old else old
    text = HEADER + '\n' + section.strip() + '\n'
    if history.strip():
        text += '\n' + history.strip('\n') + '\n'
    path.write_text(text)


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
