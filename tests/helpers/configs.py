"""Configs built from dicts: a builder returns the config as a dict, a test changes it as a
dict (a reload's new config is the old one plus a key, not an edited string), and `render`
writes it as the YAML mpproxy reads (`Proxy` renders a dict it is given by itself).

Addresses are written as the user would ("127.0.0.1:80", "[::1]:80"); durations and sizes
as strings ("500ms", "1m"), as in a config file.
"""

from __future__ import annotations

import textwrap

import yaml


def render(config: dict) -> str:
    """The YAML text of `config`, keys in the order they were built."""
    return yaml.safe_dump(config, sort_keys=False)


def parse(text: str) -> dict:
    """The dict of a YAML config written inline in a test (indented or not)."""
    return yaml.safe_load(textwrap.dedent(text)) or {}


def address(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def listener(port: int, upstream, protocol: str | None = 'tcp', host: str = '127.0.0.1',
             **keys) -> dict:
    """One entry of `listeners`: host:port in front of `upstream` (a list of server
    addresses, or the name of an upstream); `protocol=None` leaves it to its default;
    `keys`: more listener keys."""
    entry = {'listen': address(host, port)}
    if protocol:
        entry['protocol'] = protocol
    entry['upstream'] = upstream
    entry.update(keys)
    return entry


def listener_config(protocol: str, port: int, upstream: str, workers: int = 2,
                    extra: dict | None = None, host='127.0.0.1') -> dict:
    """A config with one listener on host:port in front of one upstream server; `extra`:
    more keys of that listener."""
    return {'workers': workers,
            'listeners': [listener(port, [upstream], protocol, host, **(extra or {}))]}


def tcp_config(port: int, upstream: str, workers: int = 2, extra: dict | None = None,
               host='127.0.0.1') -> dict:
    return listener_config('tcp', port, upstream, workers, extra, host)


def udp_config(port: int, upstream: str, workers: int = 2, extra: dict | None = None,
               host: str = '127.0.0.1') -> dict:
    return listener_config('udp', port, upstream, workers, extra, host)


def weighted(*entries) -> list[dict]:
    """The servers of an upstream from (address, weight) pairs."""
    return [{'address': addr, 'weight': weight} for addr, weight in entries]


def upstream_config(port: int, servers: list[dict], balance: str, workers: int = 1,
                    extra: dict | None = None, protocol: str = 'tcp') -> dict:
    """One listener in front of the upstream `pool` of `servers`; `extra`: more keys of
    the upstream."""
    pool = {'balance': balance, **(extra or {}), 'servers': servers}
    return {'workers': workers, 'upstreams': {'pool': pool},
            'listeners': [listener(port, 'pool', protocol)]}


def dns_config(port: int, dns_port: int, server: str, resolve: str | None = '500ms') -> dict:
    """One listener in front of the upstream `web` of one server named in DNS, resolved by
    the test's DNS server on 127.0.0.1:`dns_port` (every `resolve`, or once)."""
    web = {'resolve': resolve} if resolve else {}
    web['servers'] = [server]
    return {'workers': 1, 'resolver': [f'127.0.0.1:{dns_port}'], 'upstreams': {'web': web},
            'listeners': [listener(port, 'web', protocol=None)]}


def with_keys(config, **keys) -> dict:
    """`config` (a dict, or YAML text) with more top-level keys, set or replaced."""
    config = parse(config) if isinstance(config, str) else config
    return {**config, **keys}


def with_pid_file(config, pid_file) -> dict:
    return with_keys(config, pid_file=str(pid_file))


def upgrade_config(tmp_path, port, upstream) -> dict:
    """A TCP config with the pid file USR2 needs, in `tmp_path`."""
    return with_pid_file(tcp_config(port, upstream), f'{tmp_path}/mpproxy.pid')


def pp_config(port: int, upstream: str, send='none', accept=False, trusted=('127.0.0.1/32',),
              extra: dict | None = None, host='127.0.0.1', workers=1) -> dict:
    """A TCP config whose listener has `proxy_protocol` (send, and accept from `trusted`)."""
    pp = {'send': send}
    if accept:
        pp.update(accept=True, trusted=list(trusted))
    return tcp_config(port, upstream, workers=workers, host=host,
                      extra={'proxy_protocol': pp, **(extra or {})})


def with_admin(config, admin_port: int) -> dict:
    """`config` (a dict, or YAML text) with the admin endpoint on 127.0.0.1:`admin_port`."""
    return with_keys(config, admin={'listen': f'127.0.0.1:{admin_port}'})
