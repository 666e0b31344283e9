"""Config -> YAML: the effective configuration `mpproxy -T` prints.

Every default is written out, keys in DESIGN.md's order, durations as `30s`,
addresses as text. Loading the output gives back an equal Config (apart from
`path`); inline server lists come back as upstreams named after their listener.
"""

from __future__ import annotations

import yaml

from mpproxy.config.schema import Config, Keepalive, Listener, Resolve, Server, Upstream
from mpproxy.config.values import format_duration


class _Flow(dict):
    """A small mapping written on one line: `{address: ..., weight: 1}`."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)     # indent list items under their key


_Dumper.add_representer(
    _Flow, lambda dumper, data: dumper.represent_mapping('tag:yaml.org,2002:map', data, flow_style=True))


def dump(config: Config) -> str:
    doc = {
        'workers': config.workers,
        'pid_file': config.pid_file,
        'user': config.user,
        'group': config.group,
        'worker_rlimit_nofile': config.worker_rlimit_nofile,
        'shutdown_grace': format_duration(config.shutdown_grace),
        'shutdown_timeout': format_duration(config.shutdown_timeout),
        'max_draining_generations': config.max_draining_generations,
        'worker_timeout': format_duration(config.worker_timeout),
        'resolver': [str(address) for address in config.resolver],
        'error_log': config.error_log,
        'log_level': config.log_level,
        'access_log': config.access_log and _Flow(path=config.access_log.path,
                                                  format=config.access_log.format),
        'admin': config.admin and _Flow(listen=str(config.admin.listen),
                                        token_file=config.admin.token_file,
                                        socket=config.admin.socket),
        'watch_config': config.watch_config,
        'upstreams': {name: _upstream(upstream) for name, upstream in config.upstreams.items()},
        'listeners': [_listener(listener) for listener in config.listeners],
    }
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def _upstream(upstream: Upstream) -> dict:
    check = upstream.health_check
    return {
        'balance': upstream.balance,
        'hash_key': upstream.hash_key,
        'servers': [_server(server) for server in upstream.servers],
        'health_check': check and _Flow(
            type=check.type, interval=format_duration(check.interval),
            timeout=format_duration(check.timeout), rise=check.rise, fall=check.fall,
            send=check.send, expect=check.expect),
        'resolve': _resolve(upstream.resolve),
        'slow_start': format_duration(upstream.slow_start),
    }


def _resolve(resolve: Resolve | None) -> str | _Flow | None:
    """A fixed interval as the duration it was written as; bounds as {min, max}."""
    if resolve is None or resolve.min == resolve.max:
        return _optional_duration(resolve and resolve.min)
    return _Flow(min=format_duration(resolve.min), max=format_duration(resolve.max))


def _server(server: Server) -> _Flow:
    return _Flow(address=str(server.address), weight=server.weight, max_fails=server.max_fails,
                 fail_timeout=format_duration(server.fail_timeout), max_conns=server.max_conns,
                 backup=server.backup, slow_start=_optional_duration(server.slow_start))


def _listener(listener: Listener) -> dict:
    pp, udp = listener.proxy_protocol, listener.udp
    return {
        'name': listener.name,
        'listen': str(listener.listen),
        'protocol': listener.protocol,
        'upstream': listener.upstream,
        'backlog': listener.backlog,
        'reuseport': listener.reuseport,
        'ipv6only': listener.ipv6only,
        'keepalive': _keepalive(listener.keepalive),
        'connect_timeout': format_duration(listener.connect_timeout),
        'idle_timeout': format_duration(listener.idle_timeout),
        'half_close_timeout': format_duration(listener.half_close_timeout),
        'half_close': listener.half_close,
        'next_upstream_tries': listener.next_upstream_tries,
        'sni_routes': None if listener.sni_routes is None else dict(listener.sni_routes),
        'proxy_protocol': _Flow(accept=pp.accept, trusted=list(pp.trusted), send=pp.send),
        'allow': list(listener.allow),
        'deny': list(listener.deny),
        'max_connections': listener.max_connections,
        'max_connections_per_ip': listener.max_connections_per_ip,
        'upload_rate': listener.upload_rate,
        'download_rate': listener.download_rate,
        'udp': _Flow(responses=udp.responses, max_sessions=udp.max_sessions,
                     max_sessions_per_ip=udp.max_sessions_per_ip),
    }


def _keepalive(keepalive: Keepalive | None) -> bool | _Flow:
    if keepalive is None or keepalive == Keepalive():
        return keepalive is not None
    return _Flow(idle=_optional_duration(keepalive.idle),
                 interval=_optional_duration(keepalive.interval), count=keepalive.count)


def _optional_duration(seconds: float | None) -> str | None:
    return None if seconds is None else format_duration(seconds)
