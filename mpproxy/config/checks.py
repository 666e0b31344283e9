"""The schema walk: which keys each part of the config file may hold, and their checks.

`build(walker, root)` turns the YAML tree into a Config. Problems go to the
walker (see loader.py), never raised, so one run reports all of them; the
Config built alongside is only used when there were none.
"""

from __future__ import annotations

import ipaddress
import os
from functools import partial
from typing import TYPE_CHECKING

from mpproxy.config import accounts
from mpproxy.config.schema import (AccessLog, Admin, Config, HealthCheck, Keepalive, Listener,
                                   ProxyProtocol, Resolve, Server, UdpOptions, Upstream)
from mpproxy.config.values import describe, format_duration, parse_address, parse_duration

if TYPE_CHECKING:
    from mpproxy.config.loader import Section, Walker

# The keys of each section, in DESIGN.md's order (dump.py writes them in this order too).
TOP_KEYS = ('workers', 'pid_file', 'user', 'group', 'worker_rlimit_nofile', 'shutdown_grace',
            'shutdown_timeout', 'max_draining_generations', 'worker_timeout', 'resolver',
            'error_log', 'log_level', 'access_log', 'admin', 'watch_config', 'upstreams',
            'listeners')
UPSTREAM_KEYS = ('balance', 'hash_key', 'servers', 'health_check', 'resolve', 'slow_start')
SERVER_KEYS = ('address', 'weight', 'max_fails', 'fail_timeout', 'max_conns', 'backup',
               'slow_start')
ADMIN_KEYS = ('listen', 'token_file', 'socket')
HEALTH_CHECK_KEYS = ('type', 'interval', 'timeout', 'rise', 'fall', 'send', 'expect')
RESOLVE_KEYS = ('min', 'max')
RESOLVE_BOUNDS = (5.0, 300.0)       # `resolve: {}`: the TTL, within [5s, 5m]
LISTENER_KEYS = ('name', 'listen', 'protocol', 'upstream', 'backlog', 'reuseport', 'ipv6only',
                 'keepalive', 'connect_timeout', 'idle_timeout', 'half_close_timeout', 'half_close',
                 'next_upstream_tries', 'sni_routes', 'proxy_protocol', 'allow', 'deny',
                 'max_connections', 'max_connections_per_ip', 'upload_rate', 'download_rate', 'udp')
KEEPALIVE_KEYS = ('idle', 'interval', 'count')
PROXY_PROTOCOL_KEYS = ('accept', 'trusted', 'send')
UDP_KEYS = ('responses', 'max_sessions', 'max_sessions_per_ip')
LOG_LEVELS = ('debug', 'info', 'notice', 'warn', 'error', 'crit')


# -- value checks: YAML value -> parsed value, or ValueError with the message ---

def integer(low: int, high: int):
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'must be an integer, got {describe(value)}')
        if value < low:
            raise ValueError(f'must be an integer >= {low}')
        if value > high:
            raise ValueError(f'must be an integer <= {high}')
        return value
    return parse


def duration(*, zero_ok: bool = False, at_most: float | None = None):
    def parse(value):
        seconds = parse_duration(value)
        if seconds == 0 and not zero_ok:
            raise ValueError('must be greater than 0')
        if at_most is not None and seconds > at_most:
            raise ValueError(f'must be at most {format_duration(at_most)}')
        return seconds
    return parse


def choice(*options: str):
    def parse(value):
        if value not in options or not isinstance(value, str):
            raise ValueError(f'must be one of {", ".join(options)}, got {describe(value)}')
        return value
    return parse


def optional(parse):
    return lambda value: None if value is None else parse(value)


def boolean(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'must be true or false, got {describe(value)}')
    return value


def text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'must be a non-empty string, got {describe(value)}')
    return value


