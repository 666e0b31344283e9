"""The lifecycle under load (issue 3, items 1, 5 and 6): reloads, a HUP storm and a worker
crash while real clients keep connecting.

The clients and the echo backends run in their own processes (`tests/loadgen.py`, on
uvloop), so they never compete with this test for the GIL; each one writes its counters
to a status file the test polls and prints a JSON summary when it ends. Which worker holds
which client connection is looked up (the inode of the accepted socket, from `ss`, in the
worker's fd table in /proc), never guessed.

`LOAD_SECONDS` (env `MPPROXY_LOAD_SECONDS`, default 30) is how long the reload test sends
a HUP every second; `scripts/soak` runs the same kind of load for longer.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers.configs import tcp_config, with_keys
from helpers.net import connect, echo_roundtrip, free_port
from helpers.proc import ROOT, alive, children, cmdline, fd_count, socket_inodes, wait_for

LOADGEN = ROOT / 'tests' / 'loadgen.py'
LOAD_SECONDS = int(os.environ.get('MPPROXY_LOAD_SECONDS', '30'))
TITLE = re.compile(r'mpproxy: worker (\d+) \(generation (\d+)\)( draining)?$')


# -- helpers: load processes, /proc views ------------------------------------------------

class LoadGen:
    """`tests/loadgen.py` in its own process; its status file is polled, its summary parsed."""

    def __init__(self, tmp_path, name: str, args):
        self.name = name
        self.status_path = tmp_path / f'{name}.status.json'
        self.out_path = tmp_path / f'{name}.out'
        self.err_path = tmp_path / f'{name}.err'
        with open(self.out_path, 'wb') as out, open(self.err_path, 'wb') as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(LOADGEN), '--status-file', str(self.status_path),
                 *map(str, args)], stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=tmp_path)

    def status(self) -> dict | None:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def wait(self, predicate, timeout: float, what: str) -> dict:
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f'{self.name} exited with {self.proc.returncode}: '
                                     f'{self.err_path.read_text()[-2000:]}')
            status = self.status()
            return status if status and predicate(status) else None
        return wait_for(check, timeout, interval=0.05, what=what)

    def result(self, timeout: float) -> dict:
        self.proc.wait(timeout)
        lines = self.out_path.read_text().strip().splitlines()
        assert lines, f'{self.name} printed no summary: {self.err_path.read_text()[-2000:]}'
        return json.loads(lines[-1])

    def stop(self, timeout: float = 30) -> dict:
        """SIGTERM: the load ends as at the end of its duration; returns its summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.result(timeout)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class Backends(LoadGen):
    """Echo backends (TCP echo; UDP echo prefixed with the client's source port)."""

    def __init__(self, tmp_path, *ports: int):
        self.addresses = [f'127.0.0.1:{p}' for p in ports]
        args = [a for address in self.addresses for a in ('--echo-backend', address)]
        super().__init__(tmp_path, 'backend', args)
        self.wait(lambda s: s['phase'] == 'serving', 10, 'the echo backends')

    def accepted(self, address: str) -> int:
        return self.status()['backends'][address]['tcp_accepted']


@pytest.fixture
def spawn(tmp_path):
    """Factory for load generators and backends; all are killed at teardown."""
    made: list[LoadGen] = []

    def make(kind, *args, name='load'):
        process = Backends(tmp_path, *args) if kind == 'backends' else LoadGen(tmp_path, name, args)
        made.append(process)
        return process

    yield make
    for process in made:
        process.cleanup()


