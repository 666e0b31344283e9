"""The config package: value parsers, the loader's checks and messages, dump round trips."""

import dataclasses
import os
import pwd
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpproxy.config import ConfigError, accounts, dump, load
from mpproxy.config.checks import LISTENER_KEYS, SERVER_KEYS, TOP_KEYS, UPSTREAM_KEYS
from mpproxy.config.schema import Address, Keepalive, Resolve, Server
from mpproxy.config.values import format_duration, parse_address, parse_duration

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

MINIMAL = """\
upstreams:
  web:
    servers: [127.0.0.1:9000]
listeners:
  - listen: 127.0.0.1:8000
    upstream: web
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / 'mpproxy.yaml'
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_text(tmp_path, text: str):
    return load(write(tmp_path, text))


def problems(tmp_path, text: str) -> list[str]:
    """The problems of a broken config, without the leading `FILE:`."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert all(p.startswith(path) for p in info.value.problems)
    return [p[len(path) + 1:] for p in info.value.problems]


# -- values -----------------------------------------------------------------

@pytest.mark.parametrize('value, seconds', [
    ('500ms', 0.5), ('30s', 30.0), ('10m', 600.0), ('1h', 3600.0), ('1.5s', 1.5),
    ('2.5m', 150.0), (' 45s ', 45.0), ('90', 90.0), (30, 30.0), (0.25, 0.25), (0, 0.0)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize('value, message', [
    (True, 'got true'), ('5x', "got '5x'"), ('1d', "got '1d'"), ('-1s', "got '-1s'"),
    ('1e3', "got '1e3'"), ('', "got ''"), (None, 'got null'), ([1], 'got a list'),
    (-1, 'must not be negative'), (float('nan'), 'got nan'),
    (float('inf'), 'must be at most 8760h'), ('9999h', 'must be at most 8760h')])
def test_bad_durations(value, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize('seconds, text', [
    (0.0, '0s'), (30.0, '30s'), (600.0, '10m'), (3600.0, '1h'), (0.5, '500ms'), (90.0, '90s'),
    (1.5, '1500ms'), (0.0015, '0.0015s'), (1e-05, '0.00001s')])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize('text, listen, address', [
    ('127.0.0.1:80', False, Address('127.0.0.1', 80)),
    ('[::1]:80', False, Address('::1', 80)),
    ('[0:0::1]:80', False, Address('::1', 80)),
    ('[2001:DB8:0:0::1]:443', False, Address('2001:db8::1', 443)),
    ('backend.example.com:9000', False, Address('backend.example.com', 9000)),
    ('localhost:9000', False, Address('localhost', 9000)),
    ('127.0.0.1:65535', True, Address('127.0.0.1', 65535)),
    ('[::]:53', True, Address('::', 53)),
    ('*:8080', True, Address('0.0.0.0', 8080)),
    ('localhost:8080', True, Address('127.0.0.1', 8080)),
    (8080, True, Address('0.0.0.0', 8080)),
    ('8080', True, Address('0.0.0.0', 8080))])
def test_addresses(text, listen, address):
    assert parse_address(text, listen=listen) == address


@pytest.mark.parametrize('text, listen, message', [
    ('127.0.0.1:0', False, 'port must be 1-65535'),
    ('127.0.0.1:65536', True, 'port must be 1-65535'),
    ('127.0.0.1:http', False, 'port must be 1-65535'),
    (70000, True, 'port must be 1-65535'),
    ('127.0.0.1', False, 'must be an address like host:port'),
    (8080, False, 'must be an address like host:port'),
    ('::1:80', False, r'an IPv6 address must be in brackets: \[address\]:port'),
    ('[::1]', False, r'must be \[IPv6 address\]:port'),
    ('[127.0.0.1]:80', False, "'127.0.0.1' is not an IPv6 address"),
    ('example.com:80', True, "listen address must be an IP address, '\\*' or 'localhost'"),
    ('*:80', False, "'\\*' is not an IPv4 address or a host name"),
    ('999.1.1.1:80', False, "'999.1.1.1' is not an IPv4 address or a host name"),
    ('bad_-.x:80', False, 'is not an IPv4 address or a host name'),
    (':80', False, 'missing host'),
    (True, True, 'must be an address like host:port, got true')])
def test_bad_addresses(text, listen, message):
    with pytest.raises(ValueError, match=message):
        parse_address(text, listen=listen)


# -- defaults and semantics ---------------------------------------------------

def test_defaults(tmp_path):
    config = load_text(tmp_path, MINIMAL + """\
  - listen: 127.0.0.1:8000
    protocol: udp
    upstream: web
""")
    assert config.path == str(tmp_path / 'mpproxy.yaml')
    assert config.workers == os.cpu_count()
    assert (config.shutdown_timeout, config.log_level, config.error_log) == (30.0, 'info', 'stderr')
    assert config.shutdown_grace == 0.0
    tcp, udp = config.listeners
    assert (tcp.protocol, tcp.idle_timeout, tcp.name) == ('tcp', 600.0, '127.0.0.1:8000')
    assert (udp.protocol, udp.idle_timeout, udp.name) == ('udp', 30.0, '127.0.0.1:8000')
    assert tcp.keepalive is None and tcp.backlog == 511 and udp.udp.max_sessions == 10000
    assert config.upstreams['web'].servers == (Server(Address('127.0.0.1', 9000)),)


def test_workers_auto_and_number(tmp_path):
    assert load_text(tmp_path, 'workers: auto\n' + MINIMAL).workers == os.cpu_count()
    assert load_text(tmp_path, 'workers: 3\n' + MINIMAL).workers == 3


def test_inline_upstreams(tmp_path):
    config = load_text(tmp_path, """\
        listeners:
          - listen: 8000
            upstream: [127.0.0.1:9000, {address: "[::1]:9001"}]
          - name: dns
            listen: "[::1]:53"
            protocol: udp
            upstream: [ns.example.com:53]
          - listen: 8000
            protocol: udp
            upstream: [127.0.0.1:9000, {address: "[::1]:9001"}]
        """)
    first, dns, udp = config.listeners
    assert first.name == first.upstream == udp.name == '0.0.0.0:8000'
    assert udp.upstream == '0.0.0.0:8000/udp'
    assert config.upstreams['0.0.0.0:8000'].servers == (
        Server(Address('127.0.0.1', 9000)), Server(Address('::1', 9001)))
    assert config.upstreams['0.0.0.0:8000/udp'].servers == config.upstreams['0.0.0.0:8000'].servers
    assert dns.upstream == 'dns/udp' and dns.listen == Address('::1', 53)
    assert config.upstreams['dns/udp'].servers == (Server(Address('ns.example.com', 53)),)


def test_keepalive_forms(tmp_path):
    def keepalive(value):
        text = MINIMAL + f'    keepalive: {value}\n'
        return load_text(tmp_path, text).listeners[0].keepalive
    assert keepalive('false') is None
    assert keepalive('true') == Keepalive()
    assert keepalive('{idle: 60s, interval: 10s, count: 6}') == Keepalive(60.0, 10.0, 6)


def test_not_supported_keys_at_their_default_load(tmp_path):
    config = load_text(tmp_path, """\
        user: null
        resolver: []
        upstreams:
          web:
            balance: round_robin
            hash_key: client_ip
            health_check: null
            servers:
              - {address: 127.0.0.1:9000, weight: 1, max_fails: 1, fail_timeout: 10000ms, max_conns: 0, backup: false}
        listeners:
          - listen: 127.0.0.1:8000
            upstream: web
            sni_routes: null
            proxy_protocol: {accept: false, trusted: [], send: none}
            allow: []
            max_connections: 0
            download_rate: 0
            udp: {max_sessions_per_ip: 0}
        """)
    assert config.upstreams['web'].servers[0].fail_timeout == 10.0


def test_resolve_forms(tmp_path):
    def resolve(value):
        text = MINIMAL.replace('    servers:', f'    resolve: {value}\n    servers:')
        return load_text(tmp_path, text).upstreams['web'].resolve
    assert load_text(tmp_path, MINIMAL).upstreams['web'].resolve is None   # only at the start
    assert resolve('null') is None
    assert resolve('30s') == Resolve(30.0, 30.0)                 # a fixed interval
    assert resolve('{min: 5s, max: 5m}') == Resolve(5.0, 300.0)  # the TTL, within bounds
    assert resolve('{max: 1m}') == Resolve(5.0, 60.0)
    assert resolve('{min: 1s}') == Resolve(1.0, 300.0)
    assert resolve('{}') == Resolve(5.0, 300.0)
    assert resolve('{min: 10s, max: 10s}') == Resolve(10.0, 10.0)


def test_dump_writes_resolve_as_it_was_meant(tmp_path):
    text = MINIMAL.replace('  web:\n', '  fixed:\n    resolve: 30s\n    servers: [a.test:80]\n'
                                        '  ttl:\n    resolve: {min: 500ms, max: 1h}\n'
                                        '    servers: [b.test:80]\n  web:\n')
    config = load_text(tmp_path, text)
    doc = yaml.safe_load(dump(config))
    assert doc['upstreams']['fixed']['resolve'] == '30s'
    assert doc['upstreams']['ttl']['resolve'] == {'min': '500ms', 'max': '1h'}
    assert doc['upstreams']['web']['resolve'] is None
    assert 'resolve: {min: 500ms, max: 1h}' in dump(config)
    assert_round_trip(tmp_path, config)


def test_admin_listen(tmp_path):
    assert load_text(tmp_path, MINIMAL).admin is None                 # off by default
    config = load_text(tmp_path, 'admin: {listen: "[::1]:9901"}\n' + MINIMAL)
    assert config.admin.listen == Address('::1', 9901)
    assert_round_trip(tmp_path, config)
    assert load_text(tmp_path, 'admin: {listen: 9901}\n' + MINIMAL).admin.listen == \
        Address('0.0.0.0', 9901)
    with pytest.raises(ConfigError, match=r':1: admin.listen: '):     # the master never resolves
        load_text(tmp_path, 'admin: {listen: "admin.example.com:9901"}\n' + MINIMAL)


def test_watch_config_is_a_boolean_off_by_default(tmp_path):
    assert load_text(tmp_path, MINIMAL).watch_config is False
    assert load_text(tmp_path, 'watch_config: true\n' + MINIMAL).watch_config is True
    assert problems(tmp_path, 'watch_config: sometimes\n' + MINIMAL) == [
        "1: watch_config: must be true or false, got 'sometimes'"]


def test_user_and_group_by_name_or_id(tmp_path):
    config = load_text(tmp_path, 'user: nobody\n' + MINIMAL)
    assert (config.user, config.group) == ('nobody', None)
    config = load_text(tmp_path, 'user: 65534\ngroup: 4000000\n' + MINIMAL)
    assert (config.user, config.group) == ('65534', '4000000')     # ids need no entry


def test_accounts_resolve_ids_and_groups():
    nobody = pwd.getpwnam('nobody')
    creds = accounts.resolve('nobody', None)
    assert (creds.uid, creds.gid) == (nobody.pw_uid, nobody.pw_gid)     # the primary group
    assert creds.groups[0] == nobody.pw_gid
    assert set(creds.groups) == set(os.getgrouplist('nobody', nobody.pw_gid))
    assert accounts.resolve(str(nobody.pw_uid), None) == dataclasses.replace(
        creds, user=str(nobody.pw_uid))
    creds = accounts.resolve('nobody', '4000000')
    assert (creds.gid, creds.groups[0]) == (4000000, 4000000)
    assert accounts.resolve('4000000', '4000001') == accounts.Credentials(
        '4000000', 4000000, 4000001, (4000001,))
    for bad in ('no-such-user-mpproxy', 'a\x00b', '99999999999', '１２'):
        with pytest.raises(ValueError, match='no such user'):
            accounts.resolve(bad, None)
    with pytest.raises(ValueError, match='no such group'):
        accounts.resolve('nobody', 'no-such-group-mpproxy')


def test_yaml_anchors_and_merge_keys(tmp_path):
    config = load_text(tmp_path, """\
        upstreams:
          web: {servers: [127.0.0.1:9000]}
        listeners:
          - &base {listen: 127.0.0.1:8000, upstream: web, connect_timeout: 2s}
          - <<: *base
            protocol: udp
            connect_timeout: 3s
        """)
    assert [l.connect_timeout for l in config.listeners] == [2.0, 3.0]


def test_example_config_loads():
    config = load(str(ROOT / 'etc' / 'mpproxy.yaml'))
    assert config.workers == 2 and config.pid_file is None
    assert [(l.protocol, str(l.listen), l.upstream) for l in config.listeners] == [
        ('tcp', '127.0.0.1:8000', 'echo'), ('udp', '127.0.0.1:8000', 'echo')]
    assert config.upstreams['echo'].servers == (Server(Address('127.0.0.1', 9000)),)


# -- broken configs: exact `line: key.path: message` --------------------------

BROKEN = {
    'port out of range': (MINIMAL.replace('127.0.0.1:8000', '127.0.0.1:70000'),
                          '5: listeners[0].listen: port must be 1-65535'),
    'unknown top-level key': ('colour: red\n' + MINIMAL, '1: colour: unknown key'),
    'unknown key, with a hint': ('worker: 2\n' + MINIMAL,
                                 "1: worker: unknown key (did you mean 'workers'?)"),
    'unknown listener key': (MINIMAL + '    colour: red\n', '7: listeners[0].colour: unknown key'),
    'unknown upstream': (MINIMAL.replace('upstream: web', 'upstream: api'),
                         "6: listeners[0].upstream: unknown upstream 'api'"),
    'bad duration': (MINIMAL + '    connect_timeout: 5x\n',
                     '7: listeners[0].connect_timeout: must be a duration like 500ms, 30s, 10m, '
                     "1h or a number of seconds, got '5x'"),
    'zero duration': (MINIMAL + '    idle_timeout: 0\n',
                      '7: listeners[0].idle_timeout: must be greater than 0'),
    'string for an int': (MINIMAL + '    backlog: "511"\n',
                          "7: listeners[0].backlog: must be an integer, got '511'"),
    'bool for an int': (MINIMAL + '    next_upstream_tries: true\n',
                        '7: listeners[0].next_upstream_tries: must be an integer, got true'),
    'int for a bool': (MINIMAL + '    reuseport: 1\n',
                       '7: listeners[0].reuseport: must be true or false, got 1'),
    'bool for workers': ('workers: yes\n' + MINIMAL, '1: workers: must be auto or an integer, got true'),
    'huge backlog': (MINIMAL + '    backlog: 99999999999999999999999\n',
                     '7: listeners[0].backlog: must be an integer <= 65535'),
    'huge workers': ('workers: 100000\n' + MINIMAL, '1: workers: must be an integer <= 1024'),
    'huge duration': ('shutdown_timeout: 100000h\n' + MINIMAL,
                      '1: shutdown_timeout: must be at most 8760h'),
    'bad grace': ('shutdown_grace: soon\n' + MINIMAL,
                  '1: shutdown_grace: must be a duration like 500ms, 30s, 10m, 1h or a number of '
                  "seconds, got 'soon'"),
    'negative grace': ('shutdown_grace: -5\n' + MINIMAL, '1: shutdown_grace: must not be negative'),
    'duplicate listener': (MINIMAL + '  - listen: 127.0.0.1:8000\n    upstream: web\n',
                           '7: listeners[1].listen: duplicate listener '
                           '(same protocol and address as listeners[0])'),
    'bad protocol': (MINIMAL + '    protocol: sctp\n',
                     "7: listeners[0].protocol: must be one of tcp, udp, got 'sctp'"),
    'resolver by name': ('resolver: [dns.example:53]\n' + MINIMAL,
                         '1: resolver[0]: must be an IP address and port, like 1.1.1.1:53'),
    'resolve zero': (MINIMAL.replace('    servers:', '    resolve: 0s\n    servers:'),
                     '3: upstreams.web.resolve: must be greater than 0'),
    'resolve not a duration': (
        MINIMAL.replace('    servers:', '    resolve: often\n    servers:'),
        "3: upstreams.web.resolve: must be a duration like 30s or a mapping like "
        "{min: 5s, max: 5m}, got 'often'"),
    'resolve max below min': (
        MINIMAL.replace('    servers:',
                        '    resolve:\n      min: 10m\n      max: 1m\n    servers:'),
        '5: upstreams.web.resolve.max: must not be less than min (10m)'),
    'resolve min above the default max': (
        MINIMAL.replace('    servers:', '    resolve: {min: 10m}\n    servers:'),
        '3: upstreams.web.resolve.min: must not be more than max (5m, the default)'),
    'resolve min zero': (
        MINIMAL.replace('    servers:', '    resolve:\n      min: 0\n    servers:'),
        '4: upstreams.web.resolve.min: must be greater than 0'),
    'resolve unknown key': (
        MINIMAL.replace('    servers:', '    resolve: {minimum: 5s}\n    servers:'),
        "3: upstreams.web.resolve.minimum: unknown key (did you mean 'min'?)"),
    'unknown user': ('user: no-such-user-mpproxy\n' + MINIMAL,
                     "1: user: no such user 'no-such-user-mpproxy'"),
    'unknown group': ('user: nobody\ngroup: no-such-group-mpproxy\n' + MINIMAL,
                      "2: group: no such group 'no-such-group-mpproxy'"),
    'group without user': ('group: "0"\n' + MINIMAL,
                           '1: group: needs user (the workers switch user and group together)'),
    'uid without an entry or group': ('user: 4000000\n' + MINIMAL,
                                      '1: user: uid 4000000 has no passwd entry, so no primary '
                                      'group: set group too'),
    'negative uid': ('user: -1\n' + MINIMAL, '1: user: must be an integer >= 0'),
    'user as a list': ('user: [nobody]\n' + MINIMAL,
                       '1: user: must be a non-empty string, got a list'),
    'huge max_connections': (MINIMAL + '    max_connections: 99999999999999999999\n',
                             '7: listeners[0].max_connections: must be an integer <= 10000000'),
    'negative per-ip limit': (MINIMAL + '    max_connections_per_ip: -1\n',
                              '7: listeners[0].max_connections_per_ip: must be an integer >= 0'),
    'rate as a word': (MINIMAL + '    upload_rate: fast\n',
                       "7: listeners[0].upload_rate: must be an integer, got 'fast'"),
    'unknown proxy protocol version': (
        MINIMAL + '    proxy_protocol: {send: v3}\n',
        "7: listeners[0].proxy_protocol.send: must be one of none, v1, v2, got 'v3'"),
    'bad trusted cidr': (
        MINIMAL + '    proxy_protocol: {accept: true, trusted: [10.0.0.0/33]}\n',
        "7: listeners[0].proxy_protocol.trusted[0]: must be a CIDR like 10.0.0.0/8 or fd00::/8, "
        "got '10.0.0.0/33'"),
    'rate on a udp listener': (
        MINIMAL + '    protocol: udp\n    upload_rate: 1000\n',
        '8: listeners[0].upload_rate: applies to tcp listeners only'),
    'half_close false on a udp listener': (
        MINIMAL + '    protocol: udp\n    half_close: false\n',
        '8: listeners[0].half_close: applies to tcp listeners only'),
    'half_close not a boolean': (MINIMAL + '    half_close: sometimes\n',
                                 "7: listeners[0].half_close: must be true or false, got 'sometimes'"),
    'max_connections on a udp listener': (
        MINIMAL + '    protocol: udp\n    max_connections: 10\n',
        '8: listeners[0].max_connections: applies to tcp listeners only (a udp listener has '
        'udp.max_sessions, per worker)'),

    'server weight 0': (
        MINIMAL.replace('[127.0.0.1:9000]', '[{address: 127.0.0.1:9000, weight: 0}]'),
        '3: upstreams.web.servers[0].weight: must be an integer >= 1'),
    'empty servers': (MINIMAL.replace('[127.0.0.1:9000]', '[]'),
                      '3: upstreams.web.servers: an upstream needs at least one server (or resolve)'),
    'empty inline list': (MINIMAL.replace('upstream: web', 'upstream: []'),
                          '6: listeners[0].upstream: an upstream needs at least one server'),
    'duplicate yaml key': (MINIMAL + '    upstream: web\n',
                           '7: listeners[0].upstream: duplicate key (first on line 6)'),
    'listen on a DNS name': (MINIMAL.replace('127.0.0.1:8000', 'example.com:8000'),
                             "5: listeners[0].listen: listen address must be an IP address, "
                             "'*' or 'localhost'"),
    'reuseport on udp': (MINIMAL + '    protocol: udp\n    reuseport: true\n',
                         '8: listeners[0].reuseport: udp listeners always use one '
                         'SO_REUSEPORT socket per worker'),
    'bad log level': ('log_level: verbose\n' + MINIMAL,
                      '1: log_level: must be one of debug, info, notice, warn, error, crit, '
                      "got 'verbose'"),
    'bad cidr': (MINIMAL + '    allow: [10.0.0.0/33]\n',
                 "7: listeners[0].allow[0]: must be a CIDR like 10.0.0.0/8 or fd00::/8, "
                 "got '10.0.0.0/33'"),
    'missing listen': (MINIMAL.replace('  - listen: 127.0.0.1:8000\n    upstream', '  - upstream'),
                       '5: listeners[0].listen: missing'),
    'no listeners': (MINIMAL.split('listeners:')[0],
                     '1: listeners: missing (at least one listener is needed)'),
    'inline list named like an upstream': (
        MINIMAL + '  - name: web\n    listen: 127.0.0.1:8001\n    upstream: [127.0.0.1:9000]\n',
        "9: listeners[1].upstream: an inline server list is named after its listener, and 'web' "
        'is already an upstream: give the listener another name'),
    'keepalive of the wrong type': (
        MINIMAL + '    keepalive: 60\n',
        '7: listeners[0].keepalive: must be false, true or a mapping {idle, interval, count}, got 60'),
    'upstreams not a mapping': ('upstreams: [web]\nlisteners: [{listen: 80, upstream: [127.0.0.1:9]}]\n',
                                '1: upstreams: must be a mapping, got a list'),
}


@pytest.mark.parametrize('text, expected', BROKEN.values(), ids=BROKEN.keys())
def test_broken_config(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_proxy_protocol_accept_needs_trusted(tmp_path):
    assert problems(tmp_path, MINIMAL + '    proxy_protocol: {accept: true}\n') == [
        '7: listeners[0].proxy_protocol.accept: true needs a non-empty trusted list '
        '(the CIDRs of the proxies in front)']


def test_proxy_protocol_send_v1_needs_a_tcp_listener(tmp_path):
    udp = MINIMAL + '    protocol: udp\n    proxy_protocol: {send: v1}\n'
    assert problems(tmp_path, udp) == [
        '8: listeners[0].proxy_protocol.send: v1 is a text line for streams: a udp listener '
        'sends v2 (or none)']
    config = load_text(tmp_path, MINIMAL + '    protocol: udp\n    proxy_protocol: {send: v2, '
                                           'accept: true, trusted: [10.0.0.0/8]}\n'
                                           '    udp: {max_sessions_per_ip: 3}\n')
    listener = config.listeners[0]
    assert (listener.proxy_protocol.send, listener.proxy_protocol.accept) == ('v2', True)
    assert listener.udp.max_sessions_per_ip == 3
    assert load_text(tmp_path, MINIMAL + '    proxy_protocol: {send: v1}\n') \
        .listeners[0].proxy_protocol.send == 'v1'


def test_many_problems_are_reported_together_in_line_order(tmp_path):
    assert problems(tmp_path, """\
        workers: 0
        upstreams:
          web:
            servers: ["127.0.0.1:0", {address: 10.0.0.1:80, colour: red}]
        listeners:
          - listen: 127.0.0.1:8000
            upstream: nope
          - listen: "[::1]:99999"
            upstream: web
            connect_timeout: -1
        """) == [
        '1: workers: must be an integer >= 1',
        '4: upstreams.web.servers[0]: port must be 1-65535',
        '4: upstreams.web.servers[1].colour: unknown key',
        "7: listeners[0].upstream: unknown upstream 'nope'",
        '8: listeners[1].listen: port must be 1-65535',
        '10: listeners[1].connect_timeout: must not be negative']


@pytest.mark.parametrize('text, expected', [
    ('listeners: [\n', '2: YAML syntax error: expected the node content, but found '
                       "'<stream end>'"),
    ('a: b\n  c: d\n', '2: YAML syntax error: mapping values are not allowed here'),
    ('listen: *nope\n', "1: YAML syntax error: found undefined alias 'nope'"),
    ('workers: !!int two\n', "1: YAML syntax error: bad value (invalid literal for int() "
                             "with base 10: 'two')"),
    ('a: \x07\n', '1: YAML syntax error: special characters are not allowed (character #x0007)'),
    ('- 1\n- 2\n', '1: the top level must be a mapping of keys, got a list'),
    ('', ' the file is empty (a mapping with at least `listeners` is needed)'),
    ('# only a comment\n', ' the file is empty (a mapping with at least `listeners` is needed)'),
])
def test_unusable_files(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / 'nope.yaml'))
    assert info.value.problems == [f'{tmp_path}/nope.yaml: cannot read: No such file or directory']
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert info.value.problems == [f'{tmp_path}: cannot read: Is a directory']
    (tmp_path / 'latin1.yaml').write_bytes(b'workers: \xe9\n')
    with pytest.raises(ConfigError, match='cannot read: not UTF-8 text'):
        load(str(tmp_path / 'latin1.yaml'))


# -- dump ---------------------------------------------------------------------

ROUND_TRIP = [
    MINIMAL,
    (ROOT / 'etc' / 'mpproxy.yaml').read_text(),
    """\
    workers: auto
    pid_file: /run/mpproxy.pid
    user: nobody
    group: 65534
    worker_rlimit_nofile: 65536
    shutdown_grace: 10s
    shutdown_timeout: 0
    max_draining_generations: 2
    worker_timeout: 1.5s
    error_log: /var/log/mpproxy/error.log
    log_level: debug
    upstreams:
      web: {servers: [127.0.0.1:9000, "[::1]:9000", backend.example.com:80]}
    listeners:
      - listen: "[::]:8443"
        upstream: web
        backlog: 4096
        reuseport: true
        ipv6only: false
        keepalive: {idle: 90, count: 4}
        connect_timeout: 250ms
        idle_timeout: 2h
        half_close_timeout: 0
        next_upstream_tries: 1
      - name: "yes"
        listen: "*:5353"
        protocol: udp
        upstream: ["127.0.0.1:53", "127.0.0.2:53"]
        keepalive: true
        idle_timeout: 0.0015
        udp: {responses: 1, max_sessions: 100}
    """,
]


@pytest.mark.parametrize('text', ROUND_TRIP)
def test_dump_round_trips(tmp_path, text):
    config = load_text(tmp_path, text)
    assert_round_trip(tmp_path, config)


def assert_round_trip(tmp_path, config):
    dumped = dump(config)
    path = tmp_path / 'dumped.yaml'
    path.write_text(dumped)
    again = load(str(path))
    assert dataclasses.replace(again, path=config.path) == config
    assert dump(again) == dumped


def test_dump_fills_in_defaults_in_design_order(tmp_path):
    doc = yaml.safe_load(dump(load_text(tmp_path, MINIMAL)))
    assert list(doc) == list(TOP_KEYS)
    assert list(doc['listeners'][0]) == list(LISTENER_KEYS)
    assert list(doc['upstreams']['web']) == list(UPSTREAM_KEYS)
    assert list(doc['upstreams']['web']['servers'][0]) == list(SERVER_KEYS)
    listener = doc['listeners'][0]
    assert (listener['idle_timeout'], listener['connect_timeout'], listener['keepalive']) == (
        '10m', '5s', False)
    assert doc['shutdown_timeout'] == '30s' and doc['workers'] == os.cpu_count()
    assert doc['shutdown_grace'] == '0s'


# -- fuzzing: any input gives a Config or a ConfigError, never anything else ---

TOKENS = ['\n', ' ', '  ', ':', ': ', '- ', '[', ']', '{', '}', ',', '&a ', '*a', '!!int ', '"', "'",
          '#', '?', '|', '>', '<<: ', '%', '@', '\t', '0', '1', '-1', '8000', '30s', 'null', 'true',
          'auto', 'web', 'tcp', 'udp', '127.0.0.1:80', '[::1]:80', 'x'] + list(TOP_KEYS) + list(
    LISTENER_KEYS)

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.integers(), st.floats(), st.text(max_size=8),
    st.sampled_from(['30s', '0', '500ms', '-1s', 'auto', 'tcp', 'udp', 'none', 'v1', 'json', 'web',
                     '127.0.0.1:9000', '[::1]:80', '*:80', '8080', 'example.com:80',
                     '10.0.0.0/8', 'round_robin', 'hash', 'info', '2001-02-30']))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(TOP_KEYS + LISTENER_KEYS + UPSTREAM_KEYS + SERVER_KEYS), inner, max_size=3),
    max_leaves=8)


