"""Routing by TLS SNI without terminating TLS (nginx `ssl_preread`, HAProxy `req.ssl_sni`).

`parse_sni()` is a pure function over the first bytes a client sent: it reads
the TLS records that carry the ClientHello (fragmented over several records or
not) and returns the server_name, or says it needs more bytes, or that the
bytes are not a TLS ClientHello. The bytes are never altered: the relay
forwards them whole to the server the name routes to.

    record    = type(1)=22 version(2) length(2) fragment
    handshake = type(1)=1 length(3) version(2) random(32) session_id(<1>)
                cipher_suites(<2>) compression(<1>) extensions(<2>)
    extension server_name(0) = list(<2>) [name_type(1)=0 host_name(<2>)]
    extension alpn(16)       = list(<2>) [protocol_name(<1>)]

`hello_names()` reads the body of a ClientHello (the bytes after its 4-byte
handshake header) for the server name and the ALPN protocols: the walk this
module shares with edge/quic.py, where the same handshake message comes in
QUIC CRYPTO frames rather than in TLS records.
"""

from __future__ import annotations

import struct

_TYPE_LENGTH = struct.Struct('>HH').unpack_from     # an extension's type and length

MAX_HELLO = 16384 + 5 * 4     # bytes of records we read at most before giving up
MORE, FOUND, NOT_TLS = 'more', 'found', 'not-tls'


def parse_sni(data: bytes) -> tuple[str, str | None]:
    """(MORE, None) | (FOUND, server name or None if the hello has none) | (NOT_TLS, None)."""
    return parse_hello(data)[:2]


def parse_hello(data: bytes) -> tuple[str, str | None, tuple[str, ...]]:
    """`parse_sni`, with the ClientHello's ALPN protocols: (FOUND, name, alpn); (MORE or
    NOT_TLS, None, ())."""
    hs = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            return (MORE, None, ()) if len(data) < MAX_HELLO else (NOT_TLS, None, ())
        if data[pos] != 22 or data[pos + 1] != 3:
            return NOT_TLS, None, ()
        length = int.from_bytes(data[pos + 3:pos + 5], 'big')
        if length == 0 or length > 16384 + 2048:
            return NOT_TLS, None, ()
        if len(data) - pos - 5 < length:
            return (MORE, None, ()) if pos + 5 + length <= MAX_HELLO else (NOT_TLS, None, ())
        hs += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(hs) >= 4:
            if hs[0] != 1:
                return NOT_TLS, None, ()
            need = 4 + int.from_bytes(hs[1:4], 'big')
            if need > MAX_HELLO:
                return NOT_TLS, None, ()
            if len(hs) >= need:
                return _hello_sni(bytes(hs[4:need]))


def _hello_sni(body: bytes) -> tuple[str, str | None, tuple[str, ...]]:
    names = hello_names(body)
    return (NOT_TLS, None, ()) if names is None else (FOUND, *names)


def hello_names(body: bytes) -> tuple[str | None, tuple[str, ...]] | None:
    """(server name or None, ALPN protocols) of a ClientHello body; None if it is malformed.

    The name comes as `parse_sni` gives it (lower case, no trailing dot; None when it is
    absent or not ASCII); an ALPN protocol that is not ASCII has its bytes as \\xNN escapes.
    """
    n = len(body)
    p = 2 + 32                                             # version, random
    for size in (1, 2, 1):                                 # session id, cipher suites, compression
        if p + size > n:
            return None
        p += size + int.from_bytes(body[p:p + size], 'big')
    if p >= n:
        return (None, ()) if p == n else None              # no extensions at all
    end = p + 2 + int.from_bytes(body[p:p + 2], 'big')
    if end > n:
        return None
    p += 2
    name, alpn, seen = None, (), set()
    while p + 4 <= end:
        ext_type, ext_len = _TYPE_LENGTH(body, p)
        p += 4
        if p + ext_len > end:
            return None
        if ext_type in (0, 16):
            if ext_type in seen:
                return None                                # RFC 8446 4.2: one of each type
            seen.add(ext_type)
            if ext_type == 0:
                name = _server_name(body[p:p + ext_len])
            else:
                alpn = _alpn(body[p:p + ext_len])
                if alpn is None:
                    return None
        p += ext_len
    return (name, alpn) if p == end else None


