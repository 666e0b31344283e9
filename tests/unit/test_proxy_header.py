"""PROXY protocol v1/v2: headers written by hand from the spec, every refusal, round trips."""

import array
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpproxy.proxy.edge.proxy_header import (DONE, INVALID, MAX_V1, MORE, V2_SIGNATURE, ProxyHeader,
                                             parse, v1, v2)

SIG = '0d0a0d0a000d0a515549540a'
# TCP over IPv4, 192.0.2.1:1234 -> 198.51.100.2:80: PROXY (21), INET+STREAM (11), 12 bytes
V2_TCP4 = bytes.fromhex(SIG + '21 11 000c' + 'c0000201 c6336402' + '04d2 0050')
# UDP over IPv6, [2001:db8::1]:443 -> [2001:db8::2]:8443: PROXY (21), INET6+DGRAM (22), 36 bytes
V2_UDP6 = bytes.fromhex(SIG + '21 22 0024'
                        + '20010db8000000000000000000000001'
                        + '20010db8000000000000000000000002' + '01bb 20fb')
V2_LOCAL = bytes.fromhex(SIG + '20 00 0000')
# a TLV after the addresses: PP2_TYPE_AUTHORITY (02), 11 bytes, "example.com"
AUTHORITY = bytes.fromhex('02 000b') + b'example.com'
MORE_ = (MORE, None, 0, '')


def done(data):
    state, header, consumed, reason = parse(data)
    assert (state, reason) == (DONE, ''), reason
    return header, consumed


def refused(data):
    state, header, consumed, reason = parse(data)
    assert (state, header, consumed) == (INVALID, None, 0)
    return reason


# --- v1, known good -------------------------------------------------------------------------

def test_v1_tcp4_line_from_the_spec():
    line = b'PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n'
    header, consumed = done(line + b'GET / HTTP/1.1\r\n')
    assert consumed == len(line)
    assert header == ProxyHeader(1, False, 'tcp', ('192.168.0.1', 56324), ('192.168.0.11', 443))


def test_v1_tcp6_any_case_comes_back_canonical():
    header, _ = done(b'PROXY TCP6 2001:DB8:0:0::1 ::FFFF:192.0.2.1 0 65535\r\n')
    assert header.source == ('2001:db8::1', 0)
    assert header.destination == ('::ffff:192.0.2.1', 65535)


def test_v1_unknown_short_and_worst_case():
    assert done(b'PROXY UNKNOWN\r\n') == (ProxyHeader(1, True, None, None, None), 15)
    full = ':'.join(['ffff'] * 8)
    worst = f'PROXY UNKNOWN {full} {full} 65535 65535\r\n'.encode()
    assert len(worst) == MAX_V1
    assert done(worst + b'x') == (ProxyHeader(1, True, None, None, None), MAX_V1)


def test_v1_longest_tcp6_line_is_accepted():
    full = ':'.join(['ffff'] * 8)
    line = f'PROXY TCP6 {full} {full} 65535 65535\r\n'.encode()
    assert len(line) == 104 and done(line)[1] == 104


# --- v2, known good -------------------------------------------------------------------------

def test_v2_tcp4_from_hex():
    header, consumed = done(V2_TCP4 + b'payload')
    assert consumed == 16 + 12
    assert header == ProxyHeader(2, False, 'tcp', ('192.0.2.1', 1234), ('198.51.100.2', 80))


def test_v2_udp6_from_hex():
    header, consumed = done(V2_UDP6)
    assert consumed == 16 + 36
    assert header == ProxyHeader(2, False, 'udp', ('2001:db8::1', 443), ('2001:db8::2', 8443))


def test_v2_tlvs_after_the_addresses_are_kept_raw():
    data = bytes.fromhex(SIG + '21 11 001a' + 'c0000201 c6336402 04d2 0050') + AUTHORITY
    header, consumed = done(data + b'\x16\x03\x01')
    assert consumed == len(data) and header.tlvs == AUTHORITY


