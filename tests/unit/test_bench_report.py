"""bench/report.py: the ratio cell and its verdict in BENCHMARKS.md never disagree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'bench'))

import report                      # noqa: E402
from workloads import Sample       # noqa: E402


@pytest.mark.parametrize('mp, ng, shown, verdict', [
    (41.3, 37.6, '1.098', 'missed'),     # would round to 1.10 against a target of >= 1.1
    (42.3, 37.6, '1.12', 'met'),
    (37.6, 37.6, '1.00', 'missed'),
    (110.0, 100.0, '1.10', 'met'),
])
def test_ratio_never_rounds_across_a_higher_is_better_target(mp, ng, shown, verdict):
    assert report.ratio_and_verdict('keepalive', {'mpproxy': Sample(mp), 'nginx': Sample(ng)}) \
        == (shown, verdict)


def test_ratio_never_rounds_across_a_lower_is_better_target():
    # memory: target <= 0.5; 0.5049 would show as 0.50 but misses
    assert report.ratio_and_verdict('memtcp', {'mpproxy': Sample(5.049), 'nginx': Sample(10.0)}) \
        == ('0.505', 'missed')
    assert report.ratio_and_verdict('memtcp', {'mpproxy': Sample(1.62), 'nginx': Sample(9.16)}) \
        == ('0.18', 'met')


def test_a_failed_correctness_check_is_never_met():
    assert report.ratio_and_verdict('keepalive', {'mpproxy': Sample(50.0, True),
                                                  'nginx': Sample(10.0)})[1] == 'missed'


def test_quic_rows_are_not_applicable_to_nginx_and_haproxy_and_have_no_target():
    for name in ('quicnew', 'quicsteady'):
        assert not report.applicable('nginx', name) and not report.applicable('haproxy', name)
        assert report.applicable('mpproxy', name) and report.applicable('direct', name)
        assert report.ratio_and_verdict(name, {'mpproxy': Sample(1.0), 'nginx': Sample(1.0)}) \
            == ('', '')


def test_quic_table_compares_sni_routes_with_plain_udp_and_direct():
    import quic
    results = {'quicnew': {'mpproxy': [Sample(240.0, cpu_per=300e-6)],
                           'mpproxy-udp': [Sample(250.0, cpu_per=200e-6)],
                           'direct': [Sample(300.0)]}}
    row = quic.table(results, report.fmt).splitlines()[2]
    assert '| 240 | 250 | 300 | 0.96 | 0.80 | 300 / 200 (+100) µs per handshake |' in row
