"""parse_sni on real ClientHellos from Python's ssl module, on fragments and on garbage."""

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.net import client_hello
from mpproxy.proxy.edge.sni import FOUND, MORE, NOT_TLS, SniRouter, hello_names, parse_sni


def test_real_client_hello_gives_the_name():
    assert parse_sni(client_hello('www.Example.com')) == (FOUND, 'www.example.com')


def test_hello_without_sni():
    assert parse_sni(client_hello(None)) == (FOUND, None)


def test_every_prefix_asks_for_more():
    hello = client_hello('a.example.org')
    for cut in range(len(hello)):
        assert parse_sni(hello[:cut]) == (MORE, None), cut


def test_hello_split_over_two_records():
    hello = client_hello('split.example.net')
    body = hello[5:]
    half = len(body) // 2
    two = (b'\x16\x03\x01' + half.to_bytes(2, 'big') + body[:half]
           + b'\x16\x03\x01' + (len(body) - half).to_bytes(2, 'big') + body[half:])
    assert parse_sni(two) == (FOUND, 'split.example.net')


def test_hello_names_gives_the_alpn_protocols_too():
    import ssl
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(['h2', 'http/1.1'])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname='alpn.example.com')
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()[5:]                        # one record: the handshake message
    assert hello_names(hello[4:]) == ('alpn.example.com', ('h2', 'http/1.1'))
    assert hello_names(client_hello(None)[9:]) == (None, ())


def with_extension(record: bytes, extension: bytes) -> bytes:
    """A one-record ClientHello with `extension` appended to its extensions."""
    body = record[9:]
    p = 34
    p += 1 + body[p]                                    # session id
    p += 2 + int.from_bytes(body[p:p + 2], 'big')       # cipher suites
    p += 1 + body[p]                                    # compression methods
    total = int.from_bytes(body[p:p + 2], 'big') + len(extension)
    body = body[:p] + total.to_bytes(2, 'big') + body[p + 2:] + extension
    hello = b'\x01' + len(body).to_bytes(3, 'big') + body
    return record[:3] + len(hello).to_bytes(2, 'big') + hello


def test_a_hello_with_two_server_names_is_not_tls():
    """RFC 8446 4.2: one extension of each type; which name would the server see?"""
    hello = client_hello('one.example')
    second = b'\x00\x00\x00\x0f\x00\x0d\x00\x00\x0aother.test'
    assert parse_sni(with_extension(hello, b'\x00\x2a\x00\x00')) == (FOUND, 'one.example')
    assert parse_sni(with_extension(hello, second)) == (NOT_TLS, None)


def test_not_tls():
    assert parse_sni(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')[0] == NOT_TLS
    assert parse_sni(b'\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00')[0] == NOT_TLS   # not a ClientHello


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_garbage_never_raises(data):
    state, name = parse_sni(data)
    assert state in (MORE, FOUND, NOT_TLS)


@functools.cache
def fuzz_hello() -> bytes:
    return client_hello('fuzz.example.com', ('h2', 'http/1.1'))     # one ssl context, not 300


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=4000), st.integers(min_value=0, max_value=255))
def test_corrupted_hello_never_raises(pos, byte):
    hello = bytearray(fuzz_hello())
    hello[pos % len(hello)] = byte
    assert parse_sni(bytes(hello))[0] in (MORE, FOUND, NOT_TLS)


def test_router_exact_then_longest_wildcard_then_default():
    r = SniRouter([('*.example.com', 'wild'), ('*.api.example.com', 'api'),
                   ('www.example.com', 'www'), ('default', 'dflt')])
    assert r.route('www.example.com') == 'www'
    assert r.route('x.api.example.com') == 'api'
    assert r.route('shop.example.com') == 'wild'
    assert r.route('example.com') == 'dflt'
    assert r.route(None) == 'dflt'


def test_the_router_picks_by_name_then_alpn():
    routes = [('api.example alpn=h3', 'H3'), ('api.example', 'API'),
              ('*.example alpn=h3,h3-29', 'WILD3'), ('*.x.example alpn=doq', 'DOQ'),
              ('default alpn=h3', 'D3'), ('default', 'D')]
    router = SniRouter(routes)
    assert router.route('api.example', ('h3',)) == 'H3'
    assert router.route('api.example', ('h2', 'h3')) == 'H3'
    assert router.route('api.example', ('doq',)) == 'API'      # the name's plain route
    assert router.route('www.example', ('h3-29',)) == 'WILD3'
    assert router.route('www.example', ('doq',)) == 'D'        # no plain *.example: default
    assert router.route('a.x.example', ('h3',)) == 'WILD3'     # *.x.example has no h3 route
    assert router.route('a.x.example', ('doq',)) == 'DOQ'
    assert router.route('other.org', ('h3',)) == 'D3'
    assert router.route(None, ()) == 'D'
    assert router.fallback() == 'D'
    assert sorted(set(router.values())) == ['API', 'D', 'D3', 'DOQ', 'H3', 'WILD3']
    only = SniRouter([('default alpn=h3', 'D3')])
    assert (only.route('x', ('h2',)), only.fallback()) == (None, None)
