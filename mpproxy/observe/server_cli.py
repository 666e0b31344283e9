"""`mpproxy server drain|maint|ready|weight ...`: change a server at run time.

Runs in its own process (the command line): one authorized PUT to the master's admin
endpoint (`admin.listen` of the config file, with the bearer token of `admin.token_file`),
then, with `--wait`, GETs of /status until the server's connections and sessions (over
every worker) are 0, and stay 0 for SETTLED seconds (a worker publishes its counts once a
second: a connection opened just before the command shows within that), or the timeout.

    mpproxy server drain  UPSTREAM SERVER [--wait] [--timeout 60]
    mpproxy server maint  UPSTREAM SERVER [--grace 10] [--wait] [--timeout 60]
    mpproxy server ready  UPSTREAM SERVER
    mpproxy server weight UPSTREAM SERVER N
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from urllib.parse import quote

from mpproxy.config.schema import Config
from mpproxy.errors import EXIT_FAILURE, EXIT_OK
from mpproxy.observe import admin, status_view

TIMEOUT = 5.0
WAIT_POLL = 0.25
SETTLED = 1.2             # workers publish their counts once a second: 0 must hold this long


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='mpproxy server',
                                     description='Change an upstream server at run time.')
    parser.add_argument('action', choices=('drain', 'maint', 'ready', 'weight'))
    parser.add_argument('upstream')
    parser.add_argument('server', help='as in the config: host:port')
    parser.add_argument('weight', nargs='?', type=int, help='weight: the new weight (1..10000)')
    parser.add_argument('--grace', type=float, default=0.0,
                        help='maint: seconds before open connections are ended (default 0)')
    parser.add_argument('--wait', action='store_true',
                        help='drain, maint: return once the server has no connection left')
    parser.add_argument('--timeout', type=float, default=60.0,
                        help='--wait: give up after this many seconds (exit 1)')
    return parser.parse_args(argv)


def main(config: Config, argv: list[str]) -> int:
    args = parse(argv)
    if config.admin is None:
        print(f'mpproxy: server needs the admin endpoint: set admin: {{listen: ..., token_file: '
              f'...}} in {config.path} and reload', file=sys.stderr)
        return EXIT_FAILURE
    if args.action == 'weight':
        if args.weight is None:
            print('mpproxy: server weight UPSTREAM SERVER N', file=sys.stderr)
            return EXIT_FAILURE
        body = {'weight': args.weight}
    else:
        body = {'state': args.action}
        if args.action == 'maint':
            body['grace'] = args.grace
    try:
        token = read_token(config)
    except OSError as exc:
        print(f'mpproxy: cannot read {config.admin.token_file}: {exc.strerror}', file=sys.stderr)
        return EXIT_FAILURE
    address = config.admin.listen
    host = status_view._LOOPBACK.get(address.host, address.host)
    try:
        status, text = put_server(host, address.port, args.upstream, args.server, body, token,
                                  unix=unix_socket(config))
    except (OSError, http.client.HTTPException) as exc:
        print(f'mpproxy: cannot reach the admin endpoint {address}: '
              f'{getattr(exc, "strerror", None) or exc}', file=sys.stderr)
        return EXIT_FAILURE
    if status != 200:
        print(f'mpproxy: {status}: {text.strip()}', file=sys.stderr)
        return EXIT_FAILURE
    state = json.loads(text)
    print(f"upstream {state['upstream']}: server {state['server']}: {state['state']}, "
          f"weight {state['weight']}")
    if args.wait and args.action in ('drain', 'maint'):
        return _wait(host, address.port, args.upstream, args.server, args.timeout)
    return EXIT_OK


def read_token(config: Config) -> bytes:
    """The bearer token of `admin.token_file` (b'' when none is set; OSError)."""
    return admin.read_token(config.admin.token_file) if config.admin.token_file else b''


def unix_socket(config: Config) -> str | None:
    """admin.socket when we may write to it (its file mode says we may change servers)."""
    path = config.admin.socket
    return path if path is not None and os.access(path, os.W_OK) else None


def put_server(host: str, port: int, upstream: str, server: str, body: dict, token: bytes,
               timeout: float = TIMEOUT, unix: str | None = None) -> tuple[int, str]:
    """PUT /servers/<upstream>/<server> with `body`: (HTTP status, response text)
    (OSError, http.client.HTTPException); over the Unix socket `unix` (admin.socket) when
    given. `mpproxy top` changes servers through this too."""
    path = f'/servers/{quote(upstream, safe="")}/{quote(server, safe="")}'
    return _put(host, port, path, json.dumps(body).encode(), token, timeout, unix)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__('localhost', timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _put(host: str, port: int, path: str, body: bytes, token: bytes,
         timeout: float = TIMEOUT, unix: str | None = None) -> tuple[int, str]:
    conn = _UnixConnection(unix, timeout) if unix else \
        http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {'Content-Type': 'application/json'}
    if token:
        headers['Authorization'] = 'Bearer ' + token.decode('latin-1')
    try:
        conn.request('PUT', path, body, headers)
        response = conn.getresponse()
        return response.status, response.read().decode('utf-8', 'replace')
    finally:
        conn.close()


def _wait(host: str, port: int, upstream: str, server: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    left = None
    zero_since = None
    while True:
        try:
            status = status_view.fetch(host, port)
            left = next((s['active'] for u in status['upstreams'] if u['name'] == upstream
                         for s in u['servers'] if s['server'] == server), 0)
        except (OSError, ValueError, http.client.HTTPException):
            pass
        now = time.monotonic()
        zero_since = (zero_since or now) if left == 0 else None
        if zero_since is not None and now - zero_since >= SETTLED:
            print(f'upstream {upstream}: server {server}: no connection left')
            return EXIT_OK
        if time.monotonic() >= deadline:
            print(f'mpproxy: server {server} still has {left} connection(s) after '
                  f'{timeout:g}s', file=sys.stderr)
            return EXIT_FAILURE
        time.sleep(WAIT_POLL)     # polling the master's page, bounded by the deadline
