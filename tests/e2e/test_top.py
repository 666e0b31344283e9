"""`mpproxy top` (issue 15): the live view in a real terminal (a private tmux server: keys
with send-keys, the screen with capture-pane) against a real proxy with two tagged TCP
backends: what it shows, drain and ready with keys, the read-only endpoint's 403, a small
terminal, and the proxy going away and coming back."""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import pytest

from helpers.admin import admin_config, server_status, tags
from helpers.net import free_port, get
from helpers.proc import children, run_cli, wait_for
from helpers.terminal import TMUX, Terminal

pytestmark = pytest.mark.skipif(TMUX is None, reason='tmux is not installed')

@pytest.fixture
def terminals(tmp_path):
    """Factory: terminals(proxy, width, height) -> a Terminal running `mpproxy -c ... top`;
    each one's tmux server is killed at teardown."""
    made: list[Terminal] = []

    def make(proxy, width=120, height=40) -> Terminal:
        command = [sys.executable, '-m', 'mpproxy', '-c', str(proxy.config_path), 'top']
        made.append(Terminal(command, tmp_path, width, height))
        return made[-1]

    yield make
    for terminal in made:
        print(f'--- the last screen ---\n{_last_screen(terminal)}')   # shown when a test fails
        terminal.close()


def _last_screen(terminal: Terminal) -> str:
    try:
        return terminal.screen()
    except AssertionError as exc:
        return str(exc)


def row(screen: str, text: str) -> str:
    """The line of the screen that holds `text` ('' when none)."""
    return next((line for line in screen.splitlines() if text in line), '')


