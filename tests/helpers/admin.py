"""The admin endpoint's side of the tests of run-time server control (test_server_control,
test_top): a config with two-or-more tagged TCP servers and the admin endpoint (with a bearer
token file, or read-only), a server's record in /status, PUT with the token, and the tags of
the next connections (which server each reached)."""

from __future__ import annotations

import http.client
import json

from helpers.net import first_bytes, get

TOKEN = 'secret-token-for-tests'


def admin_config(port: int, admin: int, servers, tmp_path, workers: int = 2, token: bool = True,
                 name: str | None = None, **upstream) -> dict:
    """One TCP listener on `port` to upstream `pool` (round_robin unless `upstream` says),
    the admin endpoint on `admin`; with `token`, admin.token_file holds TOKEN (mode 0600)."""
    listener = {'listen': f'127.0.0.1:{port}', 'upstream': 'pool'}
    if name:
        listener['name'] = name
    cfg = {'workers': workers,
           'admin': {'listen': f'127.0.0.1:{admin}'},
           'upstreams': {'pool': {'balance': 'round_robin', **upstream, 'servers': servers}},
           'listeners': [listener]}
    if token:
        token_file = tmp_path / 'admin.token'
        token_file.write_text(TOKEN + '\n')
        token_file.chmod(0o600)
        cfg['admin']['token_file'] = str(token_file)
    return cfg


def tags(port: int, n: int) -> list[bytes]:
    """The first byte of `n` new connections to `port` (a tagged backend's tag)."""
    return [first_bytes(port, 1) for _ in range(n)]


def server_status(admin: int, label: str) -> dict:
    """Server `label`'s record in the admin endpoint's /status."""
    status = json.loads(get(admin, '/status')[2])
    return next(s for u in status['upstreams'] for s in u['servers'] if s['server'] == label)


def put(admin: int, path: str, body, token: str | None = TOKEN, raw: bytes | None = None):
    """(status, body) of a PUT of `body` as JSON (or `raw` bytes) with the bearer `token`."""
    conn = http.client.HTTPConnection('127.0.0.1', admin, timeout=5)
    headers = {'Authorization': f'Bearer {token}'} if token else {}
    try:
        conn.request('PUT', path, raw if raw is not None else json.dumps(body).encode(), headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
