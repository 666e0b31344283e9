"""Parsers for the values the config file spells as text: durations and addresses.

Pure functions. A bad value raises ValueError with a short message; the loader
adds `file:line: key.path:` in front of it.
"""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal

from mpproxy.config.schema import Address

MAX_DURATION = 365 * 24 * 3600      # a year: anything longer is a typo (and overflows timers)

_DURATION = re.compile(r'([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?')
_FACTORS = {'s': 1, 'm': 60, 'h': 3600}
_PORT = re.compile(r'[0-9]{1,5}')
_LABEL = re.compile(r'(?!-)[A-Za-z0-9_-]{1,63}(?<!-)')
_LISTEN_HOSTS = {'*': '0.0.0.0', 'localhost': '127.0.0.1'}


def describe(value) -> str:
    """A value as a message shows it: `'abc'`, `true`, `null`, `a list`."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + '...')
    if isinstance(value, (int, float)):
        text = str(value)
        return text if len(text) <= 40 else text[:37] + '...'
    if isinstance(value, dict):
        return 'a mapping'
    if isinstance(value, (list, tuple)):
        return 'a list'
    return f'a {type(value).__name__}'


def parse_duration(value) -> float:
    """Seconds from a number of seconds or a string: `500ms`, `30s`, `1.5s`, `10m`, `1h`."""
    bad = f'must be a duration like 500ms, 30s, 10m, 1h or a number of seconds, got {describe(value)}'
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise ValueError(bad)
        number, unit = match.groups()
        seconds = float(number) / 1000 if unit == 'ms' else float(number) * _FACTORS[unit or 's']
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        if value < 0:
            raise ValueError('must not be negative')
        seconds = value
    else:
        raise ValueError(bad)
    if seconds > MAX_DURATION:
        raise ValueError(f'must be at most {MAX_DURATION // 3600}h')
    return float(seconds)


def format_duration(seconds: float) -> str:
    """The shortest of `1h`, `10m`, `30s`, `500ms` that parses back to exactly `seconds`."""
    if seconds == 0:
        return '0s'
    for unit, count in (('h', seconds / 3600), ('m', seconds / 60), ('s', seconds),
                        ('ms', seconds * 1000)):
        text = f'{round(count)}{unit}'
        if parse_duration(text) == seconds:
            return text
    return f'{Decimal(repr(seconds)):f}s'


def parse_address(text, *, listen: bool = False) -> Address:
    """An Address from `host:port`, `[v6]:port` or `name:port`.

    For a listen address the host must be an IP literal, `*` (0.0.0.0) or
    `localhost` (127.0.0.1), and a bare port means 0.0.0.0:port; the master
    never resolves names. Other addresses may name a host, kept as written.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f'must be an address like host:port, got {describe(text)}')
    if listen and (isinstance(text, int) or _PORT.fullmatch(text.strip())):
        return Address('0.0.0.0', _port(text))
    if isinstance(text, int):
        raise ValueError(f'must be an address like host:port, got {text}')
    text = text.strip()
    if text.startswith('['):
        host, sep, port = text[1:].partition(']:')
        if not sep:
            raise ValueError(f'must be [IPv6 address]:port, got {describe(text)}')
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ValueError(f'{host!r} is not an IPv6 address') from None
    else:
        host, sep, port = text.rpartition(':')
        if not sep:
            raise ValueError(f'must be an address like host:port, got {describe(text)}')
        if ':' in host:
            raise ValueError('an IPv6 address must be in brackets: [address]:port')
        host = _host(host, listen)
    return Address(host, _port(port))


def format_sockaddr(addr) -> str:
    """A socket address (host, port, ...) as people write it: `1.2.3.4:80`, `[::1]:80`;
    `-` for none. The one formatter of client and server addresses in logs."""
    if not addr:
        return '-'
    host, port = addr[0], addr[1]
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def _port(text) -> int:
    if isinstance(text, str):
        text = text.strip()
        if not _PORT.fullmatch(text):
            raise ValueError('port must be 1-65535')
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError('port must be 1-65535')
    return port


def _host(host: str, listen: bool) -> str:
    """An IPv4 literal or (unless `listen`) a DNS name, checked."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if listen:
        if host in _LISTEN_HOSTS:
            return _LISTEN_HOSTS[host]
        raise ValueError("listen address must be an IP address, '*' or 'localhost'")
    if not host:
        raise ValueError('missing host before the port')
    labels = host.removesuffix('.').split('.')
    if (len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):
        raise ValueError(f'{host!r} is not an IPv4 address or a host name')
    return host