def test_top_shows_the_proxy_and_drains_and_readies_the_selected_server(
        proxies, terminals, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(admin_config(port, admin, [a.address, b.address], tmp_path, name='front')).start(wait_workers=2)
    workers = proxy.serving_workers()
    assert sorted(set(tags(port, 6))) == [b'A', b'B']
    term = terminals(proxy)

    def everything(screen):
        return all(text in screen for text in ('LISTENER', 'front', f'127.0.0.1:{port}',
                                               a.address, b.address, 'CPU%', 'RSS',
                                               *(str(pid) for pid in workers)))
    screen = term.wait_screen(everything, what='listener, servers and workers')
    assert 'Traceback' not in screen
    assert row(screen, a.address).startswith('>')          # the first server is selected
    for pid in workers:                                     # RSS known, CPU% after 2 snapshots
        assert 'MiB' in row(screen, str(pid)), screen
    screen = term.wait_screen(lambda s: all(re.search(r'\d\.\d\s+\d', row(s, f' {pid} '))
                                            for pid in workers), what='CPU% of the workers')
    assert re.search(r'\bup\b.*\bready\b', row(screen, b.address)), screen

    term.keys('Down')
    term.wait_screen(lambda s: row(s, b.address).startswith('>'), what='B selected')
    term.keys('d')
    screen = term.wait_screen(f'pool {b.address}: drain', what='the drain in the status line')
    wait_for(lambda: server_status(admin, b.address)['admin_state'] == 'drain', 3,
             what='/status: B drained')
    assert server_status(admin, a.address)['admin_state'] == 'ready'
    wait_for(lambda: tags(port, 10) == [b'A'] * 10, 3, what='new connections all to A')
    assert tags(port, 20) == [b'A'] * 20
    term.wait_screen(lambda s: 'drain' in row(s, b.address).split(), what='B drained on screen')

    term.keys('k', 'j', 'r')                                # up and down again: still B
    term.wait_screen(f'pool {b.address}: ready', what='the ready in the status line')
    assert server_status(admin, b.address)['admin_state'] == 'ready'
    wait_for(lambda: b'B' in tags(port, 10), 3, what='B back in rotation')
    assert 'server %s set to drain' % b.address in proxy.log()

    term.keys('q')
    wait_for(lambda: term.exit_status() is not None, 5, what='top to exit on q')
    assert term.exit_status() == 0
    assert 'Traceback' not in term.screen()


def test_a_read_only_endpoint_shows_the_403(proxies, terminals, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(admin_config(port, admin, [a.address, b.address], tmp_path, name='front', token=False))
    proxy.start(wait_workers=2)
    term = terminals(proxy)
    term.wait_screen(b.address, what='the servers')
    term.keys('j', 'd')
    screen = term.wait_screen(': 403 ', what='the 403 in the status line')
    line = row(screen, ': 403 ')
    assert f'drain pool {b.address}: 403' in line and 'read-only' in line, screen
    assert server_status(admin, b.address)['admin_state'] == 'ready'
    assert term.exit_status() is None                       # still running
    top = children(term.pid)                                # (the pane's shell runs top)
    assert len(top) == 1
    os.kill(top[0], signal.SIGTERM)
    wait_for(lambda: term.exit_status() == 0, 5, what='top to exit on TERM')
    assert 'Traceback' not in term.screen()


def test_a_small_terminal_and_a_proxy_that_goes_away_and_comes_back(
        proxies, terminals, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    cfg = admin_config(port, admin, [a.address, b.address], tmp_path, name='front')
    proxy = proxies(cfg).start(wait_workers=2)
    term = terminals(proxy, 120, 40)
    term.wait_screen(b.address, what='the servers')

    term.resize(80, 24)
    wait_for(lambda: term.size() == (80, 24), 5, what='an 80x24 terminal')
    screen = term.wait_screen(lambda s: max(map(len, s.splitlines())) <= 80
                              and 'q quit' in s and a.address in s, what='the view in 80x24')
    assert 'WORKER' in screen
    term.resize(40, 8)                                      # smaller than any table
    wait_for(lambda: term.size() == (40, 8), 5, what='a 40x8 terminal')
    term.keys('j')
    term.wait_screen(lambda s: row(s, b.address).startswith('>'), what='B in view, selected')
    term.resize(120, 40)

    proxy.signal(signal.SIGTERM)
    proxy.wait_exit()
    screen = term.wait_screen(f'cannot reach 127.0.0.1:{admin}', what='the proxy gone')
    assert a.address not in screen and 'Traceback' not in screen
    assert term.exit_status() is None
    term.keys('d')                                          # nothing to drain: no crash
    term.wait_screen('no server selected', what='the status line')

    again = proxies(cfg, name='again').start(wait_workers=2)
    screen = term.wait_screen(lambda s: b.address in s and 'cannot reach' not in s,
                              what='the proxy back')
    assert f'master {again.pid}' in screen
    term.keys('q')
    wait_for(lambda: term.exit_status() == 0, 5, what='top to exit on q')


def test_status_gives_what_top_shows_worker_cpu_and_rss_and_server_connects(
        proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    proxy = proxies(admin_config(port, admin, [a.address, b.address], tmp_path, name='front')).start(wait_workers=2)
    assert sorted(set(tags(port, 6))) == [b'A', b'B']

    def counted():           # workers publish once a second
        status = json.loads(get(admin, '/status')[2])
        servers = status['upstreams'][0]['servers']
        return status if sum(s['connects'] for s in servers) == 6 else None
    status = wait_for(counted, 5, what='6 connects in /status')
    assert sorted(w['pid'] for w in status['workers']) == sorted(proxy.workers())
    for worker in status['workers']:
        assert worker['cpu_seconds'] >= 0 and 1 << 20 < worker['rss_bytes'] < 1 << 30, worker
    assert [(s['weight'], s['config_weight']) for s in status['upstreams'][0]['servers']] == \
        [(1, 1), (1, 1)]


def test_without_an_admin_endpoint_or_a_terminal_top_says_why(proxies, tmp_path, pair):
    a, b = pair
    port, admin = free_port(), free_port()
    cfg = admin_config(port, admin, [a.address, b.address], tmp_path, name='front')
    proxy = proxies(cfg)                                    # not started: no need
    out = run_cli('-c', str(proxy.config_path), 'top')      # stdin and stdout: no terminal
    assert out.returncode == 1 and 'top needs a terminal' in out.stderr, out.stderr
    del cfg['admin']
    proxy.write_config(cfg)
    out = run_cli('-c', str(proxy.config_path), 'top')
    assert out.returncode == 1 and 'top needs the admin endpoint' in out.stderr, out.stderr
    assert 'Traceback' not in out.stderr
