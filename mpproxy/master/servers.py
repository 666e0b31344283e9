"""Run-time server control in the master: `mpproxy server drain|maint|ready|weight`.

HAProxy's `set server ... state` and `weight`, for every worker at once. The master
keeps the state of each (upstream, server) that a command changed, applies a change to
the shared block of every live generation (shared/servers.py; workers see it within
their poll, 0.5 s), and carries it across reloads while the server stays in the config
(and across USR2: MPPROXY_SERVER_STATE). A server is named as in the config
(`host:port`, its address as written).

The admin endpoint's writes (observe/admin.py authorizes them):

    PUT /servers/<upstream>/<server>   body: JSON {"state": "drain"|"maint"|"ready",
                                                   "grace": seconds (maint), "weight": n}
    -> 200 JSON of the server's state | 400 bad body | 404 unknown upstream or server
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import unquote

from mpproxy.config.schema import Config
from mpproxy.observe import log as logmod
from mpproxy.shared import servers as block
from mpproxy.shared.servers import MAINT, NAMES, READY, STATES

log = logmod.log

INHERIT_ENV = 'MPPROXY_SERVER_STATE'
MAX_WEIGHT = 10_000           # as the config's weight
MAX_GRACE = 86_400.0


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ServerControl:
    """The changed servers' states: (upstream, server) -> [state, weight, since, until]."""

    def __init__(self):
        self.states: dict[tuple[str, str], list] = {}

    # -- the blocks of generations ---------------------------------------------------------
    def allocate(self, config: Config) -> block.StateBlock:
        """A new generation's block, holding what was set for servers it has."""
        states = block.StateBlock(config)
        for name, upstream in config.upstreams.items():
            for i, server in enumerate(upstream.servers):
                record = self.states.get((name, str(server.address)))
                if record is not None:
                    states.write(name, i, *record)
        states.bump()
        return states

    def commit(self, config: Config) -> None:
        """The running config changed: forget servers it no longer has."""
        present = {(name, str(s.address)) for name, u in config.upstreams.items()
                   for s in u.servers}
        for key in [k for k in self.states if k not in present]:
            del self.states[key]

    # -- a command ------------------------------------------------------------------------
    def change(self, generations, config: Config, path: str, body: bytes) -> dict:
        """Apply a PUT to the active `config`'s server; its new state (RequestError)."""
        upstream, label = _target(config, path)
        try:
            request = json.loads(body or b'{}')
        except ValueError:
            raise RequestError(400, 'the body must be JSON') from None
        if not isinstance(request, dict) or not request or set(request) - {'state', 'weight',
                                                                            'grace'}:
            raise RequestError(400, 'the body must be an object with "state" ("drain", '
                                    '"maint", "ready"), "weight" and/or "grace"')
        server = next(s for s in config.upstreams[upstream].servers if str(s.address) == label)
        record = list(self.states.get((upstream, label), (READY, 0, 0.0, 0.0)))
        now = time.monotonic()
        if 'weight' in request:
            weight = request['weight']
            if isinstance(weight, bool) or not isinstance(weight, int) \
                    or not 1 <= weight <= MAX_WEIGHT:
                raise RequestError(400, f'weight must be an integer 1..{MAX_WEIGHT}')
            record[1] = weight
        grace = request.get('grace', 0)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) \
                or not 0 <= grace <= MAX_GRACE:
            raise RequestError(400, f'grace must be a number of seconds 0..{MAX_GRACE:g}')
        if 'state' in request:
            state = STATES.get(request['state']) if isinstance(request['state'], str) else None
            if state is None:
                raise RequestError(400, 'state must be "ready", "drain" or "maint"')
            if state == READY and record[0] != READY:
                record[2] = now                   # back in rotation: slow_start from now
            record[0] = state
            record[3] = now + grace if state == MAINT else 0.0
        elif 'grace' in request:
            raise RequestError(400, '"grace" goes with "state": "maint"')
        self.states[(upstream, label)] = record
        for generation in generations:
            states = generation.servers
            if states is None:
                continue
            servers = generation.config.upstreams.get(upstream)
            for i, s in enumerate(servers.servers if servers is not None else ()):
                if str(s.address) == label:
                    states.write(upstream, i, *record)
            states.bump()
        log.log(logmod.NOTICE, 'upstream %s: server %s set to %s%s%s', upstream, label,
                NAMES[record[0]], f', weight {record[1]}' if record[1] else '',
                f' (connections end in {grace:g}s)' if record[0] == MAINT else '')
        return self.describe(upstream, server)

    def describe(self, upstream: str, server) -> dict:
        label = str(server.address)
        state, weight, _, _ = self.states.get((upstream, label), (READY, 0, 0.0, 0.0))
        return {'upstream': upstream, 'server': label, 'state': NAMES[state],
                'weight': weight or server.weight, 'config_weight': server.weight}

    # -- USR2 -----------------------------------------------------------------------------
    def export(self) -> dict:
        value = [[u, s, state, weight] for (u, s), (state, weight, _, _) in self.states.items()]
        return {INHERIT_ENV: json.dumps(value)} if value else {}

    def adopt(self) -> None:
        """The states an upgrading master passed (maint graces are not carried: ended)."""
        value = os.environ.pop(INHERIT_ENV, None)
        try:
            entries = json.loads(value) if value else []
            for upstream, label, state, weight in entries:
                if state in NAMES and isinstance(weight, int):
                    self.states[(str(upstream), str(label))] = [state, weight, 0.0, 0.0]
        except (ValueError, TypeError):
            log.warning('binary upgrade: the server states passed are unreadable; ignored')


def _target(config: Config, path: str) -> tuple[str, str]:
    parts = path.split('/')
    if len(parts) != 4 or parts[1] != 'servers':
        raise RequestError(404, 'PUT /servers/<upstream>/<server>')
    upstream, label = unquote(parts[2]), unquote(parts[3])
    if upstream not in config.upstreams:
        raise RequestError(404, f'no upstream {upstream!r}')
    if not any(str(s.address) == label for s in config.upstreams[upstream].servers):
        raise RequestError(404, f'upstream {upstream} has no server {label!r}')
    return upstream, label