def account(value) -> str:
    """A user or group: a name, or a numeric id (kept as text)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(integer(0, accounts.MAX_ID)(value))
    return text(value).strip()


def cidr(value) -> str:
    try:
        return str(ipaddress.ip_network(text(value).strip(), strict=False))
    except ValueError:
        raise ValueError(f'must be a CIDR like 10.0.0.0/8 or fd00::/8, got {describe(value)}') from None


def workers(value) -> int:
    if value == 'auto':
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'must be auto or an integer, got {describe(value)}')
    return integer(1, 1024)(value)


def resolver_address(value):
    address = parse_address(value)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError('must be an IP address and port, like 1.1.1.1:53') from None
    return address


POSITIVE = duration()
NON_NEGATIVE = duration(zero_ok=True)
KEEPALIVE_TIME = optional(duration(at_most=32767))      # the kernel's limit for TCP_KEEPIDLE/INTVL
COUNT = integer(0, 10_000_000)
RATE = integer(0, 10**12)                               # bytes/s


# -- sections ---------------------------------------------------------------

def build(walker: Walker, root) -> Config:
    """The Config for `root`, the top-level mapping; problems go to `walker`."""
    top = walker.section(root, 1, '', '', TOP_KEYS)
    declared = _upstreams(top)
    listeners, inline = _listeners(top, declared)
    user, group = _accounts(top)
    return Config(
        path=walker.file,
        workers=top.get('workers', workers, os.cpu_count() or 1),
        pid_file=top.get('pid_file', optional(text)),
        user=user,
        group=group,
        worker_rlimit_nofile=top.get('worker_rlimit_nofile', optional(integer(1, 2**30))),
        shutdown_grace=top.get('shutdown_grace', NON_NEGATIVE, 0.0),
        shutdown_timeout=top.get('shutdown_timeout', NON_NEGATIVE, 30.0),
        max_draining_generations=top.get('max_draining_generations', integer(1, 1000), 4),
        worker_timeout=top.get('worker_timeout', POSITIVE, 30.0),
        resolver=top.get_list('resolver', resolver_address),
        error_log=top.get('error_log', text, 'stderr'),
        log_level=top.get('log_level', choice(*LOG_LEVELS), 'info'),
        access_log=_optional_section(top, 'access_log', ('path', 'format'), _access_log),
        admin=_optional_section(top, 'admin', ADMIN_KEYS, _admin),
        watch_config=top.get('watch_config', boolean, False),
        upstreams={name: up for name, up in declared.items() if up} | inline,
        listeners=listeners)


def _accounts(top: Section) -> tuple[str | None, str | None]:
    """`user` and `group`, checked to exist here; the switch itself happens in the workers."""
    user = top.get('user', optional(account))
    group = top.get('group', optional(account))
    if user is None:
        if group is not None and top.value('user') is None:
            top.report('group', 'needs user (the workers switch user and group together)')
        return user, group
    try:
        accounts.find_user(user)
    except ValueError as exc:
        top.report('user', str(exc))
        return user, group
    try:
        accounts.resolve(user, group)
    except ValueError as exc:
        top.report('group' if group is not None else 'user', str(exc))
    return user, group


def _optional_section(parent: Section, key: str, keys, build_section):
    """build_section(sub-section) for a mapping under `key`; None when absent or null."""
    if parent.value(key) is None:
        return None
    section = parent.section(key, keys)
    value = build_section(section) if section else None
    if value is not None:
        parent.check_supported(key, value)
    return value


def _access_log(s: Section) -> AccessLog | None:
    path = s.get('path', text, required=True)
    log_format = s.get('format', choice('json', 'text'), 'json')
    return AccessLog(path, log_format) if path else None


def _admin(s: Section) -> Admin | None:
    listen = s.get('listen', partial(parse_address, listen=True), required=True)
    token_file = s.get('token_file', optional(text))
    path = s.get('socket', optional(text))
    if path is not None and not os.path.isabs(path):
        s.report('socket', f'must be an absolute path, got {path!r}')
    return Admin(listen, token_file, path) if listen else None


def _upstreams(top: Section) -> dict[str, Upstream | None]:
    """The declared upstreams by name; a broken one maps to None (its name still exists)."""
    section = top.section('upstreams') if 'upstreams' in top else None
    result = {}
    for name in section.keys() if section else ():
        if not isinstance(name, str) or not name.strip():
            section.report(name, f'an upstream name must be a non-empty string, got {describe(name)}')
            continue
        s = section.section(name, UPSTREAM_KEYS, 'upstream')
        result[name] = _upstream(s, name) if s else None
    return result


def _upstream(s: Section, name: str) -> Upstream:
    resolve = _resolve(s)
    if s.value('servers', []) == []:
        servers = ()
        if resolve is None:
            s.report('servers', 'an upstream needs at least one server (or resolve)')
    else:
        servers = _servers(s, 'servers')
    return Upstream(
        name=name,
        servers=servers,
        balance=s.get('balance', choice('round_robin', 'least_conn', 'hash', 'random_two'),
                      'round_robin'),
        hash_key=s.get('hash_key', choice('client_ip', 'client_addr'), 'client_ip'),
        health_check=_optional_section(s, 'health_check', HEALTH_CHECK_KEYS, _health_check),
        resolve=resolve,
        slow_start=s.get('slow_start', duration(zero_ok=True), 0.0))


def _resolve(s: Section) -> Resolve | None:
    """`resolve`: a duration (a fixed interval) or {min, max} (the answer's TTL, bounded)."""
    value = s.value('resolve')
    if value is None:
        return None
    if not isinstance(value, dict):
        seconds = s.get('resolve', _resolve_interval)
        return Resolve(seconds, seconds) if seconds else None
    r = s.section('resolve', RESOLVE_KEYS)
    if r is None:
        return None
    low = r.get('min', POSITIVE, RESOLVE_BOUNDS[0])
    high = r.get('max', POSITIVE, RESOLVE_BOUNDS[1])
    if high < low:
        if 'max' in r:
            r.report('max', f'must not be less than min ({format_duration(low)})')
        else:
            r.report('min', f'must not be more than max ({format_duration(high)}, the default)')
    return Resolve(low, high)


def _resolve_interval(value) -> float:
    try:
        return POSITIVE(value)
    except ValueError as exc:
        if not str(exc).startswith('must be a duration'):
            raise
        raise ValueError(f'must be a duration like 30s or a mapping like {{min: 5s, max: 5m}}, '
                         f'got {describe(value)}') from None


def _health_check(s: Section) -> HealthCheck:
    return HealthCheck(
        type=s.get('type', choice('tcp', 'udp'), 'tcp'),
        interval=s.get('interval', POSITIVE, 2.0),
        timeout=s.get('timeout', POSITIVE, 1.0),
        rise=s.get('rise', integer(1, 1000), 2),
        fall=s.get('fall', integer(1, 1000), 3),
        send=s.get('send', optional(text)),
        expect=s.get('expect', optional(text)))


def _servers(parent: Section, key: str) -> tuple[Server, ...]:
    """The servers listed under `key`: each `host:port` or a mapping with `address`."""
    servers = []
    for value, line, path in parent.items(key) or ():
        if isinstance(value, dict):
            s = parent.walker.section(value, line, path, 'server', SERVER_KEYS)
            server = _server(s) if s else None
        else:
            try:
                server = Server(parse_address(value))
            except ValueError as exc:
                parent.walker.report(line, path, str(exc))
                server = None
        if server:
            servers.append(server)
    return tuple(servers)


def _server(s: Section) -> Server | None:
    address = s.get('address', parse_address, required=True)
    server = Server(
        address=address,
        weight=s.get('weight', integer(1, 10_000), 1),
        max_fails=s.get('max_fails', integer(0, 1000), 1),
        fail_timeout=s.get('fail_timeout', POSITIVE, 10.0),
        max_conns=s.get('max_conns', COUNT, 0),
        backup=s.get('backup', boolean, False),
        slow_start=s.get('slow_start', optional(duration(zero_ok=True))))
    return server if address else None


def _listeners(top: Section, declared: dict) -> tuple[tuple[Listener, ...], dict[str, Upstream]]:
    """The listeners, and the upstreams made from their inline server lists."""
    if 'listeners' not in top:
        top.report('listeners', 'missing (at least one listener is needed)')
        return (), {}
    items = top.items('listeners')
    if items == []:
        top.report('listeners', 'at least one listener is needed')
    listeners, inline, seen = [], {}, {}
    for value, line, path in items or ():
        s = top.walker.section(value, line, path, 'listener', LISTENER_KEYS)
        listener = _listener(s, declared, inline) if s else None
        if listener is None:
            continue
        if listener.key in seen:
            s.report('listen', f'duplicate listener (same protocol and address as {seen[listener.key]})')
        seen.setdefault(listener.key, path)
        listeners.append(listener)
    return tuple(listeners), inline


# Listener keys a udp listener rejects, with what to use instead.
TCP_ONLY = {
    'max_connections': ' (a udp listener has udp.max_sessions, per worker)',
    'max_connections_per_ip': ' (a udp listener has udp.max_sessions_per_ip)',
    'upload_rate': '',
    'download_rate': '',
}


def _listener(s: Section, declared: dict, inline: dict) -> Listener | None:
    listen = s.get('listen', partial(parse_address, listen=True), required=True)
    protocol = s.get('protocol', choice('tcp', 'udp'), 'tcp')
    name = s.get('name', optional(text)) or (str(listen) if listen else s.path)
    upstream = _listener_upstream(s, name if protocol == 'tcp' else f'{name}/udp', declared, inline)
    reuseport = s.get('reuseport', boolean, False)
    if reuseport and protocol == 'udp':
        s.report('reuseport', 'udp listeners always use one SO_REUSEPORT socket per worker')
    half_close = s.get('half_close', boolean, True)
    if protocol == 'udp' and not half_close:
        s.report('half_close', 'applies to tcp listeners only')
    if protocol == 'udp':
        for key, instead in TCP_ONLY.items():
            if s.value(key) not in (None, 0):     # -T writes the 0 defaults of every listener
                s.report(key, f'applies to tcp listeners only{instead}')
    listener = Listener(
        name=name, listen=listen, protocol=protocol, upstream=upstream,
        backlog=s.get('backlog', integer(1, 65535), 511),
        reuseport=reuseport,
        ipv6only=s.get('ipv6only', boolean, True),
        keepalive=_keepalive(s),
        connect_timeout=s.get('connect_timeout', POSITIVE, 5.0),
        idle_timeout=s.get('idle_timeout', POSITIVE, 30.0 if protocol == 'udp' else 600.0),
        half_close_timeout=s.get('half_close_timeout', NON_NEGATIVE, 60.0),
        half_close=half_close,
        next_upstream_tries=s.get('next_upstream_tries', integer(1, 100), 3),
        sni_routes=_optional_section(s, 'sni_routes', None, partial(_sni_routes, declared=declared)),
        proxy_protocol=_proxy_protocol(s, protocol),
        allow=s.get_list('allow', cidr),
        deny=s.get_list('deny', cidr),
        max_connections=s.get('max_connections', COUNT, 0),
        max_connections_per_ip=s.get('max_connections_per_ip', COUNT, 0),
        upload_rate=s.get('upload_rate', RATE, 0),
        download_rate=s.get('download_rate', RATE, 0),
        udp=_udp(s))
    return listener if listen and upstream else None


def _listener_upstream(s: Section, name: str, declared: dict, inline: dict) -> str | None:
    """The upstream's name; an inline server list becomes an upstream named after the listener
    (`<name>/udp` for a udp listener, so `listen: 53` over tcp and udp need no names)."""
    value = s.value('upstream')
    if 'upstream' not in s:
        routes = s.value('sni_routes')
        if isinstance(routes, dict) and routes:      # routed by SNI: no upstream of its own
            first = routes.get('default', next(iter(routes.values())))
            return first if isinstance(first, str) and first in declared else None
        s.report('upstream', 'missing (the name of an upstream or a list of servers)')
    elif isinstance(value, str):
        if value in declared:
            return value
        s.report('upstream', f'unknown upstream {value!r}')
    elif not isinstance(value, list):
        s.report('upstream', f'must be the name of an upstream or a list of servers, got {describe(value)}')
    elif not value:
        s.report('upstream', 'an upstream needs at least one server')
    elif name in declared:
        s.report('upstream', f'an inline server list is named after its listener, and {name!r} '
                             'is already an upstream: give the listener another name')
    else:
        servers = _servers(s, 'upstream')
        if name in inline and inline[name].servers != servers:
            s.report('upstream', f'another listener named {name!r} has a different inline '
                                 'server list: give the listeners different names')
            return None
        inline[name] = Upstream(name, servers)
        return name
    return None


def _keepalive(s: Section) -> Keepalive | None:
    value = s.value('keepalive', False)
    if isinstance(value, bool):
        return Keepalive() if value else None
    if not isinstance(value, dict):
        s.report('keepalive', f'must be false, true or a mapping {{idle, interval, count}}, '
                              f'got {describe(value)}')
        return None
    k = s.section('keepalive', KEEPALIVE_KEYS)
    return Keepalive(idle=k.get('idle', KEEPALIVE_TIME),
                     interval=k.get('interval', KEEPALIVE_TIME),
                     count=k.get('count', optional(integer(1, 127))))


def _bad_alpn_route(pattern: str) -> bool:
    """`NAME alpn=PROTO[,PROTO]` without a name or without a protocol."""
    name, _, protocols = pattern.partition(' alpn=')
    return not name.strip() or not protocols.strip(' ,')


def _sni_routes(s: Section, declared: dict) -> tuple[tuple[str, str], ...]:
    routes = []
    for pattern in s.keys():
        target = s.value(pattern)
        if not isinstance(pattern, str) or not pattern.strip():
            s.report(pattern, f'a server name pattern must be a non-empty string, got {describe(pattern)}')
        elif ' alpn=' in pattern and _bad_alpn_route(pattern):
            s.report(pattern, "write a route that requires an ALPN as 'NAME alpn=PROTO[,PROTO]'")
        elif not isinstance(target, str) or target not in declared:
            s.report(pattern, f'unknown upstream {describe(target)}')
        else:
            routes.append((pattern, target))
    return tuple(routes)


def _proxy_protocol(s: Section, protocol: str) -> ProxyProtocol:
    p = s.section('proxy_protocol', PROXY_PROTOCOL_KEYS) if 'proxy_protocol' in s else None
    if p is None:
        return ProxyProtocol()
    accept = p.get('accept', boolean, False)
    if accept and not p.value('trusted'):
        p.report('accept', 'true needs a non-empty trusted list (the CIDRs of the proxies in front)')
    send = p.get('send', choice('none', 'v1', 'v2'), 'none')
    if send == 'v1' and protocol == 'udp':
        p.report('send', 'v1 is a text line for streams: a udp listener sends v2 (or none)')
    return ProxyProtocol(accept=accept, trusted=p.get_list('trusted', cidr), send=send)


def _udp(s: Section) -> UdpOptions:
    u = s.section('udp', UDP_KEYS) if 'udp' in s else None
    if u is None:
        return UdpOptions()
    return UdpOptions(responses=u.get('responses', integer(0, 1_000_000), 0),
                      max_sessions=u.get('max_sessions', integer(1, 10_000_000), 10000),
                      max_sessions_per_ip=u.get('max_sessions_per_ip', COUNT, 0))
