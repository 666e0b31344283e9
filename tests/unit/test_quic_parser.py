"""The QUIC Initial reader (edge/quic.py) on the RFC samples of RFC 9001 and RFC 9369, on
the first datagrams of a real QUIC stack (aioquic), on Initials sealed by hand with any
frames, and on garbage: nothing but QuicError ever comes out of it."""

import itertools
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.quic import (aioquic_initials, client_hello, crypto_frame, long_packet, seal_initial,
                          split_initials, varint)
from mpproxy.proxy.edge import quic
from mpproxy.proxy.edge.quic import (DONE, MAX_CRYPTO, MAX_PACKETS, MAX_PIECES, MORE, NOT_QUIC, V1,
                                     V2, ClientHelloReader, QuicError, client_initial_keys,
                                     MIN_INITIAL_DATAGRAM, initial_dcid)

RFC_DCID = bytes.fromhex('8394c8f03e515708')
DCID = bytes.fromhex('00112233445566778899')
ROOT = Path(__file__).resolve().parents[2]

# RFC 9001 A.2 and RFC 9369 A.2: the CRYPTO frame of the client's first Initial (before its
# PADDING to 1162 bytes of payload), and the protected packet each RFC gives for it with
# packet number 2 (v1, then v2).
CRYPTO_FRAME = bytes.fromhex(
    '060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868'
    '04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578'
    '616d706c652e636f6dff01000100000a00080006001d00170018001000070005'
    '04616c706e000500050100000000003300260024001d00209370b2c9caa47fba'
    'baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400'
    '0d0010000e0403050306030203080408050806002d00020101001c0002400100'
    '3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000'
    '75300901100f088394c8f03e51570806048000ffff')
RFC9001_INITIAL = bytes.fromhex(
    'c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11'
    'd242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399'
    '1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c'
    '8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212'
    '30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5'
    '457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208'
    '4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec'
    '4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3'
    '485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db'
    '059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c'
    '7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8'
    '9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556'
    'be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74'
    '68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a'
    'c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00'
    'f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632'
    '291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964'
    '25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd'
    '14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff'
    'ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198'
    'e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd'
    'c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73'
    '203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f'
    'cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e'
    'fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade'
    'a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047'
    '90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2'
    '162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4'
    '40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0'
    '6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e'
    '8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0'
    'be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400'
    '54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab'
    '760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9'
    'f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4'
    '056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064'
    '7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241'
    'e221af44860018ab0856972e194cd934')
RFC9369_INITIAL = bytes.fromhex(
    'd76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485'
    'dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04'
    '9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d'
    '250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a'
    '12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500'
    'cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68'
    '18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33'
    '12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3'
    'd396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd'
    '6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520'
    'bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045'
    '636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f'
    'ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12'
    '16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5'
    '4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4'
    'fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b'
    '8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7'
    '14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9'
    '9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91'
    'abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd'
    '80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db'
    '848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18'
    'd703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15'
    'c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc'
    '7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61'
    'f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710'
    '10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b'
    '3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e'
    '06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce'
    '8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1'
    '34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1'
    'e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd'
    '5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3'
    '8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89'
    'd5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53'
    '6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19'
    '9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b'
    'a18b2faa745b6fe189cf772a9f84cbfc')


def read(datagrams, pad: bool = True) -> tuple[list[str], ClientHelloReader]:
    """Feed `datagrams` to a new reader; a first one under 1200 bytes is padded to 1200 with
    zero bytes after its packets (as the client must: RFC 9000 14.1), unless not `pad`."""
    reader = ClientHelloReader()
    datagrams = list(datagrams)
    if pad and datagrams and len(datagrams[0]) < MIN_INITIAL_DATAGRAM:
        datagrams[0] = datagrams[0] + bytes(MIN_INITIAL_DATAGRAM - len(datagrams[0]))
    return [reader.feed(d) for d in datagrams], reader


