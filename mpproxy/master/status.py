"""The master's side of metrics: retired totals, the admin endpoint, /metrics and /status,
and the probes /healthz (every worker slot has a live worker with a recent heartbeat) and
/readyz (serving and not stopping: 503 from QUIT on, so a load balancer stops sending first;
with `shutdown_grace` the listeners go on accepting that long after it, see table.py).

The arbiter owns one `Observer`; it reads the worker table, never the arbiter. It reads
the workers' snapshot areas (observe/metrics.py) only when a page is asked for, and once
more when a worker is reaped (`retire`: its counters join the retired totals, its area is unmapped).

`admin.listen` follows the reload transaction like a listener: an unchanged address
keeps its socket, a new one is bound before the new generation is committed (a bind
failure fails the reload and changes nothing), a removed one is closed at commit.
On a binary upgrade the socket is passed to the new master. TERM closes it; QUIT keeps it
open while the workers drain (the probes answer), unless a new master took it over.
"""

from __future__ import annotations

import json
import os
import time

from mpproxy import __version__
from mpproxy.config.schema import Config
from mpproxy.errors import StartupError
from mpproxy.master.servers import RequestError
from mpproxy.master.workers import ACTIVE, WorkerHandle
from mpproxy.observe import admin, prometheus
from mpproxy.observe import log as logmod
from mpproxy.observe.metrics import used_upstreams
from mpproxy.upstream import health

log = logmod.log

BEAT_STALE = 3.0          # seconds without a heartbeat (one a second) that make /healthz fail


