"""Connection limits shared by all workers (mpproxy/shared/limits.py), and the master's wiring.

Several areas of one table in this process stand for several workers; the fork tests use
real child processes writing the same shared block at the same time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.net import free_port
from helpers.proc import ROOT
from mpproxy.config.schema import Address, Config, Listener, UdpOptions
from mpproxy.shared import limits
from mpproxy.shared.limits import LimitsFull, LimitTable, ip_key

IPS = [ip_key(f'192.0.2.{i}') for i in range(1, 60)]
A, B, C = IPS[:3]


def listener(port: int, protocol: str = 'tcp', total: int = 0, per_ip: int = 0,
             udp_per_ip: int = 0) -> Listener:
    return Listener(name=f'l{port}', listen=Address('127.0.0.1', port), protocol=protocol,
                    upstream='u', max_connections=total, max_connections_per_ip=per_ip,
                    udp=UdpOptions(max_sessions_per_ip=udp_per_ip))


def config(*listeners: Listener, workers: int = 2) -> Config:
    return Config(path='test.yaml', workers=workers, listeners=tuple(listeners))


def table_with_areas(n: int, nslots: int = 8, **kw) -> tuple[LimitTable, list[limits.Area]]:
    table = LimitTable.allocate(nslots, **kw)
    return table, [table.area(table.take_slot()) for _ in range(n)]


# -- ip_key ----------------------------------------------------------------------------------
def test_ip_key_packs_ipv4_and_ipv6():
    assert ip_key('192.0.2.1') == bytes([192, 0, 2, 1])
    assert ip_key('2001:db8::1') == bytes.fromhex('20010db8' + '0' * 22 + '01')
    assert ip_key('::1') != ip_key('0.0.0.1')          # not mapped: stays 16 bytes
    assert len(ip_key('::')) == 16


def test_ip_key_ipv4_mapped_ipv6_is_the_ipv4_address():
    assert ip_key('::ffff:192.0.2.1') == ip_key('192.0.2.1')
    assert ip_key('::FFFF:c000:0201') == ip_key('192.0.2.1')
    assert ip_key('fe80::1%eth0') == ip_key('fe80::1')


@pytest.mark.parametrize('bad', ['', 'localhost', '192.0.2', '1.2.3.4.5', '::g', '300.1.1.1'])
def test_ip_key_rejects_what_is_not_an_ip(bad):
    with pytest.raises(ValueError):
        ip_key(bad)


def test_mapped_and_plain_ipv4_share_one_per_ip_count():
    _, (area,) = table_with_areas(1)
    gate = area.gate(0, 0, 2)
    assert gate.try_acquire(ip_key('192.0.2.9')) is None
    assert gate.try_acquire(ip_key('::ffff:192.0.2.9')) is None
    assert gate.try_acquire(ip_key('192.0.2.9')) == 'max_connections_per_ip'


# -- one area, several areas -----------------------------------------------------------------
def test_total_limit_in_one_area():
    table, (area,) = table_with_areas(1)
    gate = area.gate(3, 3, 0)
    assert [gate.try_acquire(ip) for ip in (A, B, C)] == [None, None, None]
    assert gate.try_acquire(IPS[3]) == 'max_connections'
    assert table.total(3) == 3
    gate.release(B)
    assert gate.try_acquire(IPS[3]) is None
    assert table.total(3) == 3 and table.total(2) == 0


def test_per_ip_limit_in_one_area_leaves_other_ips_alone():
    table, (area,) = table_with_areas(1)
    gate = area.gate(0, 0, 2)
    assert gate.try_acquire(A) is None and gate.try_acquire(A) is None
    assert gate.try_acquire(A) == 'max_connections_per_ip'
    assert gate.try_acquire(B) is None
    assert table.per_ip(0, A) == 2 and table.per_ip(0, B) == 1
    gate.release(A)
    assert gate.try_acquire(A) is None


def test_total_limit_holds_across_areas():
    table, areas = table_with_areas(3)
    gates = [area.gate(0, 5, 0) for area in areas]
    for gate, n in zip(gates, (2, 2, 1)):
        for i in range(n):
            assert gate.try_acquire(IPS[i]) is None
    assert table.total(0) == 5
    assert all(gate.try_acquire(C) == 'max_connections' for gate in gates)
    gates[1].release(IPS[0])                   # a connection on another worker ends
    assert gates[2].try_acquire(C) is None
    assert gates[0].try_acquire(C) == 'max_connections'


def test_per_ip_limit_holds_across_areas():
    table, areas = table_with_areas(4)
    gates = [area.gate(7, 0, 3) for area in areas]
    assert [gate.try_acquire(A) for gate in gates] == [None, None, None, 'max_connections_per_ip']
    assert table.per_ip(7, A) == 3
    assert [gate.try_acquire(B) for gate in gates[1:]] == [None, None, None]
    gates[0].release(A)
    assert gates[3].try_acquire(A) is None


def test_listeners_count_separately():
    table, (one, two) = table_with_areas(2)
    first, second = one.gate(0, 1, 1), two.gate(1, 1, 1)
    assert first.try_acquire(A) is None
    assert second.try_acquire(A) is None       # the same client on another listener
    assert first.try_acquire(B) == 'max_connections'
    assert (table.total(0), table.total(1)) == (1, 1)


def test_total_only_gate_does_not_touch_the_sketch():
    table, (area,) = table_with_areas(1)
    gate = area.gate(0, 10, 0)
    for _ in range(4):
        assert gate.try_acquire(A) is None
    assert table.total(0) == 4 and table.per_ip(0, A) == 0
    for _ in range(4):
        gate.release(A)
    assert table.total(0) == 0


def test_add_counts_without_checking():
    table, (area,) = table_with_areas(1)
    gate = area.gate(0, 1, 1)
    gate.add(A)
    gate.add(A)                                # adopted sessions, over the limit
    assert table.total(0) == 2 and table.per_ip(0, A) == 2
    assert gate.check(B) == 'max_connections'


# -- gate_for: which listeners count, and by what ---------------------------------------------
def test_gate_for_picks_limits_by_protocol():
    table = LimitTable.allocate(2)
    plain, tcp, udp = listener(1), listener(2, total=10, per_ip=2), listener(3, 'udp', udp_per_ip=1)
    tcp_udp_option = listener(4, udp_per_ip=5)      # udp options of a tcp listener: no limit
    index = table.assign(config(plain, tcp, udp, tcp_udp_option))
    assert set(index) == {tcp.key, udp.key}
    area = table.area(table.take_slot())
    assert area.gate_for(plain, index) is None and area.gate_for(tcp_udp_option, index) is None
    tcp_gate, udp_gate = area.gate_for(tcp, index), area.gate_for(udp, index)
    assert (tcp_gate.max_total, tcp_gate.max_per_ip) == (10, 2)
    assert (udp_gate.max_total, udp_gate.max_per_ip) == (0, 1)
    assert udp_gate.try_acquire(A) is None
    assert udp_gate.try_acquire(A) == 'max_sessions_per_ip'
    assert area.gate_for(tcp, {}) is None      # a key without an index is not counted


# -- slots: taken before the fork, zeroed at reap ---------------------------------------------
def test_free_slot_zeroes_the_area_of_an_exited_worker():
    table, areas = table_with_areas(3)
    gates = [area.gate(0, 100, 100) for area in areas]
    for gate in gates:
        for ip in (A, A, B):
            assert gate.try_acquire(ip) is None
    table.free_slot(1)                         # its worker exited without releasing anything
    assert table.total(0) == 6 and table.per_ip(0, A) == 4 and table.per_ip(0, B) == 2
    assert table.take_slot() == 1              # reused; the new worker starts from zero
    assert table.total(0) == 6
    assert bytes(table.view[table.header + table.step:table.header + 2 * table.step]) \
        == bytes(table.step * 4)


def test_slots_go_lowest_first_and_end_shrinks():
    table = LimitTable.allocate(4)
    assert [table.take_slot() for _ in range(4)] == [0, 1, 2, 3]
    assert table.take_slot() is None           # full: that worker gets a private area
    end = lambda: (table.view[0] - table.header) // table.step   # noqa: E731 - areas summed
    assert end() == 4
    table.free_slot(3)
    table.free_slot(1)
    assert end() == 3
    table.free_slot(1)                         # freeing a free slot does nothing
    table.free_slot(2)
    assert end() == 1
    assert table.take_slot() == 1 and end() == 2


def test_private_area_counts_itself_but_others_do_not_see_it():
    table, (shared,) = table_with_areas(1, nslots=1)
    assert table.take_slot() is None
    private = table.area(None).gate(0, 3, 2)
    other = shared.gate(0, 3, 2)
    assert other.try_acquire(A) is None
    assert private.try_acquire(A) is None      # sees the other worker's A: 1 + own 0
    assert private.try_acquire(A) == 'max_connections_per_ip'
    assert private.try_acquire(B) is None
    assert private.try_acquire(C) == 'max_connections'   # 1 shared + 2 private
    assert table.total(0) == 1                 # the shared block never saw them
    assert other.try_acquire(B) is None
    private.release(A)
    private.release(B)
    assert table.total(0) == 2


# -- limit indices ----------------------------------------------------------------------------
def test_assign_keeps_a_key_its_index_across_reloads():
    table = LimitTable.allocate(2)
    a, b = listener(1, total=5), listener(2, per_ip=1)
    first = table.assign(config(a, b))
    assert first == {a.key: 0, b.key: 1}
    changed = listener(2, total=9)             # same key, other limits: same index
    second = table.assign(config(changed, listener(3, total=1)), live=[config(a, b)])
    assert second == {b.key: 1, listener(3).key: 2}


def test_assign_frees_indices_no_live_generation_uses_and_reuses_them():
    table = LimitTable.allocate(2)
    old = config(listener(1, total=1), listener(2, total=1))
    assert table.assign(old) == {listener(1).key: 0, listener(2).key: 1}
    new = config(listener(2, total=1), listener(3, total=1))
    # the old generation still drains: key 1 keeps its index
    assert table.assign(new, live=[old]) == {listener(2).key: 1, listener(3).key: 2}
    assert listener(1).key in table.index
    # the old generation is gone: key 1's index is free, and the lowest free index is reused
    third = config(listener(3, total=1), listener(4, total=1))
    assert table.assign(third, live=[new]) == {listener(3).key: 2, listener(4).key: 0}
    assert listener(1).key not in table.index
    # a key that loses its limits loses its index once no live config limits it
    assert table.assign(config(listener(3), listener(4, total=1)), live=[]) == {listener(4).key: 0}
    assert set(table.index) == {listener(4).key}


def test_assign_past_capacity_refuses_and_changes_nothing():
    table = LimitTable.allocate(2, indexes=2)
    live = config(listener(1, total=1), listener(2, total=1))
    table.assign(live)
    before = dict(table.index)
    with pytest.raises(LimitsFull):
        table.assign(config(listener(3, total=1)), live=[live])
    assert table.index == before
    assert table.assign(config(listener(3, total=1), listener(1, total=1)),
                        live=[]) == {listener(3).key: 1, listener(1).key: 0}


def test_udp_and_tcp_on_one_port_are_two_keys():
    table = LimitTable.allocate(2)
    index = table.assign(config(listener(53, total=1), listener(53, 'udp', udp_per_ip=1)))
    assert sorted(index.values()) == [0, 1]


# -- the sketch -------------------------------------------------------------------------------
ops = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 40),
                         st.booleans()), max_size=300)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_sketch_never_undercounts(steps):
    """Random opens and closes over 4 areas, 2 listeners and 41 IPs on a narrow sketch (so rows
    collide): every IP's estimate >= its true count, totals are exact."""
    table, areas = table_with_areas(4, nslots=4, width=16)
    gates = [[area.gate(index, 0, 10**6) for index in (0, 1)] for area in areas]
    open_ = {}
    for area_no, index, ip_no, close in steps:
        key = (area_no, index, ip_no)
        gate, ip = gates[area_no][index], IPS[ip_no]
        if close and open_.get(key):
            gate.release(ip)
            open_[key] -= 1
        else:
            assert gate.try_acquire(ip) is None
            open_[key] = open_.get(key, 0) + 1
    for index in (0, 1):
        assert table.total(index) == sum(n for (_, i, _), n in open_.items() if i == index)
        for ip_no, ip in enumerate(IPS[:41]):
            true = sum(n for (_, i, p), n in open_.items() if i == index and p == ip_no)
            assert table.per_ip(index, ip) >= true