def first_packet(datagram: bytes) -> bytes:
    """The first long-header packet of a datagram, by its Length field (token length 0)."""
    p = 6 + datagram[5]
    p += 1 + datagram[p] + 1                          # scid, token length
    size = 1 << (datagram[p] >> 6)
    length = int.from_bytes(datagram[p:p + size], 'big') & ((1 << (8 * size - 2)) - 1)
    return datagram[:p + size + length]


@lru_cache(maxsize=None)
def spanning(version: int, packets: int) -> tuple[bytes, ...]:
    """aioquic's first datagrams when its ClientHello spans `packets` Initial packets: the
    ALPN list is made long (a stand-in for post-quantum key shares)."""
    alpn = ['h3'] + [f'pad{i:02d}-' + 'x' * 200 for i in range({2: 5, 3: 10}[packets])]
    datagrams = tuple(aioquic_initials('www.Example.org', alpn, version))
    assert len(datagrams) == packets
    for datagram in datagrams:                 # one packet each, then (aioquic) zero padding
        assert datagram[len(first_packet(datagram)):].strip(b'\x00') == b''
    return datagrams


# --- the RFC samples ------------------------------------------------------------------------

def test_rfc9001_a1_client_initial_keys():
    key, iv, hp = client_initial_keys(RFC_DCID, V1)
    assert key.hex() == '1f369613dd76d5467730efcbe3b1a22d'
    assert iv.hex() == 'fa044b2f42a3fd3b46fb255c'
    assert hp.hex() == '9f50449e04a0e810283a1e9933adedd2'


def test_rfc9369_a1_client_initial_keys():
    key, iv, hp = client_initial_keys(RFC_DCID, V2)
    assert key.hex() == '8b1a0bc121284290a29e0971b5cd045d'
    assert iv.hex() == '91f73e2351d8fa91660e909f'
    assert hp.hex() == '45b95e15235d6f45a6b19cbcb0294ba9'


@pytest.mark.parametrize('version, packet', [(V1, RFC9001_INITIAL), (V2, RFC9369_INITIAL)])
def test_rfc_a2_client_initial_gives_example_com(version, packet):
    states, reader = read([packet])
    assert states == [DONE]
    assert (reader.server_name, reader.alpn) == ('example.com', ('alpn',))
    assert (reader.dcid, reader.version) == (RFC_DCID, version)


@pytest.mark.parametrize('version, packet', [(V1, RFC9001_INITIAL), (V2, RFC9369_INITIAL)])
def test_the_test_sealer_makes_the_rfc_a2_packet(version, packet):
    """The Initials sealed by hand below are sealed as the RFCs do, byte for byte."""
    payload = CRYPTO_FRAME + bytes(1162 - len(CRYPTO_FRAME))
    assert seal_initial(RFC_DCID, payload, pn=2, version=version) == packet


def test_initial_dcid_reads_the_header_only():
    assert initial_dcid(RFC9001_INITIAL) == RFC_DCID
    assert initial_dcid(RFC9369_INITIAL) == RFC_DCID
    assert initial_dcid(RFC9001_INITIAL[:16]) == RFC_DCID          # up to the SCID is enough
    assert initial_dcid(RFC9001_INITIAL[:14]) is None              # the DCID is cut
    assert initial_dcid(long_packet(DCID, 'handshake', bytes(40))) is None
    assert initial_dcid(long_packet(DCID, '0rtt', bytes(40), V2)) is None
    v1_type_in_v2 = bytearray(RFC9369_INITIAL)
    v1_type_in_v2[0] &= 0xCF                                        # type 0: Retry in v2
    assert initial_dcid(bytes(v1_type_in_v2)) is None
    draft29 = b'\xc0\xff\x00\x00\x1d' + RFC9001_INITIAL[5:]
    assert initial_dcid(draft29) is None
    short_dcid = b'\xc0\x00\x00\x00\x01\x07' + RFC_DCID[:7] + b'\x00\x00\x41\x00' + bytes(60)
    assert initial_dcid(short_dcid) is None                         # RFC 9000 7.2: 8 bytes or more
    assert initial_dcid(b'\x40' + RFC_DCID + bytes(40)) is None     # a short header
    assert initial_dcid(b'') is None