def test_v2_local_ignores_the_block_whatever_its_length():
    assert done(V2_LOCAL + b'x') == (ProxyHeader(2, True, None, None, None), 16)
    # LOCAL with an INET block: the receiver must skip `length` bytes, not assume zero
    data = bytes.fromhex(SIG + '20 11 000c' + 'c0000201 c6336402 04d2 0050')
    assert done(data + b'x') == (ProxyHeader(2, True, None, None, None), 28)


@pytest.mark.parametrize('fam, length', [('00', 0), ('31', 216), ('32', 216), ('10', 12)])
def test_v2_proxy_for_a_family_we_do_not_relay_is_local(fam, length):
    """UNSPEC, AF_UNIX, or no transport: accept and use the connection's own addresses."""
    data = bytes.fromhex(SIG + '21' + fam) + length.to_bytes(2, 'big') + bytes(length)
    assert done(data + b'x') == (ProxyHeader(2, True, None, None, None), 16 + length)


def test_bytearray_and_memoryview_inputs():
    for kind in (bytearray, memoryview):
        assert done(kind(V2_TCP4))[0].source == ('192.0.2.1', 1234)
        assert done(kind(b'PROXY UNKNOWN\r\n'))[1] == 15
    assert parse(memoryview(V2_TCP4 + b'abcd')[4:]) == (INVALID, None, 0,
                                                           'not a PROXY protocol header')


def test_memoryview_of_wider_items_is_read_as_bytes():
    words = memoryview(array.array('H', [0x0a0d, 0x0a0d]))
    assert parse(words) == MORE_                       # \r\n\r\n: a v2 signature so far


# --- MORE and INVALID -----------------------------------------------------------------------

def test_empty_input_asks_for_more():
    assert parse(b'') == MORE_


@pytest.mark.parametrize('header', [V2_TCP4, V2_UDP6, V2_LOCAL, b'PROXY UNKNOWN\r\n',
                                    b'PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n'])
def test_every_strict_prefix_of_a_known_header_asks_for_more(header):
    for cut in range(len(header)):
        assert parse(header[:cut]) == MORE_, cut


@pytest.mark.parametrize('data', [b'G', b'GET / HTTP/1.1\r\n', b'PROXY\r\n', b'proxy ',
                                  b'\r\n\r\n\x00\r\nQUIX', b'\r\r', b'\x16\x03\x01'])
def test_not_a_proxy_header_at_the_first_wrong_byte(data):
    assert refused(data) == 'not a PROXY protocol header'


def test_v1_line_too_long():
    assert refused(b'PROXY ' + b'x' * (MAX_V1 - 6)) == 'v1 line too long'
    assert parse(b'PROXY ' + b'x' * (MAX_V1 - 7)) == MORE_
    unknown = b'PROXY UNKNOWN ' + b'a' * (MAX_V1 - 16)
    assert done(unknown + b'\r\n')[1] == MAX_V1
    assert refused(unknown + b'a\r\n') == 'v1 line too long'
    assert refused(unknown + b'a\r') == 'v1 line too long'   # its LF would be byte 108


@pytest.mark.parametrize('line', [b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n',
                                  b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx\n',
                                  b'PROXY UNKNOWN\n\r\n', b'PROXY UNKNOWN\r\r\n'])
def test_v1_line_must_end_with_crlf(line):
    assert refused(line) == 'v1 line not ended by CRLF'


@pytest.mark.parametrize('line', [b'PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n',
                                  b'PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n',
                                  b'PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n',
                                  b'PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n',
                                  b'PROXY UNKNOWNX\r\n', b'PROXY \r\n'])
def test_v1_protocol_must_be_tcp4_tcp6_or_unknown(line):
    assert refused(line) == 'bad v1 protocol'


@pytest.mark.parametrize('line', [b'PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n',
                                  b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n',
                                  b'PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n',
                                  b'PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n',
                                  b'PROXY TCP6\r\n'])
def test_v1_needs_exactly_four_single_spaced_fields(line):
    assert refused(line) == 'wrong number of fields in v1 header'


@pytest.mark.parametrize('host', ['1.2.3.256', '01.2.3.4', '1.2.3', '1.2.3.4.5', '::1',
                                  '0x1.2.3.4', 'localhost', '1.2.3.\xe9'])