class Observer:
    def __init__(self, selector, table, config_path: str, servers=None):
        self.table = table
        self.servers = servers            # master/servers.ServerControl
        self.config_path = config_path
        self.totals = prometheus.Totals()
        self.started = time.time()
        self.started_monotonic = time.monotonic()
        self.unix = None                  # admin.socket's server: writes by file permission
        self.unix_path: str | None = None
        self.selector = selector
        self.admin = admin.AdminServer(selector, {'/metrics': self.metrics_page,
                                                          '/status': self.status_page,
                                                          '/healthz': self.healthz_page,
                                                          '/readyz': self.readyz_page}, log,
                                       writer=self.write_request)

    # -- the admin listener (arbiter: start, reload, upgrade, stop) ------------------------
    def start(self, config: Config) -> None:
        """Listen on `admin.listen` (the socket an upgrading master passed, or a new one)."""
        address = config.admin.listen if config.admin else None
        sock = admin.AdminServer.adopt(address)
        self.admin.serve(address, sock or self._bind(config))
        self._token(config)
        self._unix(config)

    def _unix(self, config: Config) -> None:
        """Serve admin.socket (bound anew when its path changed; a bind error is logged and
        leaves it off: the TCP endpoint goes on)."""
        path = config.admin.socket if config.admin else None
        if path == self.unix_path:
            return
        if self.unix is not None:
            self.unix.close()
            self.unix = None
        self.unix_path = None
        if path is None:
            return
        try:
            sock = admin.bind_unix(path)
        except OSError as exc:
            log.error('cannot bind admin socket %s: %s; server control only over TCP', path,
                      exc.strerror or exc)
            return
        self.unix = admin.AdminServer(self.selector, self.admin.routes, log,
                                      writer=self.write_request)
        self.unix.trusted = True
        self.unix.serve(path, sock)
        self.unix_path = path

    def _token(self, config: Config) -> None:
        """The bearer token writes need, from `admin.token_file` (unreadable or empty: none,
        logged: the endpoint is read-only)."""
        path = config.admin.token_file if config.admin else None
        token = None
        if path:
            try:
                token = admin.read_token(path) or None
                if token is None:
                    log.error('admin token_file %s is empty; the admin endpoint is read-only', path)
            except OSError as exc:
                log.error('cannot read admin token_file %s: %s; the admin endpoint is read-only',
                          path, exc.strerror or exc)
        self.admin.token = token

    def write_request(self, method: str, path: str, body: bytes):
        """PUT /servers/<upstream>/<server> (master/servers.py), authorized by admin.py."""
        active = self.table.active()
        if active is None or self.servers is None:
            return 503, 'text/plain', b'no active generation\n'
        try:
            result = self.servers.change(self.table.generations, active.config, path, body)
        except RequestError as exc:
            return exc.status, 'text/plain', f'{exc}\n'.encode()
        return 200, 'application/json', (json.dumps(result) + '\n').encode()

    def prepare(self, config: Config):
        """The admin socket `config` needs, bound now if its address changed (StartupError)."""
        address = config.admin.listen if config.admin else None
        if address == self.admin.address:
            return address, self.admin.sock
        return address, self._bind(config)

    def commit(self, prepared, config: Config | None = None) -> None:
        self.admin.serve(*prepared)
        if config is not None:
            self._token(config)
            self._unix(config)

    def discard(self, prepared) -> None:
        """A prepared admin socket that will not be served (its reload failed): closed,
        unless it is the one being served."""
        if prepared is not None and prepared[1] is not None and prepared[1] is not self.admin.sock:
            prepared[1].close()

    def _bind(self, config: Config):
        if config.admin is None:
            return None
        try:
            return admin.bind(config.admin.listen)
        except OSError as exc:
            raise StartupError(f'cannot bind admin {config.admin.listen}: '
                               f'{exc.strerror or exc}') from None

    def tick(self) -> None:
        self.admin.tick()
        if self.unix is not None:
            self.unix.tick()

    def close(self) -> None:
        self.admin.close()
        if self.unix is not None:
            self.unix.close()
            self.unix = None

    # -- workers ---------------------------------------------------------------------------
    def retire(self, worker: WorkerHandle) -> None:
        """`worker` was reaped: add what it last published to the retired totals."""
        area, worker.metrics = worker.metrics, None
        if area is None:
            return
        try:
            values = area.read()
            if values is not None:
                self.totals.retire(worker.generation.layout, values, worker.slot)
        finally:
            area.close()

    def _live(self) -> list[tuple[WorkerHandle, object]]:
        """(worker, its snapshot) for every live worker that published, oldest generation first."""
        out = []
        for generation in self.table.generations:
            for slot in sorted(generation.workers):
                worker = generation.workers[slot]
                values = worker.metrics.read() if worker.metrics is not None else None
                if values is not None:
                    out.append((worker, values))
        return out

    def _samples(self, live) -> dict:
        return self.totals.collect((w.generation.layout, values, w.slot) for w, values in live)

    def _active(self):
        generations = self.table.generations
        return next((g for g in reversed(generations) if g.state == ACTIVE),
                    generations[-1] if generations else None)

    # -- pages -----------------------------------------------------------------------------
    def metrics_page(self):
        samples = self._samples(self._live())
        samples['mpproxy_info'] = {(('version', __version__),): 1}
        samples['mpproxy_start_time_seconds'] = {(): self.started}
        workers: dict = {}
        for generation in self.table.generations:
            key = (('state', generation.state),)
            workers[key] = workers.get(key, 0) + len(generation.workers)
        samples['mpproxy_workers'] = workers
        active = self._active()
        if active is not None:
            samples['mpproxy_generation'] = {(): active.number}
            samples['mpproxy_config_load_time_seconds'] = {(): _wall(active.loaded_at)}
            samples['mpproxy_upstream_server_check_up'] = {
                (('upstream', u), ('server', s)): 1 - down
                for u, s, down in _checks(active)}
            if self.servers is not None:
                states, weights = {}, {}
                for name in used_upstreams(active.config):
                    for server in active.config.upstreams[name].servers:
                        now = self.servers.describe(name, server)
                        base = (('upstream', name), ('server', now['server']))
                        for state in ('ready', 'drain', 'maint'):
                            states[base + (('state', state),)] = int(now['state'] == state)
                        weights[base] = now['weight']
                samples['mpproxy_upstream_server_admin_state'] = states
                samples['mpproxy_upstream_server_weight'] = weights
        return 200, prometheus.CONTENT_TYPE, prometheus.render(samples).encode()

    # -- probes (orchestrators, load balancers) ---------------------------------------------
    def healthz_page(self):
        """Liveness: 200 while every worker slot has a live worker whose heartbeat is recent."""
        problem = self.unhealthy()
        return (503, 'text/plain', f'unhealthy: {problem}\n'.encode()) if problem \
            else (200, 'text/plain', b'ok\n')

    def readyz_page(self):
        """Readiness: 200 while the listeners are bound and served; 503 from QUIT on (also
        during its shutdown_grace, while they still accept)."""
        problem = self.unready()
        return (503, 'text/plain', f'not ready: {problem}\n'.encode()) if problem \
            else (200, 'text/plain', b'ready\n')

    def unhealthy(self) -> str | None:
        now = time.monotonic()
        table = self.table
        stale = [w for w in table.live_workers() if now - w.last_beat > BEAT_STALE]
        if stale:
            w = stale[0]
            return (f'worker {w.slot} (pid {w.pid}) gave no heartbeat for '
                    f'{now - w.last_beat:.1f}s')
        if table.stopping:
            return None           # draining: the slots empty one by one, as they should
        active = table.active()
        if active is None:
            return 'no active generation'
        missing = [slot for slot in range(active.config.workers)
                   if slot not in active.workers or not active.workers[slot].ready]
        if missing:
            return f'no serving worker in slot {missing[0]}'
        return None

    def unready(self) -> str | None:
        table = self.table
        if table.stopping:
            return 'draining' if table.stopping == 'quit' else 'stopping'
        left = table.grace_left()
        if left is not None:
            return f'stopping (shutdown_grace), draining in {left:.1f}s'
        active = table.active()
        if active is None or not any(w.ready for w in active.workers.values()):
            return 'no serving worker'
        return None

    def status_page(self):
        return 200, 'application/json', (json.dumps(self.status(), indent=1) + '\n').encode()

    def status(self) -> dict:
        """What `mpproxy status` shows: the master, generations, workers, listeners, upstreams."""
        now = time.monotonic()
        live = self._live()
        samples = self._samples(live)
        snapshots = {id(w): values for w, values in live}
        table, active = self.table, self._active()
        grace = table.grace_left()
        workers = []
        for generation in table.generations:
            for slot in sorted(generation.workers):
                worker = generation.workers[slot]
                values = snapshots.get(id(worker))
                layout = generation.layout
                workers.append({
                    'slot': slot, 'pid': worker.pid, 'generation': generation.number,
                    'state': generation.state, 'ready': worker.ready,
                    'uptime': round(now - worker.started, 3),
                    'connections': None if values is None else
                    sum(values[i] for i in layout.connections),
                    'sessions': None if values is None else sum(values[i] for i in layout.sessions),
                    **usage(worker.pid),
                })
        return {
            'version': __version__,
            'master': {'pid': os.getpid(), 'started': round(self.started, 3),
                       'uptime': round(now - self.started_monotonic, 3),
                       'state': _master_state(table), 'grace_left': None if grace is None
                       else round(grace, 1)},
            'config': {'path': self.config_path,
                       'loaded': None if active is None else round(_wall(active.loaded_at), 3),
                       'generation': None if active is None else active.number},
            'generations': [{'number': g.number, 'state': g.state, 'workers': len(g.workers),
                             'loaded': round(_wall(g.loaded_at), 3)}
                            for g in table.generations],
            'workers': workers,
            'listeners': _listeners(active, samples),
            'upstreams': _upstreams(active, samples, self.servers),
        }