# --- aioquic, a real QUIC stack -------------------------------------------------------------

@pytest.mark.parametrize('version', [V1, V2])
def test_aioquic_initial_in_one_packet(version):
    datagrams = aioquic_initials('Shop.Example.com.', ['h3', 'h3-29'], version)
    assert len(datagrams) == 1
    states, reader = read(datagrams)
    assert states == [DONE]
    assert (reader.server_name, reader.alpn) == ('shop.example.com', ('h3', 'h3-29'))
    assert reader.dcid == initial_dcid(datagrams[0]) and len(reader.dcid) >= 8
    assert reader.version == version


@pytest.mark.parametrize('version', [V1, V2])
def test_aioquic_without_server_name(version):
    states, reader = read(aioquic_initials(None, ['h3'], version))
    assert states == [DONE] and reader.server_name is None and reader.alpn == ('h3',)


@pytest.mark.parametrize('version', [V1, V2])
@pytest.mark.parametrize('packets', [2, 3])
def test_aioquic_hello_over_several_packets_in_order(version, packets):
    states, reader = read(spanning(version, packets))
    assert states == [MORE] * (packets - 1) + [DONE]
    assert reader.server_name == 'www.example.org'
    assert reader.alpn[0] == 'h3' and len(reader.alpn) == {2: 6, 3: 11}[packets]


@pytest.mark.parametrize('version', [V1, V2])
@pytest.mark.parametrize('packets', [2, 3])
def test_aioquic_hello_over_several_packets_in_any_order(version, packets):
    datagrams = spanning(version, packets)
    for order in itertools.permutations(datagrams):
        states, reader = read(order)
        assert states == [MORE] * (packets - 1) + [DONE]
        assert reader.server_name == 'www.example.org'


@pytest.mark.parametrize('version', [V1, V2])
def test_aioquic_packets_coalesced_in_one_datagram(version):
    one, two, three = (first_packet(d) for d in spanning(version, 3))
    assert read([three + one + two])[0] == [DONE]
    states, reader = read([two + three, one + bytes(100)])
    assert states == [MORE, DONE] and reader.server_name == 'www.example.org'
    assert read([three + bytes(10) + one + two])[0] == [MORE]     # nothing after the padding


def test_aioquic_retransmitted_and_duplicated_datagrams():
    one, two = spanning(V1, 2)
    assert read([one, one, one, two, two])[0] == [MORE, MORE, MORE, DONE, DONE]


# --- coalesced packets and what the reader ignores ----------------------------------------------

def test_initial_then_0rtt_then_zero_padding_in_one_datagram():
    hello = client_hello('zero.example', (b'h3',))
    datagram = (seal_initial(DCID, crypto_frame(0, hello))
                + long_packet(DCID, '0rtt', b'\x99' * 300) + bytes(200))
    states, reader = read([datagram])
    assert states == [DONE] and reader.server_name == 'zero.example'


def test_0rtt_before_the_initial_tail_is_skipped():
    hello = client_hello('late.example', padding=2000)
    one, two = split_initials(DCID, hello, 2)
    zero_rtt = long_packet(DCID, '0rtt', bytes(1100))
    assert read([one, zero_rtt, two])[0] == [MORE, MORE, DONE]


def test_a_packet_of_another_dcid_after_the_first_is_ignored():
    hello = client_hello('first.example', padding=1500)
    one, two = split_initials(DCID, hello, 2)
    other = split_initials(b'\x77' * 8, hello, 2)[1]
    # were it read, `other` would not decrypt with this flow's keys: a QuicError
    assert read([one + other])[0] == [MORE]
    assert read([one + other, two])[0] == [MORE, DONE]
    assert read([one + other + two])[0] == [DONE]


def test_packets_after_a_first_packet_of_another_dcid_are_ignored():
    """RFC 9000 12.2: the first packet of a datagram says whose it is."""
    hello = client_hello('first.example', padding=1500)
    one, two = split_initials(DCID, hello, 2)
    stranger = split_initials(b'\x77' * 8, hello, 2)[0]
    assert read([one, stranger + two])[0] == [MORE, MORE]
    assert read([one, stranger + two, two])[0] == [MORE, MORE, DONE]


