"""Config builders the tests share."""

from __future__ import annotations

import yaml


def render(config: dict) -> str:
    """The YAML text of `config`, keys in the order they were built."""
    return yaml.safe_dump(config, sort_keys=False)


def listener_config(protocol: str, port: int, upstream: str, workers: int = 2, extra: str = '',
                    host='127.0.0.1') -> str:
    """A config with one listener on host:port in front of one upstream server."""
    listen = f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
    return f"""
        workers: {workers}
        listeners:
          - listen: "{listen}"
            protocol: {protocol}
            upstream: ["{upstream}"]
{extra}
    """


def tcp_config(port: int, upstream: str, workers: int = 2, extra: str = '', host='127.0.0.1') -> str:
    return listener_config('tcp', port, upstream, workers, extra, host)


def udp_config(port: int, upstream: str, workers: int = 2, extra: str = '',
               host: str = '127.0.0.1') -> str:
    return listener_config('udp', port, upstream, workers, extra, host)


def upstream_config(port: int, servers: str, balance: str, workers: int = 1, extra: str = '',
                    protocol: str = 'tcp') -> str:
    return f"""
        workers: {workers}
        upstreams:
          pool:
            balance: {balance}
{extra}
            servers:
{servers}
        listeners:
          - listen: "127.0.0.1:{port}"
            protocol: {protocol}
            upstream: pool
    """


def server_lines(*entries) -> str:
    return ''.join(f'              - {{address: "{addr}", weight: {w}}}\n' for addr, w in entries)


def dns_config(port: int, dns_port: int, server: str, resolve: str | None = '500ms') -> str:
    return f"""
        workers: 1
        resolver: ["127.0.0.1:{dns_port}"]
        upstreams:
          web:
            {f'resolve: {resolve}' if resolve else ''}
            servers: ["{server}"]
        listeners:
          - listen: "127.0.0.1:{port}"
            upstream: web
    """


def upgrade_config(tmp_path, port, upstream, extra='') -> str:
    return tcp_config(port, upstream).replace(
        'workers: 2', f'workers: 2\n        pid_file: {tmp_path}/mpproxy.pid') + extra


def pp_config(port: int, upstream: str, send='none', accept=False, trusted=('127.0.0.1/32',),
              extra='', host='127.0.0.1', workers=1) -> str:
    lines = f'            proxy_protocol: {{send: {send}'
    if accept:
        lines += f', accept: true, trusted: [{", ".join(trusted)}]'
    return tcp_config(port, upstream, workers=workers, host=host, extra=lines + '}\n' + extra)


def with_admin(config: str, admin_port: int) -> str:
    return config.replace('workers: ', f'admin: {{listen: "127.0.0.1:{admin_port}"}}\n'
                                       f'        workers: ', 1)