def tcp_sockets(port: int) -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state, inode) of every connection with `port` at one end.

    From `ss` (the kernel filters by port): /proc/net/tcp lists every TIME_WAIT socket of
    the session and takes long enough to parse that the picture would be stale.
    """
    out = subprocess.run(['ss', '-tanHe', f'( sport = :{port} or dport = :{port} )'],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    rows = []
    for line in out.splitlines():
        f = line.split()
        if f[0] == 'LISTEN':                   # its peer is '*:*'
            continue
        inode = next((t[4:] for t in f[5:] if t.startswith('ino:')), '0')
        rows.append((int(f[3].rsplit(':', 1)[1]), int(f[4].rsplit(':', 1)[1]), f[0], inode))
    return rows


def client_owners(port: int, pids) -> dict[int, int]:
    """Client port → pid of the worker holding the accepted side of that connection."""
    owner = {}
    for pid in pids:
        try:
            for inode in socket_inodes(pid):
                owner[inode] = pid
        except OSError:
            continue
    return {remote: owner[inode] for local, remote, state, inode in tcp_sockets(port)
            if local == port and inode in owner}


def titles(proxy) -> dict[int, tuple[int, int, bool]]:
    """Worker pid → (slot, generation, draining), read from the process titles."""
    table = {}
    for pid in children(proxy.pid):
        m = TITLE.match(cmdline(pid))
        if m:
            table[pid] = (int(m.group(1)), int(m.group(2)), bool(m.group(3)))
    return table


def zombies(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        try:
            with open(f'/proc/{child}/stat') as f:
                if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                    found.append(child)
        except OSError:
            pass
    return found


def last_reload_active(proxy) -> int | None:
    """The newest generation if the last reload so far is active, else None.

    HUPs that come while the master is still busy with the previous one coalesce (as
    signals do: one reload then reads the newest file), so count the reloads done.
    """
    log = proxy.log()
    newest = log.count('reloading configuration') + 1
    return newest if f'generation {newest} active' in log else None


def assert_clean_log(proxy, *allowed: str) -> None:
    log = proxy.log()
    for bad in ('Traceback', 'crashed', 'unexpected error', 'reload failed', 'unexpectedly',
                'did not stop'):
        if bad not in allowed:
            assert bad not in log, f'{bad!r} in the log:\n{log[-4000:]}'


def brief(summary: dict) -> dict:
    """The summary without its long per-stream and per-client lists, for messages."""
    out = {k: v for k, v in summary.items() if k not in ('streams', 'udp')}
    if 'streams' in summary:
        out['streams'] = {k: v for k, v in summary['streams'].items() if k != 'results'}
        out['streams']['not_clean'] = [r for r in summary['streams']['results']
                                       if r['outcome'] != 'clean'][:5]
    return out


# -- item 1: reload every second under load ----------------------------------------------

@pytest.mark.timeout(LOAD_SECONDS + 90)
def test_reload_every_second_under_load_loses_nothing(proxies, spawn):
    a_port, b_port, port = free_port(), free_port(), free_port()
    backends = spawn('backends', a_port, b_port)
    a, b = backends.addresses
    settings = dict(shutdown_timeout='120s', max_draining_generations=64)
    proxy = proxies(with_keys(tcp_config(port, a), **settings)).start(wait_workers=2)
    first = set(proxy.workers())
    target = f'127.0.0.1:{port}'
    load = spawn('load', '--duration', LOAD_SECONDS + 60, '--tcp-rate', 500, '--tcp-target', target,
                 '--tcp-hold', '100ms', '--streams', 20, '--stream-target', target)
    load.wait(lambda s: s['ready'] and s['tcp']['ok'] >= 200, 10, 'the load to run')
    streams = {r['local_port'] for r in load.status()['streams']['results']}
    owners = client_owners(port, first)
    assert streams <= set(owners), 'every stream is held by a generation 1 worker'
    # (both, or only one of them: a worker may take all 20 streams, and one with none has
    # nothing to drain and exits at once)
    holders = {owners[stream] for stream in streams}

    seen = set(first)
    start = time.monotonic()
    for i in range(LOAD_SECONDS):
        generation, upstream = i + 2, (b if i % 2 == 0 else a)
        proxy.write_config(with_keys(tcp_config(port, upstream), **settings))
        before = backends.accepted(upstream)
        proxy.signal(signal.SIGHUP)
        proxy.wait_log(f'generation {generation} active', timeout=5)
        # the reload did something: two new workers of the new generation serve
        def new_generation_serves():
            serving = {p: g for p, (_, g, draining) in titles(proxy).items() if not draining}
            return len(serving) == 2 and set(serving.values()) == {generation} and set(serving)
        serving = wait_for(new_generation_serves, 3, what=f'generation {generation} alone serving')
        assert len(serving) == 2 and not set(serving) & seen, (serving, seen)
        seen.update(serving)
        # the new config took effect: the new upstream gets the new connections
        wait_for(lambda: backends.accepted(upstream) >= before + 20, 3,
                 what=f'new connections to {upstream} after reload {i + 1}')
        # generation 1 still holds every stream, draining
        table = titles(proxy)
        assert all(table.get(pid, (0, 0, False))[1:] == (1, True) for pid in holders), table
        status = load.status()
        assert status['streams']['outcomes'] == {'running': 20}, brief(status)
        assert status['tcp']['failed'] == 0, brief(status)
        time.sleep(max(0.0, start + i + 1 - time.monotonic()))   # the next HUP is due then

    summary = load.stop(timeout=40)
    print(json.dumps(brief(summary)))
    tcp, streams = summary['tcp'], summary['streams']
    assert tcp['failed'] == 0 and tcp['skipped'] == 0, brief(summary)
    assert tcp['ok'] >= 0.9 * 500 * LOAD_SECONDS, brief(summary)
    assert streams['intact'] == 20, brief(summary)
    assert all(r['received'] >= 64 * 1024 * LOAD_SECONDS for r in streams['results']), brief(summary)
    # the streams ended cleanly: the last draining generation goes
    wait_for(lambda: not any(alive(p) for p in first), 5, what='generation 1 to exit')
    wait_for(lambda: len(proxy.workers()) == 2, 5, what='only the last generation left')
    assert_clean_log(proxy)


@pytest.mark.parametrize('rate', [1 << 20, 0], ids=['paced', 'saturating'])
def test_streams_outliving_shutdown_timeout_are_closed_cleanly(proxies, spawn, rate):
    """`paced`: a 16 KiB chunk every 16 ms, the proxy has usually read everything when the
    deadline comes. `saturating`: the client sends as fast as its window allows, so there are
    always unread bytes at the proxy when it closes: a plain close() would answer with RST."""
    backend_port, port = free_port(), free_port()
    backends = spawn('backends', backend_port)
    proxy = proxies(with_keys(tcp_config(port, backends.addresses[0], workers=1),
                              shutdown_timeout='1s')).start(wait_workers=1)
    old = proxy.workers()
    target = f'127.0.0.1:{port}'
    load = spawn('load', '--duration', 30, '--streams', 4, '--stream-target', target,
                 '--stream-rate', rate)
    load.wait(lambda s: s['ready'] and s['streams']['bytes_received'] > 0, 10, 'streams running')
    hup = time.time()
    proxy.signal(signal.SIGHUP)
    proxy.wait_log('generation 2 active')
    load.wait(lambda s: all(r['outcome'] for r in s['streams']['results']), 8,
              'the streams to be closed at shutdown_timeout')
    summary = load.stop()
    print(json.dumps(brief(summary)))
    results = summary['streams']['results']
    # closed by the proxy with a FIN (EOF after bytes that were all correct), not a reset
    assert [r['outcome'] for r in results] == ['eof_early'] * 4, \
        [f"{r['outcome']}: {r['detail']}" for r in results]
    for r in results:
        assert 0.8 <= r['ended_at'] - hup <= 4, (r, hup)
    wait_for(lambda: not any(alive(p) for p in old), 5, what='the old worker to exit')


# -- item 5: HUP storm -------------------------------------------------------------------

def test_hup_storm_bounds_generations_and_leaks_nothing(proxies, spawn):
    backend_port, port = free_port(), free_port()
    backends = spawn('backends', backend_port)
    workers, limit = 2, 4
    proxy = proxies(with_keys(tcp_config(port, backends.addresses[0], workers=workers),
                              shutdown_timeout='60s', max_draining_generations=limit)).start(
        wait_workers=workers)
    base_fds = fd_count(proxy.pid)
    most_workers, most_generations, zombie_seen, held = 0, 0, {}, []
    storm_start = time.monotonic()
    for i in range(50):
        if i % 5 == 0:                         # a long-lived connection on the generation of now
            sock = connect(port)
            sock.sendall(b'hold')
            assert sock.recv(4) == b'hold'
            owner = client_owners(port, proxy.workers()).get(sock.getsockname()[1])
            assert owner, 'the accepted side of a held connection is in no worker'
            held.append((sock, owner, titles(proxy).get(owner)))
        proxy.signal(signal.SIGHUP)
        # 50 HUPs in 10 s, in pairs 5 ms apart: the second one of a pair supersedes a
        # generation that is still starting. Sample until the next one is due.
        due = storm_start + (i + 1) // 2 * 0.4 + (i + 1) % 2 * 0.005
        while time.monotonic() < due:
            table = titles(proxy)
            most_workers = max(most_workers, len(table))
            most_generations = max(most_generations, len({g for _, g, _ in table.values()}))
            now = time.monotonic()
            for z in zombies(proxy.pid):
                zombie_seen.setdefault(z, [now, now])[1] = now
            time.sleep(0.02)   # the sampling period of this watch
    # 1 active + `limit` draining + 1 starting generation at most, at every sample
    print(f'at most {most_workers} workers of {most_generations} generations at once')
    assert most_generations <= limit + 2, most_generations
    assert most_workers <= workers * (limit + 2), most_workers
    # a dead worker is reaped at once: no zombie outlived one sampling period by much
    lingering = {z: round(t[1] - t[0], 2) for z, t in zombie_seen.items() if t[1] - t[0] > 0.5}
    assert not lingering, f'zombies that were not reaped: {lingering}'
    # HUPs of a pair may coalesce: at least one reload per pair, and the last one serves
    last = wait_for(lambda: last_reload_active(proxy), 10, what='the last reload to be active')
    assert last - 1 >= 25, f'only {last - 1} reloads for 50 HUPs'
    try:
        wait_for(lambda: sorted(g for _, g, d in titles(proxy).values() if not d) == [last] * workers,
                 5, what=f'exactly {workers} workers of generation {last} serving')
    except AssertionError as exc:
        raise AssertionError(f'{exc}: workers (slot, generation, draining): {titles(proxy)}') from None

    # connections of the generations forced to finish were closed; the others still work
    forced = 0
    for sock, owner, title in held:
        sock.settimeout(2)
        if alive(owner):
            sock.sendall(b'still')
            assert sock.recv(5) == b'still', title
            continue
        forced += 1
        try:
            assert sock.recv(10) == b'', f'{title}: data after the generation finished'
        except ConnectionResetError:
            pass
        except socket.timeout:
            raise AssertionError(f'connection of {title} hangs after its worker exited') from None
    assert forced >= 5, f'only {forced} of {len(held)} held connections were on forced generations'
    assert 'too many draining generations' in proxy.log()

    for sock, _, _ in held:
        sock.close()
    wait_for(lambda: len(proxy.workers()) == workers, 10, what='the draining generations to end')
    wait_for(lambda: not zombies(proxy.pid), 3, what='no zombie children')
    wait_for(lambda: fd_count(proxy.pid) <= base_fds, 5,
             what=f'master fds back to {base_fds} (now {fd_count(proxy.pid)})')
    assert_clean_log(proxy, 'did not stop')


def test_generation_superseded_while_starting_stops_serving(proxies, spawn):
    """Two HUPs 5 ms apart, the first with upstream B, the second with A: the B generation is
    superseded while its workers boot. Every one of its workers must drain: afterwards no new
    connection may reach B (issue 3, item 2), and only the last generation serves."""
    a_port, b_port, port = free_port(), free_port(), free_port()
    backends = spawn('backends', a_port, b_port)
    a, b = backends.addresses
    settings = dict(shutdown_timeout='60s')
    proxy = proxies(with_keys(tcp_config(port, a), **settings)).start(wait_workers=2)
    for _ in range(10):
        proxy.write_config(with_keys(tcp_config(port, b), **settings))
        proxy.signal(signal.SIGHUP)
        time.sleep(0.005)
        proxy.write_config(with_keys(tcp_config(port, a), **settings))
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: last_reload_active(proxy), 5, what='the last reload to be active')
        time.sleep(0.2)   # the storm's cadence: pairs of HUPs a little apart, not a wait
    last = wait_for(lambda: last_reload_active(proxy), 5, what='the last reload to be active')
    a_before, b_before = backends.accepted(a), backends.accepted(b)
    for i in range(200):
        assert echo_roundtrip(port, b'%d' % i) == b'%d' % i
    wait_for(lambda: backends.accepted(a) + backends.accepted(b) >= a_before + b_before + 200, 3,
             what='the backends to count 200 connections')
    stale = {p: t for p, t in titles(proxy).items() if not t[2] and t[1] != last}
    assert backends.accepted(b) == b_before, \
        (f'{backends.accepted(b) - b_before} of 200 new connections went to the superseded '
         f'upstream B; workers still serving an older generation: {stale}')
    assert not stale, f'workers of superseded generations still serving: {stale}'
    wait_for(lambda: len(proxy.workers()) == 2, 5, what='the idle old generations to exit')


# -- item 6: a worker killed under load --------------------------------------------------

def test_worker_killed_under_load_is_replaced_and_only_its_connections_break(proxies, spawn):
    backend_port, port = free_port(), free_port()
    backends = spawn('backends', backend_port)
    proxy = proxies(tcp_config(port, backends.addresses[0])).start(wait_workers=2)
    target = f'127.0.0.1:{port}'
    load = spawn('load', '--duration', 60, '--tcp-rate', 300, '--tcp-target', target,
                 '--tcp-hold', '100ms', '--streams', 10, '--stream-target', target)
    status = load.wait(lambda s: s['ready'] and s['tcp']['ok'] >= 300, 10, 'the load to run')
    streams = {r['local_port'] for r in status['streams']['results']}
    workers = proxy.workers()
    owners = client_owners(port, workers)
    per_worker = {w: sum(1 for p in streams if owners.get(p) == w) for w in workers}
    # kill the worker with the fewest streams, if it has any: both sides of the check count
    victim = min(workers, key=lambda w: (per_worker[w] == 0, per_worker[w]))
    victim_streams = {p for p in streams if owners.get(p) == victim}
    victim_title = cmdline(victim)
    snapshot = time.monotonic()
    victim_short = len([p for p in client_owners(port, [victim]) if p not in streams])
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    # connections begun between the snapshot and the kill may be the victim's too
    slack = 2 + math.ceil(300 * (killed - snapshot))

    def replaced():
        serving = proxy.serving_workers()      # one snapshot: the victim may still show briefly
        return len(serving) == 2 and victim not in serving
    wait_for(replaced, 3, interval=0.005, what='the worker to be replaced')
    took = time.monotonic() - killed
    assert took < 1.0, f'replaced after {took:.2f}s'
    assert victim_title in {cmdline(p) for p in proxy.workers()}   # same slot, same generation
    ok_at_kill = load.status()['tcp']['ok']
    load.wait(lambda s: s['tcp']['ok'] >= ok_at_kill + 600, 10, '2 s of load after the kill')
    summary = load.stop()
    print(json.dumps(brief(summary)))
    tcp, results = summary['tcp'], summary['streams']['results']
    assert tcp['connect_refused'] == tcp['connect_timeout'] == tcp['connect_error'] == 0, brief(summary)
    # the short connections that broke were the victim's: it held `victim_short`, each one
    # mid-request, a few milliseconds before the kill (and may have taken a few more since)
    assert tcp['failed'] <= victim_short + slack, (victim_short, slack, brief(summary))
    for r in results:
        if r['local_port'] in victim_streams:
            assert r['outcome'] in ('reset', 'eof_early'), r    # lost with the worker, not hung
        else:
            assert r['outcome'] == 'clean', r                    # the survivor's are untouched
    assert 'unexpectedly' in proxy.log()
    assert_clean_log(proxy, 'unexpectedly')
    print(f'victim held {len(victim_streams)} streams and {victim_short} short connections '
          f'(+{slack} slack); replaced in {took:.3f}s; short connections broken: {tcp["failed"]}')