def _server_name(ext: bytes) -> str | None:
    p, end = 2, 2 + int.from_bytes(ext[0:2], 'big')
    while p + 3 <= min(end, len(ext)):
        kind, n = ext[p], int.from_bytes(ext[p + 1:p + 3], 'big')
        name = ext[p + 3:p + 3 + n]
        if kind == 0 and len(name) == n:
            try:
                return name.decode('ascii').rstrip('.').lower() or None
            except UnicodeDecodeError:
                return None
        p += 3 + n
    return None


def _alpn(ext: bytes) -> tuple[str, ...] | None:
    if len(ext) < 2 or int.from_bytes(ext[0:2], 'big') != len(ext) - 2:
        return None
    names, p = [], 2
    while p < len(ext):
        n = ext[p]
        if n == 0 or p + 1 + n > len(ext):
            return None
        names.append(ext[p + 1:p + 1 + n].decode('ascii', 'backslashreplace'))
        p += 1 + n
    return tuple(names)


def split_route(pattern: str) -> tuple[str, frozenset | None]:
    """`"name alpn=h3,h3-29"` → ("name", {"h3", "h3-29"}); a plain pattern → (pattern, None)."""
    name, sep, rest = pattern.strip().partition(' alpn=')
    if not sep:
        return name, None
    return name.strip(), frozenset(p.strip() for p in rest.split(',') if p.strip())


class SniRouter:
    """sni_routes, for a TLS ClientHello (tcp) or a QUIC one (udp): a server name pattern,
    optionally with the ALPN protocols it requires (`"api.example.com alpn=h2": api`), → a
    value (a pool).

    Patterns are tried in this order: the exact name, then the longest matching `*.suffix`,
    then `default`; within a pattern, a route whose ALPN the client offers wins (in config
    order), else the pattern's route without ALPN; a pattern with neither lets the next one
    decide. `routes` is [(pattern, value)], `default` among the patterns.
    """

    def __init__(self, routes):
        self.exact: dict[str, list] = {}
        self.wildcards: list[tuple[str, list]] = []
        self.default: list = []
        for pattern, value in routes:
            name, alpn = split_route(pattern)
            name = name.lower().rstrip('.')
            entry = (alpn, value)
            if name == 'default':
                self.default.append(entry)
            elif name.startswith('*.'):
                group = next((g for s, g in self.wildcards if s == name[1:]), None)
                if group is None:
                    self.wildcards.append((name[1:], [entry]))    # '.example.com'
                else:
                    group.append(entry)
            else:
                self.exact.setdefault(name, []).append(entry)
        self.wildcards.sort(key=lambda w: -len(w[0]))           # the longest suffix wins

    def values(self) -> list:
        groups = [*self.exact.values(), *(g for _, g in self.wildcards), self.default]
        return [value for group in groups for _, value in group]

    def route(self, name: str | None, alpn=()):
        """The value for a ClientHello's server name and ALPN list, or None."""
        if name:
            group = self.exact.get(name)
            if group is not None:
                value = _pick(group, alpn)
                if value is not None:
                    return value
            for suffix, group in self.wildcards:
                if name.endswith(suffix):
                    value = _pick(group, alpn)
                    if value is not None:
                        return value
        return _pick(self.default, alpn)

    def fallback(self):
        """The value for a client whose ClientHello could not be read: `default` without
        ALPN, or None."""
        return next((value for alpn, value in self.default if alpn is None), None)


def _pick(group: list, alpn):
    plain = None
    for required, value in group:
        if required is None:
            if plain is None:
                plain = value
        elif not required.isdisjoint(alpn):
            return value
    return plain