def test_datagrams_of_another_connection_or_no_quic_at_all_are_ignored_mid_flow():
    hello = client_hello('mid.example', padding=1500)
    one, two = split_initials(DCID, hello, 2)
    stranger = split_initials(b'\x55' * 8, hello, 2)[0]
    v2_same_dcid = split_initials(DCID, hello, 2, V2)[0]
    states, reader = read([one, stranger, v2_same_dcid, b'\x40' + bytes(50), b'junk', two])
    assert states == [MORE] * 5 + [DONE]
    assert (reader.dcid, reader.version) == (DCID, V1)


def test_hello_in_three_packets_across_two_datagrams_out_of_order():
    hello = client_hello('three.example', (b'h3',), padding=2800)
    one, two, three = split_initials(DCID, hello, 3, V2)
    states, reader = read([three + one, two])
    assert states == [MORE, DONE] and reader.server_name == 'three.example'


def test_many_crypto_frames_out_of_order_in_one_packet_and_overlapping():
    hello = client_hello('frames.example', (b'h3',))
    frames = [crypto_frame(i, hello[i:i + 40]) for i in range(0, len(hello), 30)]   # overlapping
    states, reader = read([seal_initial(DCID, b''.join(reversed(frames)))])
    assert states == [DONE] and reader.alpn == ('h3',)


def test_ping_ack_and_connection_close_frames_are_read():
    hello = client_hello('frames.example')
    ack = b'\x02' + varint(5) + varint(0) + varint(1) + varint(2) + varint(0) + varint(1)
    ack_ecn = b'\x03' + varint(1) + varint(0) + varint(0) + varint(1) + varint(7) * 3
    close = b'\x1c' + varint(0) + varint(6) + varint(3) + b'bye'
    payload = b'\x01' + ack + ack_ecn + close + b'\x00' * 5 + crypto_frame(0, hello)
    assert read([seal_initial(DCID, payload)])[0] == [DONE]


@pytest.mark.parametrize('pn, pn_len', [(0, 1), (1, 2), (7, 3), (300, 2), (70000, 4)])
def test_packet_number_lengths(pn, pn_len):
    packet = seal_initial(DCID, crypto_frame(0, client_hello('pn.example')), pn=pn, pn_len=pn_len,
                          scid=b'\x01\x02\x03', token=b't' * 30)
    assert read([packet])[0] == [DONE]


def test_a_later_packet_number_is_decoded_from_the_largest_seen():
    """pn 256 sent in one byte (0x00) decodes to 256 only after pn 200 was read."""
    hello = client_hello('pn.example', padding=1500)
    head, tail = hello[:700], hello[700:]
    first = seal_initial(DCID, crypto_frame(0, head), pn=200, pn_len=2)
    second = seal_initial(DCID, crypto_frame(700, tail), pn=256, pn_len=1)
    assert read([first, second])[0] == [MORE, DONE]
    with pytest.raises(QuicError, match='decrypt'):
        read([second])


# --- what is not a QUIC Initial -----------------------------------------------------------------

@pytest.mark.parametrize('datagram', [
    b'', b'\x00', b'GET / HTTP/1.1\r\n\r\n',
    bytes.fromhex('12340100000100000000000003777777076578616d706c6503636f6d0000010001'),   # DNS
    b'\x40' + bytes(1199),                                                  # a short header
    b'\xc0\x00\x00\x00\x00\x08' + RFC_DCID + b'\x00' + bytes(8),           # version negotiation
    b'\xc0\xff\x00\x00\x1d' + RFC9001_INITIAL[5:],                         # draft-29
], ids=['empty', 'one-byte', 'http', 'dns', 'short-header', 'version-negotiation', 'draft-29'])
def test_not_quic_leaves_the_reader_fresh(datagram):
    reader = ClientHelloReader()
    assert reader.feed(datagram) == NOT_QUIC
    assert reader.dcid is None and reader.version is None
    assert reader.feed(RFC9001_INITIAL) == DONE


