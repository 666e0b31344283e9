"""`mpproxy status`: the running proxy's /status, as a short view for a person.

Runs in its own process (the command line), never in the master: a blocking GET on
the `admin.listen` of the config file, then plain text tables on stdout.
"""

from __future__ import annotations

import http.client
import json
import sys
import time

from mpproxy.config.schema import Config
from mpproxy.errors import EXIT_FAILURE, EXIT_OK

TIMEOUT = 5.0
_LOOPBACK = {'0.0.0.0': '127.0.0.1', '::': '::1'}


def main(config: Config) -> int:
    if config.admin is None:
        print(f'mpproxy: status needs the admin endpoint: set admin: {{listen: 127.0.0.1:9901}} '
              f'in {config.path} and reload', file=sys.stderr)
        return EXIT_FAILURE
    address = config.admin.listen
    try:
        status = fetch(_LOOPBACK.get(address.host, address.host), address.port)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        why = getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__
        print(f'mpproxy: cannot get /status from {address}: {why} (is mpproxy running with '
              f'this config?)', file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(render(status))
    return EXIT_OK


def fetch(host: str, port: int, timeout: float = TIMEOUT) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request('GET', '/status')
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise ValueError(f'HTTP {response.status} {response.reason}')
    return json.loads(body)


def render(status: dict) -> str:
    master, config = status['master'], status['config']
    lines = [f"mpproxy {status['version']}, master pid {master['pid']}, up "
             f"{duration(master['uptime'])}, config {config['path']}"
             + (f" (generation {config['generation']}, loaded {_clock(config['loaded'])})"
                if config['loaded'] else '')]
    state = master.get('state', 'serving')          # absent from older masters' /status
    if state == 'grace':
        lines.append(f"stopping: shutdown_grace, draining in {master['grace_left']:g}s")
    elif state != 'serving':
        lines.append(f'stopping: {state}')
    generations = ', '.join(f"{g['number']} {g['state']} ({g['workers']} worker"
                            f"{'' if g['workers'] == 1 else 's'})" for g in status['generations'])
    lines.append(f'generations: {generations or "none"}')
    lines.append('')
    lines += table(('WORKER', 'PID', 'GEN', 'STATE', 'UPTIME', 'CONNECTIONS', 'SESSIONS'),
                   [(w['slot'], w['pid'], w['generation'], w['state'] + ('' if w['ready'] else
                                                                          ' (booting)'),
                     duration(w['uptime']), _n(w['connections']), _n(w['sessions']))
                    for w in status['workers']], 'rrrlrrr')
    lines.append('')
    rows = []
    for listener in status['listeners']:
        tcp = listener['protocol'] == 'tcp'
        rows.append((listener['name'], listener['protocol'], listener['listen'],
                     listener['accepted'] if tcp else listener['sessions_created'],
                     listener['active'] if tcp else listener['sessions_active'],
                     size(listener['received_bytes']), size(listener['sent_bytes'])))
    lines += table(('LISTENER', 'PROTO', 'LISTEN', 'TOTAL', 'ACTIVE', 'RECEIVED', 'SENT'), rows,
                   'lllrrrr')
    lines.append('')
    rows = [(upstream['name'], server['server'], server['state'],
             server.get('admin_state', 'ready'), server.get('weight', '-'),
             server['health_check'] or '-', server['active'], server['connect_errors'])
            for upstream in status['upstreams'] for server in upstream['servers']]
    lines += table(('UPSTREAM', 'SERVER', 'STATE', 'ADMIN', 'WEIGHT', 'CHECK', 'ACTIVE',
                    'ERRORS'), rows, 'lllllrrr')
    return '\n'.join(lines) + '\n'


def table(header: tuple, rows: list, align: str) -> list[str]:
    """Columns padded to their widest cell; `align` has one letter per column, l or r."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ['  '.join(c.rjust(w) if a == 'r' else c.ljust(w)
                      for c, w, a in zip(row, widths, align)).rstrip() for row in cells]


def duration(seconds: float) -> str:
    """`45s`, `5m02s`, `2h03m`, `3d04h`."""
    s = int(seconds)
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m{s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h{s % 3600 // 60:02d}m'
    return f'{s // 86400}d{s % 86400 // 3600:02d}h'


def size(n: int) -> str:
    """Bytes as `512 B`, `1.2 KiB`, `3.4 MiB`, ..."""
    value = float(n)
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if value < 1024 or unit == 'TiB':
            return f'{int(value)} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
        value /= 1024
    return str(n)


def _n(value) -> object:
    return '-' if value is None else value


def _clock(unix: float) -> str:
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(unix))