def test_v1_tcp4_address_must_be_dotted_decimal(host):
    line = f'PROXY TCP4 {host} 5.6.7.8 1 2\r\n'.encode('latin-1')
    assert refused(line) == 'bad IPv4 address in v1 header'
    line = f'PROXY TCP4 5.6.7.8 {host} 1 2\r\n'.encode('latin-1')
    assert refused(line) == 'bad IPv4 address in v1 header'


@pytest.mark.parametrize('host', ['1.2.3.4', '2001:db8::1::2', 'fe80::1%eth0', '[::1]',
                                  '1:2:3:4:5:6:7:8:9', '::g'])
def test_v1_tcp6_address_must_be_ipv6(host):
    assert refused(f'PROXY TCP6 {host} ::1 1 2\r\n'.encode()) == 'bad IPv6 address in v1 header'


@pytest.mark.parametrize('port', [b'65536', b'080', b'00', b'+80', b'-1', b'8a', b'99999999',
                                  '\uff18\uff10'.encode()])
def test_v1_port_is_plain_decimal_up_to_65535(port):
    assert refused(b'PROXY TCP4 1.2.3.4 5.6.7.8 ' + port + b' 2\r\n') == 'bad port in v1 header'
    assert refused(b'PROXY TCP4 1.2.3.4 5.6.7.8 1 ' + port + b'\r\n') == 'bad port in v1 header'


@pytest.mark.parametrize('ver_cmd', [0x11, 0x31, 0x01, 0xf1])
def test_v2_version_must_be_2_and_is_checked_at_byte_13(ver_cmd):
    assert refused(V2_SIGNATURE + bytes([ver_cmd])) == 'bad v2 version'


@pytest.mark.parametrize('ver_cmd', [0x22, 0x2f])
def test_v2_command_must_be_local_or_proxy(ver_cmd):
    assert refused(V2_SIGNATURE + bytes([ver_cmd])) == 'bad v2 command'


@pytest.mark.parametrize('fam, reason', [(0x41, 'bad v2 address family'),
                                         (0xf1, 'bad v2 address family'),
                                         (0x13, 'bad v2 transport'),
                                         (0x2f, 'bad v2 transport')])
def test_v2_proxy_family_and_transport_are_checked_at_byte_14(fam, reason):
    assert refused(V2_SIGNATURE + bytes([0x21, fam])) == reason


@pytest.mark.parametrize('fam, length', [(0x11, 11), (0x12, 0), (0x21, 35), (0x22, 12)])
def test_v2_address_block_too_short_for_its_family(fam, length):
    head = V2_SIGNATURE + bytes([0x21, fam]) + length.to_bytes(2, 'big')
    assert refused(head) == 'v2 address block too short'    # known before the block arrives


def test_v2_waits_for_the_whole_block():
    head = bytes.fromhex(SIG + '20 00 ffff')
    assert parse(head + bytes(65534)) == MORE_
    assert done(head + bytes(65535))[1] == 16 + 65535


# --- writers --------------------------------------------------------------------------------

def test_writers_give_the_hand_written_bytes():
    assert v2(('192.0.2.1', 1234), ('198.51.100.2', 80)) == V2_TCP4
    assert v2(('2001:db8::1', 443), ('2001:db8::2', 8443), 'udp') == V2_UDP6
    assert v2(None, None) == V2_LOCAL
    assert v1(('192.0.2.1', 1234), ('198.51.100.2', 80)) == \
        b'PROXY TCP4 192.0.2.1 198.51.100.2 1234 80\r\n'
    assert v1(None, None) == b'PROXY UNKNOWN\r\n'


def test_mixed_families_travel_as_ipv4_mapped_ipv6():
    assert v1(('192.0.2.1', 1234), ('2001:db8::2', 80)) == \
        b'PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1234 80\r\n'
    header, _ = done(v2(('2001:db8::1', 1), ('198.51.100.2', 2), 'udp'))
    assert (header.transport, header.source, header.destination) == \
        ('udp', ('2001:db8::1', 1), ('::ffff:198.51.100.2', 2))