def test_a_first_datagram_that_starts_with_0rtt_or_handshake_is_not_quic():
    for kind in ('0rtt', 'handshake'):
        datagram = long_packet(DCID, kind, bytes(100)) + seal_initial(DCID, b'\x01')
        assert read([datagram])[0] == [NOT_QUIC]


# --- what is an error ----------------------------------------------------------------------------

@pytest.mark.parametrize('where', [-1, -16, 30, 600])
def test_a_corrupted_byte_does_not_decrypt(where):
    packet = bytearray(RFC9001_INITIAL)
    packet[where] ^= 0x01
    reader = ClientHelloReader()
    with pytest.raises(QuicError, match='does not decrypt'):
        reader.feed(bytes(packet))
    with pytest.raises(QuicError, match='does not decrypt'):     # failed for good
        reader.feed(RFC9001_INITIAL)


def test_a_changed_dcid_gives_other_keys():
    packet = bytearray(RFC9001_INITIAL)
    packet[6] ^= 0x80
    with pytest.raises(QuicError, match='does not decrypt'):
        read([bytes(packet)])


@pytest.mark.parametrize('cut', [1199, 1000, 60, 23])
def test_a_truncated_initial_is_an_error(cut):
    with pytest.raises(QuicError, match=f'a datagram of {cut} bytes'):     # before any crypto
        read([RFC9001_INITIAL[:cut]], pad=False)
    with pytest.raises(QuicError):
        read([RFC9001_INITIAL[:cut] + bytes(1200)], pad=False)       # its packet cut short


@pytest.mark.parametrize('frame', [b'\x08\x00\x01x', b'\x1d\x00\x00', b'\x07\x00', b'\x1e',
                                   b'\x40\x06\x00\x00'],
                         ids=['stream', 'application-close', 'new-token', 'handshake-done',
                              'crypto-in-two-bytes'])
def test_frames_not_allowed_in_an_initial(frame):
    payload = crypto_frame(0, client_hello('x.example')[:20]) + frame
    with pytest.raises(QuicError, match='frame type'):
        read([seal_initial(DCID, payload)])


@pytest.mark.parametrize('payload, message', [
    (crypto_frame(0, b'abc')[:-1], 'past the end'),
    (b'\x06' + varint(0), 'inside a field'),
    (b'\x02' + varint(1) + varint(0) + varint(1000) + varint(0), 'more ranges'),
    (b'\x1c\x00\x00' + varint(50) + b'short', 'past the end'),
], ids=['crypto', 'crypto-length', 'ack-ranges', 'close-reason'])
def test_truncated_frames(payload, message):
    with pytest.raises(QuicError, match=message):
        read([seal_initial(DCID, payload)])


def test_an_initial_without_frames_or_with_reserved_bits():
    with pytest.raises(QuicError, match='without frames'):
        read([seal_initial(DCID, b'')])
    with pytest.raises(QuicError, match='reserved'):
        read([seal_initial(DCID, b'\x01', reserved=2)])


def test_a_handshake_message_that_is_not_a_client_hello():
    with pytest.raises(QuicError, match='not ClientHello'):
        read([seal_initial(DCID, crypto_frame(0, b'\x02\x00\x00\x10' + bytes(16)))])


@pytest.mark.parametrize('extensions', [
    b'\x00\x10\x00\x03\x00\x02\x00',                   # an ALPN entry of length 0
    b'\x00\x10\x00\x04\x00\x02\x05h',                  # an ALPN entry past its list
    b'\x00\x00\x00\x05\x00\x03\x00\x00\x00',           # a second server_name
    b'\x00\x2b\x00\x09\x02',                           # an extension past the hello
    b'\x00',                                           # a byte after the last extension
], ids=['empty-alpn', 'long-alpn', 'two-names', 'long-extension', 'trailing-byte'])
def test_a_malformed_client_hello(extensions):
    hello = client_hello('bad.example', extensions=extensions)
    with pytest.raises(QuicError, match='malformed ClientHello'):
        read([seal_initial(DCID, crypto_frame(0, hello))])