def test_sketch_is_exact_without_collisions():
    table, areas = table_with_areas(2)
    gates = [area.gate(0, 0, 100) for area in areas]
    for n, ip in enumerate(IPS[:20]):
        for i in range(n):
            gates[i % 2].try_acquire(ip)
    assert [table.per_ip(0, ip) for ip in IPS[:20]] == list(range(20))
    assert all(gates[0].columns(ip) == table.columns(0, ip) for ip in IPS)


# -- racing workers ---------------------------------------------------------------------------
def test_overshoot_is_at_most_one_per_other_worker():
    """All workers check before any adds (the worst interleaving): limit + workers - 1."""
    table, areas = table_with_areas(4)
    gates = [area.gate(0, 5, 0) for area in areas]
    for i in range(4):
        gates[0].try_acquire(IPS[i])           # 4 open: one short of the limit
    assert all(gate.check(A) is None for gate in gates)
    for gate in gates:
        gate.add(A)
    assert table.total(0) == 5 + 4 - 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.integers(0, 3), st.sampled_from('cr')),
                                   max_size=200))
def test_overshoot_bound_holds_for_any_interleaving(limit, schedule):
    """Each of 4 workers is a state machine idle --check passed--> pending --add--> idle, and
    may release what it holds; whatever the order, total <= limit + 3 and every
    per-IP count <= max_per_ip + 3."""
    table, areas = table_with_areas(4, nslots=4)
    gates = [area.gate(0, limit, limit) for area in areas]
    pending, held = [False] * 4, [0] * 4
    for worker, action in schedule:
        gate = gates[worker]
        if action == 'r' and held[worker] and not pending[worker]:
            gate.release(A)
            held[worker] -= 1
        elif pending[worker]:
            gate.add(A)
            pending[worker], held[worker] = False, held[worker] + 1
        elif gate.check(A) is None:
            pending[worker] = True
        assert table.total(0) <= limit + 3 and table.per_ip(0, A) <= limit + 3