def test_writers_take_peername_tuples_and_drop_the_zone():
    assert v1(('fe80::1%eth0', 5, 0, 2), ('::1', 6, 0, 0)) == b'PROXY TCP6 fe80::1 ::1 5 6\r\n'


def test_v2_local_keeps_tlvs():
    assert done(v2(None, None, 'tcp', AUTHORITY)) == \
        (ProxyHeader(2, True, None, None, None, AUTHORITY), 16 + len(AUTHORITY))


@pytest.mark.parametrize('call', [
    lambda: v1(('example.com', 1), ('::1', 2)),
    lambda: v1(('1.2.3.4', 65536), ('1.2.3.4', 2)),
    lambda: v2(('1.2.3.4', 1), ('1.2.3.4', -1)),
    lambda: v2(('1.2.3.4', 1), ('1.2.3.4', 2), 'sctp'),
    lambda: v2(('::1', 1), ('::1', 2), 'tcp', bytes(65535 - 36 + 1)),
])
def test_writers_refuse_what_cannot_be_sent(call):
    with pytest.raises(ValueError):
        call()


# --- properties -----------------------------------------------------------------------------

def canonical(host):
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, host))


def as_sent(source, destination):
    """The (host, port) pairs a receiver must see: both IPv6 when the families differ."""
    if (':' in source[0]) != (':' in destination[0]):
        source, destination = [(h if ':' in h else '::ffff:' + h, p)
                               for h, p in (source, destination)]
    return (canonical(source[0]), source[1]), (canonical(destination[0]), destination[1])


hosts = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
endpoints = st.tuples(hosts, st.integers(min_value=0, max_value=65535))
transports = st.sampled_from(['tcp', 'udp'])
tlv_bytes = st.binary(max_size=64)
headers = st.one_of(
    st.builds(v1, endpoints, endpoints),
    st.builds(v2, endpoints, endpoints, transports, tlv_bytes),
    st.builds(v2, st.none(), st.none(), transports, tlv_bytes),
    st.just(b'PROXY UNKNOWN\r\n'),
)


@settings(max_examples=200)
@given(endpoints, endpoints)
def test_v1_round_trip(source, destination):
    header, _ = done(v1(source, destination))
    assert header == ProxyHeader(1, False, 'tcp', *as_sent(source, destination))


@settings(max_examples=200)
@given(endpoints, endpoints, transports, tlv_bytes)
def test_v2_round_trip(source, destination, transport, tlvs):
    header, _ = done(v2(source, destination, transport, tlvs))
    assert header == ProxyHeader(2, False, transport, *as_sent(source, destination), tlvs)


@settings(max_examples=100)
@given(headers)
def test_every_strict_prefix_of_a_valid_header_asks_for_more(header):
    for cut in range(len(header)):
        assert parse(header[:cut]) == MORE_, cut


@settings(max_examples=200)
@given(headers, st.binary(max_size=200))
def test_a_header_then_payload_consumes_exactly_the_header(header, payload):
    alone, consumed = done(header)
    assert consumed == len(header)
    assert done(header + payload) == (alone, consumed)


@settings(max_examples=200)
@given(headers, st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_a_corrupted_header_never_raises(header, pos, byte):
    data = bytearray(header)
    data[pos % len(data)] = byte
    state, parsed, consumed, reason = parse(data)
    assert state in (MORE, DONE, INVALID) and consumed <= len(data)


garbage = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
    st.binary(max_size=120).map(lambda b: b'PROXY ' + b),
    st.text(alphabet='PROXYTCP46UNKW0123456789abcdef:. \r\n', max_size=110)
      .map(lambda t: b'PROXY ' + t.encode()),
)


@settings(max_examples=500)
@given(garbage, st.sampled_from([bytes, bytearray, memoryview]))
def test_garbage_never_raises(data, kind):
    state, header, consumed, reason = parse(kind(data))
    assert state in (MORE, DONE, INVALID)
    assert 0 <= consumed <= len(data)
    assert (header is not None) == (state == DONE) and bool(reason) == (state == INVALID)