def test_alpn_that_is_not_ascii_is_escaped():
    hello = client_hello('alpn.example', (b'h3', b'\xffbin'))
    states, reader = read([seal_initial(DCID, crypto_frame(0, hello))])
    assert states == [DONE] and reader.alpn == ('h3', '\\xffbin')


# --- bounds -------------------------------------------------------------------------------------

def test_crypto_data_past_the_bound():
    packet = seal_initial(DCID, crypto_frame(MAX_CRYPTO - 10, bytes(11)))
    with pytest.raises(QuicError, match=f'past {MAX_CRYPTO}'):
        read([packet])
    assert read([seal_initial(DCID, crypto_frame(MAX_CRYPTO - 10, bytes(10)))])[0] == [MORE]


def test_a_client_hello_longer_than_the_bound():
    head = b'\x01' + (MAX_CRYPTO - 3).to_bytes(3, 'big')
    with pytest.raises(QuicError, match='more than'):
        read([seal_initial(DCID, crypto_frame(0, head))])
    just = b'\x01' + (MAX_CRYPTO - 4).to_bytes(3, 'big')
    assert read([seal_initial(DCID, crypto_frame(0, just))])[0] == [MORE]


def test_the_largest_hello_that_fits_the_bound_is_read():
    hello = client_hello('big.example', (b'h3',), padding=0)
    hello = client_hello('big.example', (b'h3',), padding=MAX_CRYPTO - len(hello) - 4)
    assert len(hello) == MAX_CRYPTO
    states, reader = read(split_initials(DCID, hello, 15))
    assert states == [MORE] * 14 + [DONE] and reader.server_name == 'big.example'


def test_too_many_packets():
    one = split_initials(DCID, client_hello('many.example', padding=1500), 2)[0]
    reader = ClientHelloReader()
    for _ in range(MAX_PACKETS):
        assert reader.feed(one) == MORE
    with pytest.raises(QuicError, match='packets'):
        reader.feed(one)


def test_too_many_ignored_datagrams():
    one = split_initials(DCID, client_hello('many.example', padding=1500), 2)[0]
    reader = ClientHelloReader()
    assert reader.feed(one) == MORE
    for _ in range(MAX_PACKETS - 1):
        assert reader.feed(b'not quic') == MORE
    with pytest.raises(QuicError, match='packets'):
        reader.feed(b'not quic')


def test_crypto_data_in_too_many_pieces():
    frames = [crypto_frame(4 + 2 * i, b'x') for i in range(MAX_PIECES + 1)]   # holes between
    with pytest.raises(QuicError, match='pieces'):
        read([seal_initial(DCID, b''.join(frames[:MAX_PIECES + 1]))])
    assert read([seal_initial(DCID, b''.join(frames[:MAX_PIECES]))])[0] == [MORE]


def test_a_datagram_of_many_tiny_packets_stops_at_the_bound():
    tiny = seal_initial(DCID, b'\x01' * 4)
    with pytest.raises(QuicError, match='packets'):
        read([tiny * (MAX_PACKETS + 1)])


# --- fuzzing: nothing but QuicError, and an answer every time ----------------------------------

def _feed_all(datagrams) -> ClientHelloReader:
    """Feed them all (the first padded to 1200 bytes with zeros after its packets, as a
    client must pad it, so that it reaches the parser past the size check): only MORE,
    DONE, NOT_QUIC or QuicError. Returns the reader."""
    reader = ClientHelloReader()
    datagrams = list(datagrams)
    if datagrams and len(datagrams[0]) < MIN_INITIAL_DATAGRAM:
        datagrams[0] += bytes(MIN_INITIAL_DATAGRAM - len(datagrams[0]))
    try:
        for datagram in datagrams:
            assert reader.feed(datagram) in (MORE, DONE, NOT_QUIC)
    except QuicError:
        pass
    return reader