def _run_children(table: LimitTable, work, slots: list[int], timeout: float = 20.0) -> list[int]:
    """Fork one child per slot running work(area) at the same moment; their exit codes."""
    go_r, go_w = os.pipe()
    pids = []
    for slot in slots:
        pid = os.fork()
        if pid == 0:                           # child: never returns into pytest
            code = 1
            try:
                os.close(go_w)
                os.read(go_r, 1)               # EOF when the parent has forked them all
                work(table.area(slot))
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(go_w)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(codes) < len(pids) and time.monotonic() < deadline:
            for pid in pids:
                if pid not in codes:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        codes[pid] = os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
    finally:
        for pid in pids:
            if pid not in codes:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                codes[pid] = -signal.SIGKILL
    return [codes[pid] for pid in pids]


def test_forked_workers_count_concurrently():
    table = LimitTable.allocate(4)
    slots = [table.take_slot() for _ in range(3)]

    def work(area):
        gate = area.gate(0, 0, 10**6)
        for i in range(3000):
            assert gate.try_acquire(IPS[i % 50]) is None
        for i in range(0, 3000, 2):            # close half of them
            gate.release(IPS[i % 50])

    assert _run_children(table, work, slots) == [0, 0, 0]
    assert table.total(0) == 3 * 1500
    # each child left its 60 connections from every odd-numbered IP open, closed the others
    # (exact: 50 IPs colliding in all four rows of 16384 is a ~1e-10 event)
    assert [table.per_ip(0, ip) for ip in IPS[:50]] == [0, 180] * 25
    for slot in slots:                         # reaped: nothing leaks
        table.free_slot(slot)
    assert table.total(0) == 0 and all(table.per_ip(0, ip) == 0 for ip in IPS)