def section(keys, **special):
    return st.dictionaries(st.sampled_from(keys), VALUES, max_size=5).flatmap(
        lambda base: st.fixed_dictionaries({}, optional=special).map(lambda extra: base | extra))


SERVERS = st.lists(SCALARS | section(SERVER_KEYS), max_size=3)
UPSTREAMS = st.dictionaries(st.sampled_from(['web', 'api', '0.0.0.0:80']),
                            section(UPSTREAM_KEYS, servers=SERVERS), max_size=2)
LISTENER = section(LISTENER_KEYS, listen=SCALARS,
                   upstream=st.sampled_from(['web', 'api']) | SERVERS)
CONFIGS = section(TOP_KEYS, upstreams=UPSTREAMS, listeners=st.lists(LISTENER, max_size=3))


def assert_loads_or_config_error(tmp_path, text):
    path = tmp_path / 'fuzz.yaml'
    path.write_text(text)
    try:
        config = load(str(path))
    except ConfigError as exc:
        assert exc.problems and all(p.startswith(str(path)) for p in exc.problems)
        return
    assert_round_trip(tmp_path, config)


@FUZZ
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=40))
def test_fuzz_yaml_like_text(tmp_path, tokens):
    assert_loads_or_config_error(tmp_path, ''.join(tokens))


