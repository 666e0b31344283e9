"""A small async DNS client for upstream names (A and AAAA over UDP), run in workers only.

With `resolver:` servers configured, queries go to them over UDP: each query is
tried `TRIES` times, each try walks the servers in order with `TRY_TIMEOUT`
seconds per server. Answers are parsed here (compression pointers, CNAME chains
in the answer section); TTLs are ignored, the upstream's `resolve` interval
decides when to ask again. A truncated answer is used as far as it goes (no TCP
fallback). With no `resolver:` the system resolver is used through
`loop.getaddrinfo`, bounded by `SYSTEM_TIMEOUT`.

Every failure (timeout, error rcode, malformed answer, no address) is a
ResolveError; the parser never raises anything else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct

from mpproxy.config.schema import Address

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
CLASS_IN = 1
TRY_TIMEOUT = 2.0
TRIES = 2
SYSTEM_TIMEOUT = 5.0
MAX_CNAME_CHAIN = 8
RCODES = {1: 'FORMERR', 2: 'SERVFAIL', 3: 'NXDOMAIN', 4: 'NOTIMP', 5: 'REFUSED'}


class ResolveError(Exception):
    """A name could not be resolved; the message says why."""


# -- messages ---------------------------------------------------------------------------------

def encode_name(name: str) -> bytes:
    name = name.rstrip('.')
    if not name:
        return b'\0'
    out = bytearray()
    for label in name.split('.'):
        try:
            raw = label.encode('idna') if not label.isascii() else label.encode('ascii')
        except UnicodeError:
            raise ResolveError(f'{name!r} is not a valid DNS name') from None
        if not 0 < len(raw) < 64:
            raise ResolveError(f'{name!r} is not a valid DNS name')
        out += bytes((len(raw),)) + raw
    out += b'\0'
    if len(out) > 255:
        raise ResolveError(f'{name!r} is too long for DNS')
    return bytes(out)


def build_query(name: str, qtype: int, qid: int) -> bytes:
    """A standard query (RD set) for `name` of `qtype`, with id `qid`."""
    return struct.pack('!HHHHHH', qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + \
        struct.pack('!HH', qtype, CLASS_IN)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    end = None
    jumps = 0
    while True:
        if offset >= len(data):
            raise ResolveError('malformed DNS answer: name runs past the end')
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise ResolveError('malformed DNS answer: truncated pointer')
            if end is None:
                end = offset + 2
            jumps += 1
            if jumps > 64:
                raise ResolveError('malformed DNS answer: compression loop')
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise ResolveError('malformed DNS answer: bad label type')
        offset += 1
        if length == 0:
            break
        if offset + length > len(data):
            raise ResolveError('malformed DNS answer: label runs past the end')
        labels.append(data[offset:offset + length].decode('ascii', 'replace').lower())
        offset += length
        if sum(len(label) + 1 for label in labels) > 255:
            raise ResolveError('malformed DNS answer: name too long')
    return '.'.join(labels), (end if end is not None else offset)


def parse_response(data: bytes, qid: int, name: str, qtype: int) -> list[str]:
    """The addresses (text) of type `qtype` for `name` in a response, following CNAMEs.

    An empty list means the name exists but has no record of that type (NODATA).
    Raises ResolveError for anything else: wrong id, error rcode, malformed data.
    """
    try:
        return _parse(data, qid, name, qtype)
    except ResolveError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever slipped through is still malformed input
        raise ResolveError(f'malformed DNS answer: {exc}') from None


def _parse(data: bytes, qid: int, name: str, qtype: int) -> list[str]:
    if len(data) < 12:
        raise ResolveError('malformed DNS answer: shorter than a header')
    rid, flags, qdcount, ancount, _, _ = struct.unpack_from('!HHHHHH', data)
    if rid != qid:
        raise ResolveError('DNS answer with a wrong id')
    if not flags & 0x8000:
        raise ResolveError('DNS message is not a response')
    rcode = flags & 0x000F
    if rcode:
        raise ResolveError(f'DNS error {RCODES.get(rcode, rcode)}')
    offset = 12
    for _ in range(qdcount):
        _, offset = _read_name(data, offset)
        offset += 4
    records = []
    for _ in range(ancount):
        owner, offset = _read_name(data, offset)
        if offset + 10 > len(data):
            if flags & 0x0200:
                break             # truncated: use what arrived
            raise ResolveError('malformed DNS answer: record header runs past the end')
        rtype, rclass, _ttl, rdlength = struct.unpack_from('!HHIH', data, offset)
        offset += 10
        if offset + rdlength > len(data):
            if flags & 0x0200:
                break
            raise ResolveError('malformed DNS answer: record data runs past the end')
        rdata_at = offset
        offset += rdlength
        if rclass != CLASS_IN:
            continue
        if rtype == TYPE_CNAME:
            target, _ = _read_name(data, rdata_at)
            records.append((owner, rtype, target))
        elif rtype == TYPE_A and rdlength == 4:
            records.append((owner, rtype, str(ipaddress.IPv4Address(data[rdata_at:offset]))))
        elif rtype == TYPE_AAAA and rdlength == 16:
            records.append((owner, rtype, str(ipaddress.IPv6Address(data[rdata_at:offset]))))
        elif rtype in (TYPE_A, TYPE_AAAA):
            raise ResolveError('malformed DNS answer: bad address length')
    current = name.rstrip('.').lower()
    for _ in range(MAX_CNAME_CHAIN):
        alias = next((r[2] for r in records if r[0] == current and r[1] == TYPE_CNAME), None)
        if alias is None:
            break
        current = alias
    return [value for owner, rtype, value in records if owner == current and rtype == qtype]


# -- transport --------------------------------------------------------------------------------

class _Reply(asyncio.DatagramProtocol):
    def __init__(self, qid: int, name: str, qtype: int):
        self.qid, self.name, self.qtype = qid, name, qtype
        self.done = asyncio.get_running_loop().create_future()

    def datagram_received(self, data, addr):
        if self.done.done() or len(data) < 2 or struct.unpack_from('!H', data)[0] != self.qid:
            return                # a stray or late datagram: keep waiting
        try:
            self.done.set_result(parse_response(data, self.qid, self.name, self.qtype))
        except ResolveError as exc:
            self.done.set_exception(exc)

    def error_received(self, exc):
        if not self.done.done():
            self.done.set_exception(ResolveError(f'DNS server unreachable: {exc}'))


async def _ask(server: Address, name: str, qtype: int, timeout: float) -> list[str]:
    loop = asyncio.get_running_loop()
    qid = int.from_bytes(os.urandom(2), 'big')
    family = socket.AF_INET6 if server.is_ipv6 else socket.AF_INET
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Reply(qid, name, qtype), remote_addr=(server.host, server.port), family=family)
    try:
        transport.sendto(build_query(name, qtype, qid))
        return await asyncio.wait_for(proto.done, timeout)
    except asyncio.TimeoutError:
        raise ResolveError(f'no answer from {server} within {timeout:g}s') from None
    finally:
        transport.close()


async def query(servers, name: str, qtype: int, timeout: float = TRY_TIMEOUT,
                tries: int = TRIES) -> list[str]:
    """Addresses of `qtype` for `name`: each try walks `servers` until one answers."""
    error: ResolveError | None = None
    for _ in range(tries):
        for server in servers:
            try:
                return await _ask(server, name, qtype, timeout)
            except ResolveError as exc:
                if str(exc).startswith('DNS error NXDOMAIN'):
                    raise
                error = exc
            except OSError as exc:
                error = ResolveError(f'cannot query {server}: {exc}')
    raise error or ResolveError('no resolver configured')


class Resolver:
    """Resolves a host to socket addresses for connecting to `port`."""

    def __init__(self, servers=(), timeout: float = TRY_TIMEOUT, tries: int = TRIES,
                 system_timeout: float = SYSTEM_TIMEOUT):
        self.servers = tuple(servers)
        self.timeout, self.tries, self.system_timeout = timeout, tries, system_timeout

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """[(family, sockaddr), ...] in a stable order; ResolveError when there is none."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [_sockaddr(str(ip), port)]
        if self.servers:
            results = await asyncio.gather(
                query(self.servers, host, TYPE_A, self.timeout, self.tries),
                query(self.servers, host, TYPE_AAAA, self.timeout, self.tries),
                return_exceptions=True)
            addresses = []
            for result in results:
                if isinstance(result, BaseException):
                    if not isinstance(result, ResolveError):
                        raise result
                else:
                    addresses.extend(result)
            if not addresses:
                errors = [r for r in results if isinstance(r, BaseException)]
                raise errors[0] if errors else ResolveError('no A or AAAA record')
            return _unique(_sockaddr(a, port) for a in addresses)
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.system_timeout)
        except asyncio.TimeoutError:
            raise ResolveError(f'no answer within {self.system_timeout:g}s') from None
        except (OSError, UnicodeError) as exc:
            raise ResolveError(str(exc)) from None
        out = _unique((family, sockaddr[:2] if family == socket.AF_INET else tuple(sockaddr))
                      for family, _, _, _, sockaddr in infos
                      if family in (socket.AF_INET, socket.AF_INET6))
        if not out:
            raise ResolveError('no address')
        return out


def _sockaddr(ip: str, port: int) -> tuple[int, tuple]:
    if ':' in ip:
        return socket.AF_INET6, (ip, port, 0, 0)
    return socket.AF_INET, (ip, port)


def _unique(items) -> list[tuple[int, tuple]]:
    seen, out = set(), []
    for family, sockaddr in items:
        key = (family, sockaddr[:2])
        if key not in seen:
            seen.add(key)
            out.append((family, sockaddr))
    return out