def test_forked_workers_keep_to_the_limit():
    table = LimitTable.allocate(4)
    slots = [table.take_slot() for _ in range(3)]

    def work(area):
        gate = area.gate(0, 200, 0)
        for i in range(400):
            gate.try_acquire(IPS[i % 50])

    assert _run_children(table, work, slots) == [0, 0, 0]
    assert 200 <= table.total(0) <= 200 + 2


def test_killed_worker_leaves_nothing_counted_once_freed():
    table = LimitTable.allocate(2)
    slot = table.take_slot()

    def work(area):
        gate = area.gate(0, 10, 10)
        for _ in range(5):
            gate.try_acquire(A)
        os.kill(os.getpid(), signal.SIGKILL)   # no release, no clean exit

    assert _run_children(table, work, [slot]) == [-signal.SIGKILL]
    assert table.total(0) == 5 and table.per_ip(0, A) == 5
    table.free_slot(slot)
    assert table.total(0) == 0 and table.per_ip(0, A) == 0


def _shmem_kib() -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('RssShmem:'))


def test_table_costs_memory_only_where_written_and_freeing_gives_it_back():
    before = _shmem_kib()
    table = LimitTable.allocate(limits.slots_for(config(workers=2)))
    assert len(table.block) >= table.nslots * table.step * 4
    assert _shmem_kib() - before < 64          # the header page, not the areas
    slot = table.take_slot()
    start = table.header + slot * table.step
    for word in range(start, start + table.step, 1024):
        table.view[word] = 1                   # touch every page of one area
    assert _shmem_kib() - before >= table.step * 4 // 1024 - 8
    table.free_slot(slot)
    assert _shmem_kib() - before < 64


