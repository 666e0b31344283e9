"""scripts/bench's orchestration: backends, proxies, workloads in turn, tables, BENCHMARKS.md.

Run by scripts/bench with the project venv's python (it installs the packages and builds
udpload first). Everything listens on 127.0.0.1; every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory                                                    # noqa: E402
import quic                                                      # noqa: E402
import report                                                    # noqa: E402
import servers                                                   # noqa: E402
from procs import Procs, cpu_seconds                             # noqa: E402
from report import say                                           # noqa: E402
from workloads import WORKLOADS, Sample, measure                 # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALL_PROXIES = ('mpproxy', 'nginx', 'haproxy', 'direct')
MULTI_WORKLOADS = ('keepalive', 'newconn', 'bulk8', 'udp', 'udpnew')
MEM_N = 5000
PROXY_CPU, LOAD_CPU = '0', '1'


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog='scripts/bench', description=__doc__)
    ap.add_argument('--seconds', type=int, default=5, help='length of one measurement (default 5)')
    ap.add_argument('--rounds', type=int, default=3, help='rounds per workload (default 3)')
    ap.add_argument('--only', default='', help='workloads, comma-separated: ' + ','.join(WORKLOADS))
    ap.add_argument('--proxies', default=','.join(ALL_PROXIES))
    ap.add_argument('--skip-multi', action='store_true', help='no two-worker table')
    ap.add_argument('--no-write', action='store_true', help='leave BENCHMARKS.md alone')
    ap.add_argument('--workdir', type=Path, help=argparse.SUPPRESS)
    ap.add_argument('--udpload', required=True, help=argparse.SUPPRESS)
    ap.add_argument('--mpproxy', required=True, help=argparse.SUPPRESS)
    ap.add_argument('--command', default='scripts/bench', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(',')))
    wanted = set(filter(None, args.proxies.split(',')))
    if (only - set(WORKLOADS)) or (wanted - set(ALL_PROXIES)):
        ap.error(f'unknown: {", ".join(sorted((only - set(WORKLOADS)) | (wanted - set(ALL_PROXIES))))}')
    args.workloads = [w for w in WORKLOADS if not only or w in only]
    args.proxies = [p for p in ALL_PROXIES if p in wanted]
    if args.seconds < 1 or args.rounds < 1:
        ap.error('--seconds and --rounds must be >= 1')
    return args


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Procs):
        self.args = args
        self.procs = procs
        self.problems: list[str] = []

    def start_proxies(self, names, workers: int, cpu: str | None,
                      with_quic: bool = False) -> dict[str, servers.Proxy]:
        out = {}
        for name in names:
            try:
                proxy = servers.start_proxy(name, self.procs, self.args.workdir, self.args.mpproxy,
                                            workers, cpu, with_quic)
            except RuntimeError as e:
                self.problems.append(f'{name} ({workers} workers) did not start: {e}')
                say(f'bench: {self.problems[-1]}')
                continue
            for p in proxy.problems:
                self.problems.append(f'{p} ({workers} workers)')
                say(f'bench: {p}')
            out[name] = proxy
        return out

    def stop_proxies(self, proxies: dict[str, servers.Proxy]) -> None:
        for proxy in proxies.values():
            if proxy.proc is not None:
                if proxy.proc.poll() is not None:
                    self.problems.append(f'{proxy.name} exited (code {proxy.proc.returncode}) '
                                         f'during the run:\n{self.procs.log_tail(proxy.name)}')
                self.procs.stop(proxy.proc)

    def memory(self, name: str, results: dict[str, list[Sample]]) -> None:
        """Memory rounds: each on freshly started proxies, one at a time, pinned."""
        names = [p for p in self.args.proxies if report.applicable(p, name)]
        for r in range(self.args.rounds):
            for pname in rotate(names, r):
                proxies = self.start_proxies([pname], 1, PROXY_CPU)
                if pname not in proxies:
                    continue
                proxy = proxies[pname]
                try:
                    if name == 'memtcp':
                        s = memory.mem_tcp(proxy, self.procs, self.args.workdir, MEM_N, LOAD_CPU)
                    else:
                        s = memory.mem_udp(proxy, self.procs, self.args.udpload, MEM_N, LOAD_CPU)
                except (RuntimeError, OSError) as e:
                    s = Sample(None, True, str(e))
                finally:
                    self.stop_proxies(proxies)
                results.setdefault(pname, []).append(s)
                progress(name, r, self.args.rounds, pname, s)

    def throughput(self, names: list[str], workers: int, pinned: bool,
                   results: dict[str, dict[str, list[Sample]]]) -> None:
        cpu = PROXY_CPU if pinned else None
        proxies = self.start_proxies(self.args.proxies, workers, cpu,
                                     with_quic=any(WORKLOADS[n].quic for n in names))
        try:
            for name in names:
                order = [p for p in self.args.proxies if p in proxies and report.applicable(p, name)]
                if WORKLOADS[name].quic and 'mpproxy' in order:
                    order.insert(order.index('mpproxy') + 1, 'mpproxy-udp')
                for r in range(self.args.rounds):
                    for label in rotate(order, r):
                        proxy = proxies[label.partition('-')[0]]   # mpproxy-udp: mpproxy
                        if proxy.proc is not None and proxy.proc.poll() is not None:
                            continue
                        s = self.one(name, label, proxy, pinned)
                        results[name].setdefault(label, []).append(s)
                        progress(name, r, self.args.rounds, label, s)
        finally:
            self.stop_proxies(proxies)

    def one(self, name: str, label: str, proxy: servers.Proxy, pinned: bool) -> Sample:
        """One measurement of `name` through `label` (a proxy, or mpproxy-udp: QUIC through
        mpproxy's plain udp listeners), with the proxy's CPU use meanwhile."""
        time.sleep(0.3)
        pids = proxy.workers()
        cpu0, t0 = cpu_seconds(pids), time.monotonic()
        load_cpu = LOAD_CPU if pinned else None
        if WORKLOADS[name].quic:
            s = quic.measure(name, label, proxy.ports, self.args.seconds, load_cpu,
                             self.args.udpload, self.args.workdir)
        else:
            s = measure(name, proxy.ports[WORKLOADS[name].port_key], self.args.seconds,
                        load_cpu, self.args.udpload, multi=not pinned)
        if pids:
            used = cpu_seconds(pids) - cpu0
            s.cpu = 100 * used / (time.monotonic() - t0)
            if s.count and WORKLOADS[name].quic:
                s.cpu_per = used / s.count
        return s

    def run_set(self, workers: int, pinned: bool, names: list[str]) -> dict:
        results: dict[str, dict[str, list[Sample]]] = {n: {} for n in names}
        before = list(self.procs.live)
        servers.start_backends(self.procs, self.args.workdir, self.args.udpload,
                               LOAD_CPU if pinned else None)
        backends = [p for p in self.procs.live if p not in before]
        try:
            if any(WORKLOADS[n].quic for n in names):
                try:
                    backends += quic.start_backends(self.procs, self.args.workdir,
                                                    LOAD_CPU if pinned else None)
                except RuntimeError as e:
                    self.problems.append(f'QUIC workloads skipped: {e}')
                    say(f'bench: {self.problems[-1]}')
                    names = [n for n in names if not WORKLOADS[n].quic]
                    results = {n: r for n, r in results.items() if n in names}
            for name in names:
                if WORKLOADS[name].memory:
                    self.memory(name, results[name])
            tput = [n for n in names if not WORKLOADS[n].memory]
            if tput:
                self.throughput(tput, workers, pinned, results)
        finally:
            for proc in backends:
                self.procs.stop(proc)
        return results


def rotate(items: list[str], r: int) -> list[str]:
    if not items:
        return items
    k = r % len(items)
    return items[k:] + items[:k]


def progress(name: str, r: int, rounds: int, proxy: str, s: Sample) -> None:
    unit = WORKLOADS[name].unit
    mark = ' !' if s.bad else ''
    cpu = f', proxy CPU {s.cpu:.0f}%' if s.cpu is not None else ''
    if s.cpu_per is not None:
        cpu += f' ({s.cpu_per * 1e6:.0f} µs per {quic.PER[name]})'
    note = f'  ({s.note})' if s.note else ''
    say(f'bench: {name:10} round {r + 1}/{rounds} {proxy:11} {report.fmt(s.value, unit):>8} '
        f'{unit}{mark}{cpu}{note}')


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix='mpproxy-bench-py.')
        args.workdir = Path(tmp.name)
    started = time.monotonic()
    when = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    procs = Procs(args.workdir)
    bench = Bench(args, procs)
    single = multi = None
    try:
        say(f'bench: one worker each, pinned; workloads {",".join(args.workloads)}; '
            f'{args.rounds} rounds of {args.seconds} s')
        single = bench.run_set(1, True, args.workloads)
        multi_names = [n for n in MULTI_WORKLOADS if n in args.workloads]
        if not args.skip_multi and multi_names:
            say('bench: two workers each, unpinned')
            multi = bench.run_set(2, False, multi_names)
    finally:
        procs.stop_all()
    took = time.monotonic() - started
    plain = {n: r for n, r in single.items() if not WORKLOADS[n].quic}
    quic_results = {n: r for n, r in single.items() if WORKLOADS[n].quic}

    section = [f'## {when}', '',
               f'- command: `{args.command}`',
               f'- machine: {report.machine()}',
               f'- versions: {report.versions()}',
               f'- {args.rounds} rounds of {args.seconds} s per proxy and workload; '
               f'memory: {MEM_N:,} pairs / sessions; the whole run took {took / 60:.1f} min', '',
               '### One worker each, proxy pinned to CPU 0; backends and load generators on CPU 1 '
               '(wrk -t1 -c32, udpload 64 clients)',
               '', report.table(single, args.proxies)]
    if plain:
        section += ['', 'Each round per proxy, in order, with the proxy\'s CPU use and notes:', '',
                    report.details(plain, args.proxies)]
    if quic_results:
        section += ['', '### QUIC: through sni_routes, through plain udp listeners, direct '
                        '(one mpproxy worker on CPU 0; aioquic servers and clients, udpload on '
                        'CPU 1)', '',
                    quic.table(quic_results, report.fmt), '',
                    f'- reading one aioquic ClientHello (edge/quic.py, in the bench process): '
                    f'{quic.parse_cost()}']
    if multi:
        section += ['', '### Two workers each (nginx `worker_processes 2`, HAProxy `nbthread 2`), '
                        'nothing pinned (wrk -t2 -c64, udpload 64 clients)', '',
                    report.table(multi, args.proxies, with_targets=False), '',
                    report.details(multi, args.proxies)]
    if bench.problems:
        section += ['', '### Problems seen', ''] + [f'- {p}' for p in bench.problems]
    text = '\n'.join(section) + '\n'
    print(text)
    if not args.no_write:
        report.write_benchmarks(ROOT / 'BENCHMARKS.md', text)
        say(f'bench: wrote {ROOT / "BENCHMARKS.md"}')
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