def _master_state(table) -> str:
    """serving, grace (QUIT's shutdown_grace), draining (after QUIT) or stopping (TERM)."""
    if table.stopping:
        return 'draining' if table.stopping == 'quit' else 'stopping'
    return 'serving' if table.grace_until is None else 'grace'


_TICK = os.sysconf('SC_CLK_TCK')
_PAGE = os.sysconf('SC_PAGE_SIZE')


def usage(pid: int) -> dict:
    """A process's CPU time (user + system, seconds) and resident memory (bytes), from
    /proc/<pid>/stat and statm: two small reads, no syscall that can block; None when gone."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
        with open(f'/proc/{pid}/statm', 'rb') as f:
            resident = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return {'cpu_seconds': None, 'rss_bytes': None}
    return {'cpu_seconds': round((int(fields[11]) + int(fields[12])) / _TICK, 2),
            'rss_bytes': resident * _PAGE}


def _wall(monotonic: float) -> float:
    """A time.monotonic() value as Unix time."""
    return time.time() - (time.monotonic() - monotonic)


def _checks(generation):
    """(upstream, server, 1 if down) for every health-checked server of `generation`."""
    if generation.health is None:
        return
    offsets, _ = health.layout(generation.config)
    for name, offset in offsets.items():
        for i, server in enumerate(generation.config.upstreams[name].servers):
            yield name, str(server.address), generation.health[offset + i]


_TCP = {'accepted': 'mpproxy_tcp_connections_accepted_total',
        'active': 'mpproxy_tcp_connections_active',
        'failed': 'mpproxy_tcp_connections_failed_total',
        'received_bytes': 'mpproxy_tcp_received_bytes_total',
        'sent_bytes': 'mpproxy_tcp_sent_bytes_total'}
_UDP = {'sessions_created': 'mpproxy_udp_sessions_created_total',
        'sessions_active': 'mpproxy_udp_sessions_active',
        'datagrams_received': 'mpproxy_udp_datagrams_received_total',
        'datagrams_sent': 'mpproxy_udp_datagrams_sent_total',
        'datagrams_dropped': 'mpproxy_udp_datagrams_dropped_total',
        'received_bytes': 'mpproxy_udp_received_bytes_total',
        'sent_bytes': 'mpproxy_udp_sent_bytes_total'}


def _listeners(generation, samples) -> list[dict]:
    """The active generation's listeners with their totals over every worker (retired ones
    included)."""
    if generation is None:
        return []
    sums = {field: prometheus.sum_by(samples, name, 'listener')
            for field, name in (*_TCP.items(), *(('udp_' + f, n) for f, n in _UDP.items()))}
    out = []
    for listener in generation.config.listeners:
        key = (listener.name,)
        fields = _TCP if listener.protocol == 'tcp' else {'udp_' + f: n for f, n in _UDP.items()}
        entry = {'name': listener.name, 'protocol': listener.protocol,
                 'listen': str(listener.listen), 'upstream': listener.upstream}
        for field in fields:
            entry[field.removeprefix('udp_')] = sums[field].get(key, 0)
        out.append(entry)
    return out


def _upstreams(generation, samples, control=None) -> list[dict]:
    """The servers of the active generation's upstreams and their state in its workers."""
    if generation is None:
        return []
    checks = {(u, s): down for u, s, down in _checks(generation)}
    up = samples.get('mpproxy_upstream_server_up', {})
    slots = {str(slot) for slot in generation.workers}
    active = prometheus.sum_by(samples, 'mpproxy_upstream_server_active', 'upstream', 'server')
    errors = prometheus.sum_by(samples, 'mpproxy_upstream_connect_errors_total',
                               'upstream', 'server')
    connects = _connects(samples)
    out = []
    for name in used_upstreams(generation.config):
        servers = []
        for server in generation.config.upstreams[name].servers:
            label = str(server.address)
            base = (('upstream', name), ('server', label))
            seen = {slot: up.get(base + (('worker', slot),)) for slot in slots}
            down_in = sorted((int(s) for s, v in seen.items() if v == 0))
            check = checks.get((name, label))
            reporting = [v for v in seen.values() if v is not None]
            if check or (reporting and not any(reporting)):
                state = 'down'
            elif down_in:
                state = 'partial'
            else:
                state = 'up'
            admin_state = control.describe(name, server) if control is not None else {}
            servers.append({'server': label, 'state': state,
                            'admin_state': admin_state.get('state', 'ready'),
                            'weight': admin_state.get('weight', server.weight),
                            'config_weight': server.weight,
                            'health_check': None if check is None else ('down' if check else 'up'),
                            'down_in_workers': down_in,
                            'active': active.get((name, label), 0),
                            'connect_errors': errors.get((name, label), 0),
                            'connects': connects.get((name, label), 0)})
        out.append({'name': name, 'balance': generation.config.upstreams[name].balance,
                    'servers': servers})
    return out


def _connects(samples) -> dict:
    """Successful TCP connects per (upstream, server), over every worker there has been: the
    count of the connect-duration histogram."""
    out: dict = {}
    for labels, value in samples.get('mpproxy_upstream_connect_duration_seconds', {}).items():
        found = dict(labels)
        key = (found.get('upstream'), found.get('server'))
        out[key] = out.get(key, 0) + sum(value[:-1])
    return out