@pytest.mark.timeout(120)
@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=1500), min_size=1, max_size=4))
def test_garbage_never_raises_but_quic_error(datagrams):
    _feed_all(datagrams)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_after_a_quic_long_header_never_raises_but_quic_error(tail):
    for initial in (RFC9001_INITIAL, RFC9369_INITIAL):
        assert _feed_all([initial[:6 + 8 + 1] + tail]).dcid is not None    # keys derived


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None)
@given(st.sampled_from([(V1, 0), (V1, 1), (V2, 0), (V2, 2)]), st.integers(min_value=0),
       st.booleans())
def test_truncated_real_initials_never_raise_but_quic_error(which, cut, with_first):
    version, index = which
    datagrams = spanning(version, 3)
    datagram = datagrams[index]
    cut %= len(datagram)
    fed = ([datagrams[0]] if with_first and index else []) + [datagram[:cut]]
    _feed_all(fed)


@pytest.mark.timeout(120)
@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_corrupted_real_initials_never_raise_but_quic_error(pos, byte):
    packet = bytearray(RFC9369_INITIAL)
    packet[pos % len(packet)] = byte
    _feed_all([bytes(packet)])


frame_like = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.sampled_from([b'\x00', b'\x01', b'\x02', b'\x03', b'\x06', b'\x1c']),
              st.lists(st.integers(min_value=0, max_value=(1 << 62) - 1).map(varint), max_size=8),
              st.binary(max_size=40)).map(lambda t: t[0] + b''.join(t[1]) + t[2]))


@pytest.mark.timeout(120)
@settings(max_examples=500, deadline=None)
@given(st.lists(frame_like, max_size=8), st.integers(min_value=1, max_value=4))
def test_any_frames_in_a_sealed_initial_never_raise_but_quic_error(frames, pn_len):
    """Past the AEAD: the frame walk and the ClientHello walk on arbitrary plaintext."""
    assert _feed_all([seal_initial(DCID, b''.join(frames) + bytes(4), pn_len=pn_len)]).dcid == DCID


@pytest.mark.timeout(120)
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=2))
def test_any_client_hello_body_never_raises_but_quic_error(body, cut):
    message = b'\x01' + len(body).to_bytes(3, 'big') + body
    assert _feed_all([seal_initial(DCID, crypto_frame(0, message[:len(message) - cut]))]).dcid


@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=MAX_CRYPTO + 100),
                          st.binary(min_size=1, max_size=50)), max_size=40))
def test_any_crypto_frames_never_raise_but_quic_error(pieces):
    payload = b''.join(crypto_frame(offset, data) for offset, data in pieces) or b'\x01'
    assert _feed_all([seal_initial(DCID, payload)]).dcid == DCID


# --- the optional dependency ------------------------------------------------------------------

def test_available_with_cryptography_installed():
    assert quic.available() is True


def test_edge_imports_without_cryptography():
    script = (
        "import sys\n"
        "sys.modules['cryptography'] = None\n"          # as if it were not installed
        "from mpproxy.proxy.edge import quic\n"
        f"packet = bytes.fromhex('{RFC9001_INITIAL.hex()}')\n"
        "assert not quic.available()\n"
        f"assert quic.initial_dcid(packet) == bytes.fromhex('{RFC_DCID.hex()}')\n"
        f"assert quic.client_initial_keys(quic.initial_dcid(packet))[0].hex() == "
        "'1f369613dd76d5467730efcbe3b1a22d'\n"
        "try:\n"
        "    quic.ClientHelloReader()\n"
        "except ImportError:\n"
        "    print('no reader')\n"
    )
    done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={'PYTHONPATH': str(ROOT)})
    assert (done.returncode, done.stdout, done.stderr) == (0, 'no reader\n', '')


def test_pyproject_declares_the_quic_extra():
    import tomllib
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    extras = project['optional-dependencies']
    assert any(d.startswith('cryptography') for d in extras['quic'])
    assert {'cryptography', 'aioquic'} <= {d.split('>')[0].split('=')[0] for d in extras['test']}
    assert not any(d.startswith('cryptography') for d in project['dependencies'])