# -- the master's wiring ----------------------------------------------------------------------
ARBITER_SCRIPT = textwrap.dedent('''
    import json, os, signal, sys, time
    from mpproxy.config import loader
    for key in ('listener.max_connections', 'listener.max_connections_per_ip'):
        loader.NOT_SUPPORTED_YET.pop(key, None)    # until the data path uses them
    from mpproxy.config import load
    from mpproxy.master.arbiter import Arbiter
    from mpproxy.observe import log as logmod

    path, port, port2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def write(listeners):
        with open(path, 'w') as f:
            f.write('workers: 2\\nshutdown_timeout: 1s\\nlisteners:\\n' + listeners)
    def tcp(p, extra=''):
        return f'  - {{listen: 127.0.0.1:{p}, upstream: [127.0.0.1:9], {extra}}}\\n'

    def turn(arb, until, what):
        deadline = time.monotonic() + 10
        while not until():
            if time.monotonic() > deadline:
                raise SystemExit(f'timed out waiting for {what}')
            arb.turn(0.05)

    def slots(arb):
        return sorted((w.limit_slot for g in arb.table.generations for w in g.workers.values()),
                      key=lambda s: -1 if s is None else s)

    out = {}
    logmod.setup('stderr', 'warn')
    write(tcp(port, 'max_connections: 10'))
    arb = Arbiter(load(path), path)
    arb.start()
    try:
        gen = arb.table.generations[0]
        turn(arb, lambda: gen.state == 'active', 'generation 1')
        out['index1'] = list(gen.limit_index.values())
        out['slots1'] = slots(arb)
        victim = gen.workers[1]
        arb.builder.limits.area(victim.limit_slot).gate(0, 0, 0).add(b'\\x01\\x02\\x03\\x04')
        out['counted'] = arb.builder.limits.total(0)
        os.kill(victim.pid, signal.SIGKILL)
        turn(arb, lambda: 1 in gen.workers and gen.workers[1] is not victim, 'a respawn')
        out['after_kill'] = arb.builder.limits.total(0)
        out['slots_respawned'] = slots(arb)
        write(tcp(port, 'max_connections: 20') + tcp(port2, 'max_connections_per_ip: 1'))
        arb.reload()
        gen2 = arb.table.generations[-1]
        turn(arb, lambda: gen2.state == 'active', 'generation 2')
        out['index2'] = sorted(gen2.limit_index.values())
        out['slots_both'] = slots(arb)
        turn(arb, lambda: len(arb.table.generations) == 1, 'generation 1 to finish')
        out['slots2'] = slots(arb)
        write(tcp(port))                        # no limits: no slots taken
        arb.reload()
        gen3 = arb.table.generations[-1]
        turn(arb, lambda: gen3.state == 'active' and len(arb.table.generations) == 1, 'generation 3')
        out['slots3'] = slots(arb)
        out['free'] = sorted(arb.builder.limits._free_slots)[:4]
    finally:
        arb.handle_term()
        turn(arb, lambda: not arb.table.live_workers(), 'the workers to stop')
        arb._shutdown()
    print(json.dumps(out))
''')


def test_master_hands_out_and_frees_limit_slots(tmp_path):
    port, port2 = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, '-c', ARBITER_SCRIPT, str(tmp_path / 'm.yaml'),
                           str(port), str(port2)], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['index1'] == [0]
    assert out['slots1'] == [0, 1]
    assert out['counted'] == 1
    assert out['after_kill'] == 0              # the killed worker's count was zeroed at reap
    assert out['slots_respawned'] == [0, 1]    # its slot went to the new worker of slot 1
    assert out['index2'] == [0, 1]             # the kept key keeps index 0
    assert out['slots_both'] == [0, 1, 2, 3]
    assert out['slots2'] == [2, 3]
    assert out['slots3'] == [None, None]
    assert out['free'] == [0, 1, 2, 3]
