"""`mpproxy top`'s view (observe/top_view.py): /status snapshots -> lines, with rates from
the difference of two snapshots over the master's clock; and the scrolling of a body
taller than the terminal (observe/top.py)."""

from __future__ import annotations

import copy

from mpproxy.observe import top_view
from mpproxy.observe.top import _scroll


def snapshot(uptime=10.0, pid=100, accepted=0, received=0, sent=0, connects=0, cpu=1.0,
             admin_state='ready', weight=1) -> dict:
    return {
        'version': '0.1.0',
        'master': {'pid': pid, 'started': 0.0, 'uptime': uptime},
        'config': {'path': '/etc/mpproxy.yaml', 'loaded': 0.0, 'generation': 2},
        'generations': [{'number': 2, 'state': 'active', 'workers': 1, 'loaded': 0.0}],
        'workers': [{'slot': 0, 'pid': 201, 'generation': 2, 'state': 'active', 'ready': True,
                     'uptime': uptime, 'connections': 3, 'sessions': 0, 'cpu_seconds': cpu,
                     'rss_bytes': 25 * 1024 * 1024}],
        'listeners': [{'name': 'web', 'protocol': 'tcp', 'listen': '127.0.0.1:8443',
                       'upstream': 'pool', 'accepted': accepted, 'active': 3, 'failed': 0,
                       'received_bytes': received, 'sent_bytes': sent}],
        'upstreams': [{'name': 'pool', 'balance': 'round_robin', 'servers': [
            {'server': '10.0.0.1:80', 'state': 'up', 'admin_state': admin_state,
             'weight': weight, 'config_weight': 1, 'health_check': None, 'down_in_workers': [],
             'active': 2, 'connect_errors': 0, 'connects': connects},
            {'server': '10.0.0.2:80', 'state': 'down', 'admin_state': 'ready', 'weight': 1,
             'config_weight': 1, 'health_check': 'down', 'down_in_workers': [0],
             'active': 0, 'connect_errors': 4, 'connects': 0}]}],
    }


def row(lines, text: str) -> list[str]:
    return next(line[0] for line in lines if text in line[0]).split()


def test_rates_are_the_difference_of_two_snapshots_over_the_masters_clock():
    before = snapshot(uptime=10.0, accepted=100, received=0, sent=0, connects=50, cpu=1.0)
    now = snapshot(uptime=12.0, accepted=300, received=4096, sent=2 * 1024 * 1024,
                   connects=250, cpu=1.5)
    lines = top_view.lines(before, now, 'here')
    assert row(lines, '127.0.0.1:8443') == ['web', 'tcp', '127.0.0.1:8443', 'pool', '3', '300',
                                            '100', '2.0', 'KiB', '1.0', 'MiB']
    assert row(lines, '10.0.0.1:80')[-3:] == ['2', '100', '0']     # active, conn/s, errors
    assert row(lines, ' 201 ') == ['0', '201', '2', 'active', '3', '0', '25.0', '25.0', 'MiB',
                                   '12s']
    assert lines[0][1] == top_view.TITLE and 'master 100' in lines[0][0] \
        and lines[0][0].endswith('here')


def test_no_rates_for_a_first_snapshot_another_master_or_a_counter_that_went_back():
    now = snapshot(uptime=12.0, accepted=300)
    for before in (None, snapshot(uptime=10.0, pid=99, accepted=100),
                   snapshot(uptime=10.0, accepted=400)):
        listener = row(top_view.lines(before, now, ''), '127.0.0.1:8443')
        assert listener[6] == '-', before
    worker = row(top_view.lines(None, now, ''), ' 201 ')
    assert worker[6] == '-'                                         # CPU% needs two


def test_servers_show_admin_state_config_weight_and_weight_now_and_are_keyed():
    lines = top_view.lines(None, snapshot(admin_state='drain', weight=5), '')
    first = row(lines, '10.0.0.1:80')
    assert first[:7] == ['pool', '10.0.0.1:80', 'up', 'drain', '1', '5', '-']
    assert row(lines, '10.0.0.2:80')[2:7] == ['down', 'ready', '1', '1', 'down']
    keys = [line[2] for line in lines if line[2] is not None]
    assert keys == [('pool', '10.0.0.1:80'), ('pool', '10.0.0.2:80')]
    assert top_view.servers(snapshot()) == keys
    assert top_view.servers(None) == []


def test_an_older_master_without_the_new_fields_still_shows():
    old = snapshot()
    for worker in old['workers']:
        del worker['cpu_seconds'], worker['rss_bytes']
    for server in old['upstreams'][0]['servers']:
        del server['config_weight'], server['connects']
    lines = top_view.lines(copy.deepcopy(old), old, '')
    assert row(lines, ' 201 ')[6:8] == ['-', '-']
    assert row(lines, '10.0.0.1:80')[4:6] == ['1', '1']


def test_rate_formats():
    assert [top_view._count(r) for r in (None, 0, 0.5, 12.25, 150, 4200, 52000)] == \
        ['-', '0', '0.5', '12.2', '150', '4.2k', '52k']


def test_a_tall_body_scrolls_to_keep_the_title_and_the_selected_server():
    body = [('title', 'title', None)] + [(f'line {i}', 'row', ('u', str(i)) if i >= 5 else None)
                                         for i in range(30)]
    shown = _scroll(body, 6, ('u', '20'))
    assert shown[0][0] == 'title' and len(shown) == 6 and shown[-1][0] == 'line 20'
    shown = _scroll(body, 6, ('u', '5'))
    assert [line[0] for line in shown] == ['title', 'line 1', 'line 2', 'line 3', 'line 4',
                                           'line 5']
    assert _scroll(body, 6, None)[1][0] == 'line 0'
    assert _scroll(body, 1, None) == body[:1] and _scroll(body, 0, None) == []
