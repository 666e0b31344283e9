"""Metrics: the snapshot layout, the seqlocked area (against a real writer process), the
master's retired totals and the Prometheus text format."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from array import array
from pathlib import Path

import pytest

from mpproxy.config import load
from mpproxy.observe import metrics, prometheus
from mpproxy.observe.metrics import _CURRENT, _SEQ, Area, Layout, Publisher
from mpproxy.upstream.pool import CONNECT_BUCKETS, UpstreamPool

ROOT = Path(__file__).resolve().parent.parent.parent


def config(tmp_path, listeners=None, extra=''):
    listeners = listeners or ('  - {name: web, listen: "127.0.0.1:8000", upstream: pool}\n'
                              '  - {name: dns, listen: "127.0.0.1:8000", protocol: udp, '
                              'upstream: pool}\n')
    path = tmp_path / 'c.yaml'
    path.write_text('upstreams:\n  pool:\n    servers: ["127.0.0.1:9000", "127.0.0.1:9001"]\n'
                    + extra + 'listeners:\n' + listeners)
    return load(str(path))


class Counted:
    """Stands in for a listener's service in the publisher's tests: its `counters()` are
    what a test sets (the real services' counters are checked below)."""

    def __init__(self, keys):
        self.values = dict.fromkeys(keys, 0)

    def counters(self):
        return self.values


def publisher(cfg, area=None):
    layout = Layout(cfg)
    area = area or Area.allocate(layout)
    services = [Counted(metrics.TCP_KEYS if l.protocol == 'tcp' else metrics.UDP_KEYS)
                for l in cfg.listeners]
    pools = {name: UpstreamPool(cfg.upstreams[name]) for name, _ in layout.upstreams}
    by_key = {l.key: svc for l, svc in zip(cfg.listeners, services)}
    return Publisher(area, layout, by_key, pools), services, pools, layout, area


def snapshot(layout, values, worker=0):
    samples = {}
    prometheus.add_snapshot(samples, layout, values, worker)
    return samples


# -- layout and publishing ---------------------------------------------------------------

def test_a_snapshot_carries_every_counter_of_listeners_and_servers(tmp_path):
    cfg = config(tmp_path)
    pub, (tcp, udp), pools, layout, area = publisher(cfg)
    tcp.values.update(accepted=7, denied=2, failed=1, received_bytes=113, sent_bytes=55,
                      active=2)
    udp.values.update(datagrams_received=9, ended_evicted=3, active=4)
    pool = pools['pool']
    pool.succeeded(pool.targets[1], 0.003)
    pool.failed(pool.targets[0])                              # max_fails 1: down now
    pub.publish()
    s = snapshot(layout, area.read())
    web, dns, w = ('listener', 'web'), ('listener', 'dns'), ('worker', '0')
    assert s['mpproxy_tcp_connections_accepted_total'][(web, w)] == 7
    assert s['mpproxy_tcp_connections_refused_total'][(web, ('reason', 'denied'), w)] == 2
    assert s['mpproxy_tcp_connections_failed_total'][(web, w)] == 1
    assert s['mpproxy_tcp_received_bytes_total'][(web, w)] == 113
    assert s['mpproxy_tcp_sent_bytes_total'][(web, w)] == 55
    assert s['mpproxy_tcp_connections_active'][(web, w)] == 2
    assert s['mpproxy_udp_datagrams_received_total'][(dns, w)] == 9
    assert s['mpproxy_udp_sessions_ended_total'][(dns, ('reason', 'evicted'), w)] == 3
    assert s['mpproxy_udp_sessions_active'][(dns, w)] == 4
    a = (('upstream', 'pool'), ('server', '127.0.0.1:9000'), w)
    b = (('upstream', 'pool'), ('server', '127.0.0.1:9001'), w)
    assert s['mpproxy_upstream_connect_errors_total'] == {a: 1, b: 0}
    assert s['mpproxy_upstream_server_up'] == {a: 0, b: 1}
    hist = s['mpproxy_upstream_connect_duration_seconds'][b]
    assert hist[CONNECT_BUCKETS.index(0.005)] == 1 and sum(hist[:-1]) == 1
    assert hist[-1] == 3_000_000                               # the sum, in ns
    assert sum(s['mpproxy_upstream_connect_duration_seconds'][a][:-1]) == 0


def test_server_up_follows_the_health_block(tmp_path):
    cfg = config(tmp_path, extra='    health_check: {interval: 1s}\n')
    pub, _, pools, layout, area = publisher(cfg)
    block = bytearray(2)
    pools['pool'].health = (block, 0)
    block[1] = 1                                               # the checks took it out
    pub.publish()
    up = snapshot(layout, area.read())['mpproxy_upstream_server_up']
    assert sorted(up.values()) == [0, 1]
    assert up[(('upstream', 'pool'), ('server', '127.0.0.1:9001'), ('worker', '0'))] == 0


def test_a_worker_refuses_an_area_of_another_layout(tmp_path):
    cfg = config(tmp_path)
    other = Area.allocate(Layout(config(tmp_path, '  - {listen: "127.0.0.1:1", upstream: pool}\n')))
    with pytest.raises(ValueError):
        publisher(cfg, other)


# -- the area and its seqlock ------------------------------------------------------------

def test_read_before_any_publish_is_none_then_the_newest_snapshot(tmp_path):
    layout = Layout(config(tmp_path))
    area = Area.allocate(layout)
    assert area.read() is None
    for k in (1, 2, 3):
        area.write([k] * layout.size)
        assert list(area.read()) == [k] * layout.size


def test_a_writer_killed_mid_publish_leaves_the_previous_snapshot(tmp_path):
    layout = Layout(config(tmp_path))
    area = Area.allocate(layout)
    area.write([5] * layout.size)
    b = 1 if area.words[_CURRENT] == 1 else 0     # what the next publish writes
    area.words[_SEQ + b] += 1                      # ... begun, never finished
    area.buffers[b][:3] = array('q', [99, 99, 99])
    assert list(area.read()) == [5] * layout.size


def test_a_torn_copy_is_never_returned(tmp_path):
    layout = Layout(config(tmp_path))
    area = Area.allocate(layout)
    area.write([5] * layout.size)
    assert list(area.read()) == [5] * layout.size
    current = area.words[_CURRENT] - 1
    area.buffers[current][1] = 6                   # bytes changed under an even sequence
    assert list(area.read()) == [5] * layout.size  # the CRC catches it: the last good one


def test_a_reader_that_loaded_current_long_ago_never_goes_backwards(tmp_path):
    """The interleaving behind a rare failure of the racing test below: the reader loads
    CURRENT, stalls; meanwhile the writer publishes a snapshot in the other buffer and
    writes a newer one into the reader's buffer, its CURRENT flip not yet done. A copy of
    that newer one must not be kept: CURRENT still names the older, which the next read
    would return."""
    layout = Layout(config(tmp_path))
    area = Area.allocate(layout)
    writer = Area(area.block, layout.size)          # the worker's view of the same block
    n = layout.size
    writer.write([1] * n)                           # buffer 0
    writer.write([2] * n)                           # buffer 1: CURRENT
    real = area.words

    class Stall:
        """The reader's words: on its first SEQ load, the writer runs first."""
        done = False

        def __getitem__(self, i):
            if i in (_SEQ, _SEQ + 1) and not self.done:
                self.done = True
                writer.write([3] * n)               # buffer 0, CURRENT flipped to it
                writer.write([4] * n)               # buffer 1, whole ...
                real[_CURRENT] = 1                  # ... its flip still to come
            return real[i]

    area.words = Stall()
    first = area.read()[0]
    area.words = real
    assert area.read()[0] >= first == 3


def test_reader_racing_a_writer_in_another_process_sees_only_whole_snapshots(tmp_path):
    layout = Layout(config(tmp_path))
    area = Area.allocate(layout)
    pid = os.fork()
    if pid == 0:                                   # the writer: snapshots of one repeated k
        try:
            k = 1
            while True:
                area.write([k] * layout.size)
                k += 1
        finally:
            os._exit(0)
    try:
        reads, last, deadline = 0, 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            values = area.read()
            if values is None:
                continue
            assert values.count(values[0]) == len(values), 'a torn snapshot'
            assert values[0] >= last, 'went backwards'
            last = values[0]
            reads += 1
        assert reads > 100 and last > 100, (reads, last)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    final = area.read()                            # killed wherever it was: still whole
    assert final.count(final[0]) == len(final) and final[0] >= last


# -- the master's totals --------------------------------------------------------------------

def test_retired_totals_never_go_backwards_across_worker_replacement(tmp_path):
    layout = Layout(config(tmp_path))
    totals = prometheus.Totals()
    accepted = layout.entries[0]
    assert accepted[0] == 'mpproxy_tcp_connections_accepted_total'
    key = accepted[1] + (('worker', '0'),)
    active = next(e for e in layout.entries if e[0] == 'mpproxy_tcp_connections_active')

    def values(n, open_now):
        v = [0] * layout.size
        v[accepted[3]], v[active[3]] = n, open_now
        return v

    seen = []
    old = values(10, 3)
    seen.append(totals.collect([(layout, old, 0)]))
    totals.retire(layout, old, 0)                  # reaped
    seen.append(totals.collect([]))
    for n in (0, 4):                               # its replacement, same slot, from zero
        seen.append(totals.collect([(layout, values(n, 1), 0)]))
    totals.retire(layout, values(6, 0), 0)
    seen.append(totals.collect([]))
    counts = [s['mpproxy_tcp_connections_accepted_total'][key] for s in seen]
    assert counts == [10, 10, 10, 14, 16]
    assert [s['mpproxy_tcp_connections_active'].get(active[1] + (('worker', '0'),))
            for s in seen] == [3, None, 1, 1, None]            # gauges: live workers only


def test_workers_of_one_slot_add_up_and_the_newest_state_wins(tmp_path):
    layout = Layout(config(tmp_path))
    up = next(e for e in layout.entries if e[0] == 'mpproxy_upstream_server_up')
    active = next(e for e in layout.entries if e[0] == 'mpproxy_tcp_connections_active')
    draining, new = [0] * layout.size, [0] * layout.size
    draining[up[3]], new[up[3]] = 0, 1
    draining[active[3]], new[active[3]] = 5, 2
    samples = prometheus.Totals().collect([(layout, draining, 1), (layout, new, 1)])
    w = (('worker', '1'),)
    assert samples['mpproxy_upstream_server_up'][up[1] + w] == 1
    assert samples['mpproxy_tcp_connections_active'][active[1] + w] == 7


# -- the text format -------------------------------------------------------------------------

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse(text):
    """Strict: every line is a comment or a sample; label values unescaped."""
    out = {}
    for line in text.splitlines():
        if line.startswith('#'):
            assert re.match(r'^# (HELP|TYPE) [a-z_]+ .+$', line), line
            continue
        m = LINE.match(line)
        assert m, line
        labels, rest = [], m.group(3) or ''
        while rest:
            lm = LABEL.match(rest)
            assert lm, (line, rest)
            value = re.sub(r'\\(.)', lambda x: {'n': '\n'}.get(x.group(1), x.group(1)), lm.group(2))
            labels.append((lm.group(1), value))
            rest = rest[lm.end():]
        out[(m.group(1), tuple(labels))] = float(m.group(4))
    return out


def test_label_values_are_escaped(tmp_path):
    name = 'we"ird\\name\nhere'
    cfg = config(tmp_path, '  - {name: "we\\"ird\\\\name\\nhere", listen: "127.0.0.1:8000", '
                           'upstream: pool}\n')
    assert cfg.listeners[0].name == name
    layout = Layout(cfg)
    values = [0] * layout.size
    values[1] = 42
    text = prometheus.render(prometheus.Totals().collect([(layout, values, 3)]))
    assert 'listener="we\\"ird\\\\name\\nhere"' in text
    samples = parse(text)
    key = ('mpproxy_tcp_connections_accepted_total', (('listener', name), ('worker', '3')))
    assert samples[key] == 42


def test_histogram_buckets_are_cumulative_with_sum_and_count(tmp_path):
    cfg = config(tmp_path, '  - {name: web, listen: "127.0.0.1:8000", upstream: pool}\n')
    pub, _, pools, layout, area = publisher(cfg)
    pool = pools['pool']
    for seconds in (0.0004, 0.002, 0.002, 0.3, 60.0):
        pool.succeeded(pool.targets[0], seconds)
    pub.publish()
    samples = parse(prometheus.render(snapshot(layout, area.read())))
    base = (('upstream', 'pool'), ('server', '127.0.0.1:9000'), ('worker', '0'))
    name = 'mpproxy_upstream_connect_duration_seconds'
    bucket = {le: samples[(name + '_bucket', base + (('le', le),))]
              for le in ('0.0005', '0.001', '0.0025', '0.25', '0.5', '10.0', '+Inf')}
    assert bucket == {'0.0005': 1, '0.001': 1, '0.0025': 3, '0.25': 3, '0.5': 4, '10.0': 4,
                      '+Inf': 5}
    assert samples[(name + '_count', base)] == 5
    assert samples[(name + '_sum', base)] == pytest.approx(60.3044)


def test_series_with_the_same_labels_are_summed_into_one(tmp_path):
    cfg = config(tmp_path, '  - {name: twin, listen: "127.0.0.1:8000", upstream: pool}\n'
                           '  - {name: twin, listen: "127.0.0.1:8001", upstream: pool}\n')
    layout = Layout(cfg)
    values = [0] * layout.size
    for name, labels, kind, offset, _ in layout.entries:
        if name == 'mpproxy_tcp_connections_accepted_total':
            values[offset] = 2
    text = prometheus.render(prometheus.Totals().collect([(layout, values, 0)]))
    lines = [l for l in text.splitlines() if l.startswith('mpproxy_tcp_connections_accepted_total')]
    assert lines == ['mpproxy_tcp_connections_accepted_total{listener="twin",worker="0"} 4']


def test_every_family_is_documented_in_the_readme():
    readme = (ROOT / 'README.md').read_text()
    section = readme.split('### Metrics reference', 1)[1].split('\n## ', 1)[0]
    for family in metrics.FAMILIES:
        assert f'`{family.name}`' in section, family.name


def test_the_real_services_count_under_every_key_the_metrics_read(tmp_path):
    """The publisher reads `counters()` by key: the real TcpService and UdpService must give
    every key of TCP_SERIES / UDP_SERIES, each from the counter it names."""
    # Imported here, not at the top: with uvloop and the services imported by the module, the
    # seqlock race test below fails now and then ("went backwards", 2 in 35 runs; 0 in 50
    # without), a timing effect not understood yet (see the closing note of issue 14).
    import uvloop

    from mpproxy.proxy.tcp.service import TcpService
    from mpproxy.proxy.udp.service import UdpService

    cfg = config(tmp_path)
    loop = uvloop.new_event_loop()
    tsock = socket.socket()
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tsock.bind(('127.0.0.1', 0))
        tsock.listen()
        usock.bind(('127.0.0.1', 0))
        pool = UpstreamPool(cfg.upstreams['pool'])
        log = logging.getLogger('test')
        tcp = TcpService(loop, cfg.listeners[0], tsock, pool, log)
        udp = UdpService(loop, cfg.listeners[1], usock, pool, log)
        assert list(tcp.counters()) == list(metrics.TCP_KEYS)
        assert list(udp.counters()) == list(metrics.UDP_KEYS)
        for i, name in enumerate(('accepted', 'denied', 'limited', 'bad_headers', 'failed',
                                  'received', 'sent')):
            setattr(tcp.counts, name, i + 1)
        assert tcp.counters() == {'accepted': 1, 'denied': 2, 'limited': 3, 'bad_headers': 4,
                                  'failed': 5, 'received_bytes': 6, 'sent_bytes': 7, 'active': 0}
        stats = udp.stats
        for i, name in enumerate(stats.__slots__):
            setattr(stats, name, 100 + i)
        expected = {'datagrams_received': 'datagrams_in', 'datagrams_sent': 'datagrams_out',
                    'datagrams_dropped': 'dropped', 'refused_denied': 'denied',
                    'refused_untrusted': 'untrusted', 'refused_proxy_header': 'bad_headers',
                    'received_bytes': 'bytes_in', 'sent_bytes': 'bytes_out',
                    'sessions_created': 'sessions_created',
                    'sessions_adopted': 'sessions_adopted', 'ended_expired': 'sessions_expired',
                    'ended_completed': 'sessions_completed', 'ended_failed': 'sessions_failed',
                    'ended_closed': 'sessions_closed', 'ended_handed_over': 'sessions_handed_out',
                    'refused_table_full': 'sessions_refused',
                    'refused_per_ip': 'sessions_refused_per_ip', 'quic_unrouted': 'quic_unrouted',
                    'quic_moved': 'quic_moved',
                    'active': 'sessions_active'}
        got = udp.counters()
        assert got['ended_evicted'] == stats.sessions_evicted_unanswered + stats.sessions_evicted_idle
        assert {key: got[key] for key in expected} == \
            {key: getattr(stats, attr) for key, attr in expected.items()}
    finally:
        tsock.close()
        usock.close()
        loop.close()


def test_a_tcp_and_a_udp_listener_that_share_a_name_keep_their_own_counts(tmp_path):
    cfg = config(tmp_path, '  - {listen: "127.0.0.1:8000", upstream: pool}\n'
                           '  - {listen: "127.0.0.1:8000", protocol: udp, upstream: pool}\n')
    assert cfg.listeners[0].name == cfg.listeners[1].name
    pub, (tcp, udp), _, layout, area = publisher(cfg)
    tcp.values['accepted'], udp.values['datagrams_received'] = 5, 8
    pub.publish()
    s = snapshot(layout, area.read())
    labels = (('listener', cfg.listeners[0].name), ('worker', '0'))
    assert s['mpproxy_tcp_connections_accepted_total'][labels] == 5
    assert s['mpproxy_udp_datagrams_received_total'][labels] == 8
