"""`mpproxy top`'s view: two successive /status snapshots -> the lines of the screen.

Pure (no curses, no I/O), so a unit test can check it. Rates are the difference of two
snapshots over the master's own clock (`master.uptime`, monotonic), so a slow fetch does
not bend them; there are none for the first snapshot, after the master changed (restart,
binary upgrade: another pid) or for a counter that went backwards.

A line is (text, style, key): style one of TITLE, HEAD, ROW; key the (upstream, server) of
a server's row (what the cursor selects), else None.
"""

from __future__ import annotations

from mpproxy.observe.status_view import duration, size, table

TITLE, HEAD, ROW = 'title', 'head', 'row'


class Rates:
    """Per-second differences between the previous and the current snapshot."""

    def __init__(self, previous: dict | None, current: dict):
        self.seconds = None
        if previous is not None and previous['master']['pid'] == current['master']['pid']:
            elapsed = current['master']['uptime'] - previous['master']['uptime']
            self.seconds = elapsed if elapsed > 0 else None
        self.before = _index(previous) if self.seconds else {}

    def of(self, key: tuple, field: str, now) -> float | None:
        """(now - before) / seconds of one counter; None when it cannot be known."""
        before = self.before.get(key, {}).get(field)
        if before is None or now is None or now < before:
            return None
        return (now - before) / self.seconds


def _index(status: dict | None) -> dict:
    """Listeners, servers and workers of a snapshot by a key that survives a refresh."""
    if status is None:
        return {}
    out: dict = {}
    for listener in status.get('listeners', ()):
        out[('listener', listener['name'], listener['protocol'])] = listener
    for upstream in status.get('upstreams', ()):
        for server in upstream['servers']:
            out[('server', upstream['name'], server['server'])] = server
    for worker in status.get('workers', ()):
        out[('worker', worker['pid'])] = worker
    return out


def servers(status: dict | None) -> list[tuple[str, str]]:
    """The (upstream, server) keys of a snapshot, in the order they are shown."""
    if status is None:
        return []
    return [(u['name'], s['server']) for u in status.get('upstreams', ()) for s in u['servers']]


def lines(previous: dict | None, current: dict, source: str) -> list[tuple[str, str, object]]:
    """The screen's body for `current` (rates against `previous`); `source` ends the title
    (where it came from, when)."""
    rates = Rates(previous, current)
    master, config = current['master'], current['config']
    generation = config.get('generation')
    title = (f"mpproxy {current['version']}  master {master['pid']}  up "
             f"{duration(master['uptime'])}  generation {generation if generation else '-'}  "
             f"{source}")
    out: list[tuple[str, str, object]] = [(title, TITLE, None), ('', ROW, None)]
    out += _section(('LISTENER', 'PROTO', 'LISTEN', 'UPSTREAM', 'ACTIVE', 'TOTAL', 'CONN/S',
                     'IN/S', 'OUT/S'), _listener_rows(current, rates), 'llllrrrrr')
    out.append(('', ROW, None))
    rows, keys = _server_rows(current, rates)
    out += _section(('  UPSTREAM', 'SERVER', 'STATE', 'ADMIN', 'WEIGHT', 'EFF', 'CHECK',
                     'ACTIVE', 'CONN/S', 'ERRORS'), rows, 'llllrrlrrr', keys)
    out.append(('', ROW, None))
    out += _section(('WORKER', 'PID', 'GEN', 'STATE', 'CONNS', 'SESSIONS', 'CPU%', 'RSS',
                     'UPTIME'), _worker_rows(current, rates), 'rrrlrrrrr')
    return out


def _section(header: tuple, rows: list, align: str, keys=None) -> list:
    text = table(header, rows, align)
    keys = keys or [None] * len(rows)
    return [(text[0], HEAD, None)] + [(t, ROW, k) for t, k in zip(text[1:], keys)]


def _listener_rows(status: dict, rates: Rates) -> list:
    rows = []
    for listener in status.get('listeners', ()):
        key = ('listener', listener['name'], listener['protocol'])
        total = listener['accepted'] if listener['protocol'] == 'tcp' \
            else listener['sessions_created']
        field = 'accepted' if listener['protocol'] == 'tcp' else 'sessions_created'
        rows.append((listener['name'], listener['protocol'], listener['listen'],
                     listener['upstream'], listener['active'] if listener['protocol'] == 'tcp'
                     else listener['sessions_active'], total,
                     _count(rates.of(key, field, total)),
                     _bytes(rates.of(key, 'received_bytes', listener['received_bytes'])),
                     _bytes(rates.of(key, 'sent_bytes', listener['sent_bytes']))))
    return rows


def _server_rows(status: dict, rates: Rates) -> tuple[list, list]:
    rows, keys = [], []
    for upstream in status.get('upstreams', ()):
        for server in upstream['servers']:
            key = (upstream['name'], server['server'])
            connects = server.get('connects')
            weight = server.get('weight', '-')
            rows.append(('  ' + upstream['name'], server['server'], server['state'],
                         server.get('admin_state', 'ready'),
                         server.get('config_weight', weight), weight,
                         server.get('health_check') or '-', server['active'],
                         _count(rates.of(('server', *key), 'connects', connects)),
                         server['connect_errors']))
            keys.append(key)
    return rows, keys


def _worker_rows(status: dict, rates: Rates) -> list:
    rows = []
    for worker in status.get('workers', ()):
        cpu = rates.of(('worker', worker['pid']), 'cpu_seconds', worker.get('cpu_seconds'))
        rss = worker.get('rss_bytes')
        rows.append((worker['slot'], worker['pid'], worker['generation'],
                     worker['state'] + ('' if worker['ready'] else ' (booting)'),
                     _dash(worker['connections']), _dash(worker['sessions']),
                     '-' if cpu is None else f'{cpu * 100:.1f}',
                     '-' if rss is None else size(rss), duration(worker['uptime'])))
    return rows


def _count(rate: float | None) -> str:
    """Events per second: `0`, `3.5`, `120`, `4.2k`."""
    if rate is None:
        return '-'
    if rate >= 10_000:
        return f'{rate / 1000:.0f}k'
    if rate >= 1000:
        return f'{rate / 1000:.1f}k'
    return f'{rate:.0f}' if rate >= 100 or rate == 0 else f'{rate:.1f}'


def _bytes(rate: float | None) -> str:
    return '-' if rate is None else size(int(rate))


def _dash(value) -> object:
    return '-' if value is None else value
