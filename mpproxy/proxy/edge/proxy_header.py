"""The PROXY protocol, versions 1 and 2 (HAProxy `doc/proxy-protocol.txt`).

A proxy sends one PROXY header before the client's first byte to tell the
server who the client really was. `parse()` is a pure function over the first
bytes of a connection: it asks for more bytes, or returns the header and how
many bytes it took, or says in a short phrase why the bytes are not a valid
header. `v1()` and `v2()` build the header a proxy sends. No I/O here.

    v1 = "PROXY" SP ("TCP4" | "TCP6") SP src SP dst SP sport SP dport CRLF
       | "PROXY" SP "UNKNOWN" [anything] CRLF                 at most 107 bytes
    v2 = signature(12) ver_cmd(1) fam(1) length(2) block(length)
         ver_cmd = 0x2 << 4 | command       command   0 LOCAL, 1 PROXY
         fam     = family << 4 | transport  family    0 UNSPEC, 1 INET, 2 INET6, 3 UNIX
                                            transport 0 UNSPEC, 1 STREAM, 2 DGRAM
         block   = src dst sport(2) dport(2) tlvs   addresses: INET 12, INET6 36, UNIX 216 bytes
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

MORE, DONE, INVALID = 'more', 'done', 'invalid'
V1_PREFIX = b'PROXY '
V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
MAX_V1 = 107                # longest v1 line the spec allows, CRLF included
MAX_HEADER = 16 + 65535     # the v2 length field is 16 bits: no header is longer

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
_ADDRESS_BYTES = {_UNSPEC: 0, _INET: 12, _INET6: 36, _UNIX: 216}
_TRANSPORT_NAMES = {_UNSPEC: None, _STREAM: 'tcp', _DGRAM: 'udp'}
_TRANSPORT_CODES = {'tcp': _STREAM, 'udp': _DGRAM}
_V4_MAPPED = bytes(10) + b'\xff\xff'         # ::ffff:a.b.c.d
_MORE = (MORE, None, 0, '')


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What a PROXY header says about the connection it opens.

    `local`: the header carries no client address (v2 LOCAL, v1 UNKNOWN, or a v2
    family or transport we do not relay): use the connection's own addresses;
    `transport`, `source` and `destination` are then None. Hosts are in the
    canonical text of `socket.inet_ntop` (IPv6 without brackets).
    """
    version: int                  # 1 or 2
    local: bool
    transport: str | None         # 'tcp', 'udp' or None
    source: tuple | None          # (host, port)
    destination: tuple | None
    tlvs: bytes = b''             # v2 bytes after the addresses, raw; b'' for v1


def parse(data: bytes | bytearray | memoryview) -> tuple[str, ProxyHeader | None, int, str]:
    """(state, header, consumed, reason); never raises.

    (MORE, None, 0, '')            every byte so far fits a header: read more
    (DONE, header, consumed, '')   the first `consumed` bytes are the header
    (INVALID, None, 0, reason)     not a valid header; `reason` is for the log
    """
    if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
        data = data.tobytes()
    n = len(data)
    if bytes(data[:len(V1_PREFIX)]) == V1_PREFIX[:n]:
        return _parse_v1(bytes(data[:MAX_V1])) if n >= len(V1_PREFIX) else _MORE
    if bytes(data[:len(V2_SIGNATURE)]) == V2_SIGNATURE[:n]:
        return _parse_v2(data)
    return _invalid('not a PROXY protocol header')


def _invalid(reason: str) -> tuple[str, None, int, str]:
    return INVALID, None, 0, reason


def _parse_v1(window: bytes) -> tuple[str, ProxyHeader | None, int, str]:
    cr, lf = window.find(b'\r'), window.find(b'\n')
    if lf == -1 and cr in (-1, len(window) - 1):       # no line end yet, or a CR before its LF
        return _invalid('v1 line too long') if len(window) == MAX_V1 else _MORE
    if cr == -1 or lf != cr + 1:
        return _invalid('v1 line not ended by CRLF')
    fields = window[:cr].split(b' ')                   # fields[0] is b'PROXY'
    if fields[1] == b'UNKNOWN':
        return DONE, ProxyHeader(1, True, None, None, None), cr + 2, ''
    family = {b'TCP4': socket.AF_INET, b'TCP6': socket.AF_INET6}.get(fields[1])
    if family is None:
        return _invalid('bad v1 protocol')
    if len(fields) != 6:
        return _invalid('wrong number of fields in v1 header')
    source, destination = _v1_host(fields[2], family), _v1_host(fields[3], family)
    if source is None or destination is None:
        ip = 'IPv4' if family == socket.AF_INET else 'IPv6'
        return _invalid(f'bad {ip} address in v1 header')
    sport, dport = _v1_port(fields[4]), _v1_port(fields[5])
    if sport is None or dport is None:
        return _invalid('bad port in v1 header')
    header = ProxyHeader(1, False, 'tcp', (source, sport), (destination, dport))
    return DONE, header, cr + 2, ''


def _v1_host(field: bytes, family: int) -> str | None:
    try:
        text = field.decode('ascii')
        host = socket.inet_ntop(family, socket.inet_pton(family, text))
    except (OSError, ValueError):
        return None
    if family == socket.AF_INET and host != text:
        return None              # leading zeros (010.0.0.1): the spec forbids them, whatever the libc
    return host