@FUZZ
@given(doc=CONFIGS)
def test_fuzz_random_structures(tmp_path, doc):
    assert_loads_or_config_error(tmp_path, yaml.safe_dump(doc))



@FUZZ
@given(data=st.data())
def test_fuzz_changes_to_a_valid_config(tmp_path, data):
    doc = yaml.safe_load(dump(load_text(tmp_path, ROUND_TRIP[2])))
    for _ in range(data.draw(st.integers(1, 3))):
        parent, key = data.draw(st.sampled_from(list(slots(doc))))
        if isinstance(parent, dict) and data.draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = data.draw(VALUES)
    assert_loads_or_config_error(tmp_path, yaml.safe_dump(doc))


def slots(node):
    """(container, key) for every value nested in `node`."""
    for key in list(node) if isinstance(node, dict) else range(len(node)):
        yield node, key
        if isinstance(node[key], (dict, list)):
            yield from slots(node[key])


def test_tcp_and_udp_on_one_address_need_no_names(tmp_path):
    config = load_text(tmp_path, """\
        listeners:
          - listen: 127.0.0.1:53
            upstream: [127.0.0.1:5353]
          - listen: 127.0.0.1:53
            protocol: udp
            upstream: [127.0.0.2:5353]
        """)
    tcp, udp = config.listeners
    assert tcp.name == udp.name == '127.0.0.1:53'
    assert config.upstreams[tcp.upstream].servers[0].address.host == '127.0.0.1'
    assert config.upstreams[udp.upstream].servers[0].address.host == '127.0.0.2'