def _v1_port(field: bytes) -> int | None:
    if not field.isdigit() or len(field) > 5 or (field.startswith(b'0') and field != b'0'):
        return None
    port = int(field)
    return port if port <= 65535 else None


def _parse_v2(data: bytes | bytearray | memoryview) -> tuple[str, ProxyHeader | None, int, str]:
    head = bytes(data[:16])
    if len(head) <= 12:
        return _MORE
    version, command = head[12] >> 4, head[12] & 0xF
    if version != 2:
        return _invalid('bad v2 version')
    if command not in (_LOCAL, _PROXY):
        return _invalid('bad v2 command')
    if len(head) == 13:
        return _MORE
    family, transport = head[13] >> 4, head[13] & 0xF
    if command == _PROXY and family not in _ADDRESS_BYTES:
        return _invalid('bad v2 address family')
    if command == _PROXY and transport not in _TRANSPORT_NAMES:
        return _invalid('bad v2 transport')
    if len(head) < 16:
        return _MORE
    length = int.from_bytes(head[14:16], 'big')
    addresses = _ADDRESS_BYTES.get(family, 0)
    relayed = command == _PROXY and family in (_INET, _INET6) and transport != _UNSPEC
    if relayed and length < addresses:
        return _invalid('v2 address block too short')
    if len(data) < 16 + length:
        return _MORE
    block = bytes(data[16:16 + length])
    if not relayed:                  # LOCAL, or a family we do not relay: the spec says accept it
        return DONE, ProxyHeader(2, True, None, None, None, block[addresses:]), 16 + length, ''
    af, size = (socket.AF_INET, 4) if family == _INET else (socket.AF_INET6, 16)
    ports = 2 * size
    source = (socket.inet_ntop(af, block[:size]), int.from_bytes(block[ports:ports + 2], 'big'))
    destination = (socket.inet_ntop(af, block[size:ports]),
                   int.from_bytes(block[ports + 2:ports + 4], 'big'))
    header = ProxyHeader(2, False, _TRANSPORT_NAMES[transport], source, destination,
                         block[addresses:])
    return DONE, header, 16 + length, ''


def v1(source: tuple | None, destination: tuple | None) -> bytes:
    """The v1 line for a TCP connection from `source` to `destination` ((host, port, ...)).

    TCP6 when either address is IPv6 (an IPv4 one is then sent as ::ffff:a.b.c.d);
    'PROXY UNKNOWN' when an address is None. ValueError on a host that is not an IP.
    """
    if source is None or destination is None:
        return b'PROXY UNKNOWN\r\n'
    af, src, dst, sport, dport = _endpoints(source, destination)
    proto = 'TCP4' if af == socket.AF_INET else 'TCP6'
    src_host, dst_host = socket.inet_ntop(af, src), socket.inet_ntop(af, dst)
    return f'PROXY {proto} {src_host} {dst_host} {sport} {dport}\r\n'.encode('ascii')


def v2(source: tuple | None, destination: tuple | None, transport: str = 'tcp',
       tlvs: bytes = b'') -> bytes:
    """The v2 header for a `transport` ('tcp' or 'udp') connection, `tlvs` appended raw.

    PROXY command with AF_INET or AF_INET6 (mixed families as in `v1()`);
    LOCAL command with AF_UNSPEC when an address is None. ValueError on a host
    that is not an IP, an unknown transport, or TLVs that overflow the length field.
    """
    if transport not in _TRANSPORT_CODES:
        raise ValueError(f'transport must be tcp or udp, not {transport!r}')
    if source is None or destination is None:
        ver_cmd, fam, block = 0x20 | _LOCAL, _UNSPEC << 4 | _UNSPEC, b''
    else:
        af, src, dst, sport, dport = _endpoints(source, destination)
        family = _INET if af == socket.AF_INET else _INET6
        ver_cmd, fam = 0x20 | _PROXY, family << 4 | _TRANSPORT_CODES[transport]
        block = src + dst + sport.to_bytes(2, 'big') + dport.to_bytes(2, 'big')
    block += bytes(tlvs)
    if len(block) > 0xFFFF:
        raise ValueError(f'v2 header block of {len(block)} bytes does not fit 65535')
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + len(block).to_bytes(2, 'big') + block


def _endpoints(source: tuple, destination: tuple) -> tuple[int, bytes, bytes, int, int]:
    """(family, source packed, destination packed, source port, destination port)."""
    (src_af, src, sport), (dst_af, dst, dport) = _endpoint(source), _endpoint(destination)
    if src_af != dst_af:                               # one of each: carry both as IPv6
        src, dst = (_V4_MAPPED + a if len(a) == 4 else a for a in (src, dst))
        src_af = socket.AF_INET6
    return src_af, src, dst, sport, dport


def _endpoint(address: tuple) -> tuple[int, bytes, int]:
    host, port = address[0], address[1]                # peername tuples of 4 are fine too
    host = host.split('%', 1)[0]                       # a zone (fe80::1%eth0) cannot be sent
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f'bad port {port!r}')
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            return af, socket.inet_pton(af, host), port
        except OSError:
            pass
    raise ValueError(f'not an IP address: {host!r}')