def test_sni_listener_needs_no_upstream_of_its_own(tmp_path):
    config = load_text(tmp_path, """\
        upstreams:
          www: {servers: [127.0.0.1:9000]}
          rest: {servers: [127.0.0.1:9001]}
        listeners:
          - listen: 127.0.0.1:443
            sni_routes: {"www.example.com": www, default: rest}
        """)
    listener = config.listeners[0]
    assert listener.sni_routes == (('www.example.com', 'www'), ('default', 'rest'))
    assert listener.upstream == 'rest'


def test_a_udp_listener_takes_sni_routes_for_quic_also_beside_proxy_protocol(tmp_path):
    config = load_text(tmp_path, """\
        upstreams:
          a: {servers: [127.0.0.1:9000]}
          rest: {servers: [127.0.0.1:9001]}
        listeners:
          - listen: 127.0.0.1:443
            protocol: udp
            sni_routes: {"a.example": a, default: rest}
        """)
    listener = config.listeners[0]
    assert listener.sni_routes == (('a.example', 'a'), ('default', 'rest'))
    assert listener.upstream == 'rest'
    config = load_text(tmp_path, """\
        upstreams:
          a: {servers: [127.0.0.1:9000]}
        listeners:
          - listen: 127.0.0.1:443
            protocol: udp
            sni_routes: {"a.example": a}
            proxy_protocol: {accept: true, trusted: [127.0.0.1], send: v2}
        """)
    assert config.listeners[0].proxy_protocol.send == 'v2'   # they compose (test_udp_quicroute)


def test_routes_that_require_an_alpn(tmp_path):
    config = load_text(tmp_path, """\
        upstreams:
          a: {servers: [127.0.0.1:9000]}
          h3: {servers: [127.0.0.1:9001]}
        listeners:
          - listen: 127.0.0.1:443
            protocol: udp
            sni_routes: {"a.example alpn=h3,h3-29": h3, "a.example": a}
        """)
    assert config.listeners[0].sni_routes == (('a.example alpn=h3,h3-29', 'h3'), ('a.example', 'a'))
    found = problems(tmp_path, """\
        upstreams:
          a: {servers: [127.0.0.1:9000]}
        listeners:
          - listen: 127.0.0.1:443
            sni_routes: {"a.example alpn=h2": a, "b.example alpn=": a}
          - listen: 127.0.0.1:443
            protocol: udp
            sni_routes: {"a.example alpn=": a, " alpn=h3": a}
        """)
    assert len(found) == 3, found           # (an ALPN route on tcp is fine: the first one)
    assert 'listeners[0].sni_routes' in found[0] and "b.example alpn=" in found[0]
    assert all("'NAME alpn=PROTO[,PROTO]'" in p for p in found), found
