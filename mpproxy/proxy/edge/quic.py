"""Reading a QUIC client's Initial packets for the server name, without terminating QUIC.

QUIC v1 (RFC 9000, RFC 9001) and v2 (RFC 9369) protect a client's Initial packets with keys
anyone can derive from the Destination Connection ID the client chose: the protection stops
tampering, not reading. `ClientHelloReader` is fed the datagrams of one flow in arrival
order; it removes header protection, decrypts, walks the frames, puts the CRYPTO data back
in order by offset (a ClientHello with post-quantum key shares spans two or three Initial
packets, which may come out of order or share a datagram) and, once the TLS ClientHello is
whole, reads its server name and ALPN with edge/sni.py's walk. The datagrams are never
altered: the caller forwards them as they came.

    long header = first(1) version(4) dcid_len(1) dcid scid_len(1) scid
    Initial     = long header token(<i>) length(i) packet_number(1-4) payload+tag(16)
    first byte  = 1 fixed(1) type(2) reserved(2) pn_len-1(2)     the low 4 bits are masked
    mask        = AES-128-ECB(hp, 16 bytes from packet_number + 4)[0..5]
    payload     = AES-128-GCM(key, iv xor packet number, aad = the unmasked header)
    frames      = PADDING 00 | PING 01 | ACK 02/03 | CRYPTO 06 offset(i) data(<i>)
                | CONNECTION_CLOSE 1c code(i) frame(i) reason(<i>)     (i: a varint)
    keys        = HKDF-Expand-Label(HKDF-Extract(salt, dcid), "client in") then
                  "quic key" / "quic iv" / "quic hp"  (v2: another salt, "quicv2 ..." labels)

Crypto: HKDF is two HMAC-SHA256 (the standard library's); AES comes from the optional
`cryptography` package (`mpproxy[quic]`), imported when the first reader is built, so
edge/ imports without it: `available()` says whether it is there.
"""

from __future__ import annotations

import hmac

try:
    from _hashlib import hmac_digest as _hmac     # hmac.digest without its Python wrapper
except ImportError:                                # (a CPython without OpenSSL's hashlib)
    _hmac = hmac.digest

from mpproxy.proxy.edge.sni import hello_names

MORE, DONE, NOT_QUIC = 'more', 'done', 'not-quic'
V1, V2 = 0x00000001, 0x6B3343CF
MAX_CRYPTO = 16384           # bytes of CRYPTO data a flow may send before its hello is whole
MAX_PACKETS = 32             # packets (and ignored datagrams) a flow may send before that
MAX_PIECES = 32              # disjoint pieces of CRYPTO data held at once
MIN_DCID, MAX_CID = 8, 20    # RFC 9000 7.2: a client's first DCID has 8 bytes or more

# version: (initial salt, HKDF label prefix, long-header type of Initial, of Retry)
_VERSIONS = {
    V1: (bytes.fromhex('38762cf7f55934b34d179ae6a4c80cadccbb7f0a'), b'quic ', 0, 3),
    V2: (bytes.fromhex('0dede3def700a6db819381be6e269dcbf9bd2ed9'), b'quicv2 ', 1, 0),
}
_crypto = None               # (AESGCM, Cipher, AES, ECB, InvalidTag) once imported


class QuicError(ValueError):
    """The datagrams are a QUIC client's Initial packets, but malformed, undecryptable, or
    past a bound; the message says which, for the log."""


def available() -> bool:
    """Whether the `cryptography` package that ClientHelloReader needs can be imported."""
    try:
        _load_crypto()
    except ImportError:
        return False
    return True


MIN_INITIAL_DATAGRAM = 1200     # bytes: a client's first Initial datagram is never shorter


def initial_dcid(datagram: bytes) -> bytes | None:
    """The DCID of the long-header Initial packet of v1 or v2 that starts `datagram`, else
    None. Cheap: reads a header, no crypto."""
    header = _long_header(datagram, 0)
    if header is None:
        return None
    first, version, dcid, _, _ = header
    if (first >> 4) & 3 != _VERSIONS[version][2] or len(dcid) < MIN_DCID:
        return None
    return dcid


def client_initial_keys(dcid: bytes, version: int = V1) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) that protect the client's Initial packets (RFC 9001 5.2, RFC 9369 3.3)."""
    salt, client_in, key, iv, hp = _LABELS[version]
    secret = _hmac(_hmac(salt, dcid, 'sha256'), client_in, 'sha256')
    return (_hmac(secret, key, 'sha256')[:16], _hmac(secret, iv, 'sha256')[:12],
            _hmac(secret, hp, 'sha256')[:16])


class ClientHelloReader:
    """The ClientHello of one QUIC flow, read from the datagrams the client sends first.

        FRESH ──Initial──▶ READING ──the hello is whole──▶ DONE (.server_name, .alpn)
          │  ▲               │  ▲
          │  └── NOT_QUIC    │  └── MORE
          └──────────────────┴──malformed, undecryptable, a bound──▶ FAILED (QuicError)

    FRESH answers NOT_QUIC to a datagram that does not start with a client Initial of a
    version we read (the caller routes it to `default`) and stays FRESH. READING ignores
    (MORE) datagrams of another connection ID or version, packets it has no keys for
    (0-RTT) and, as RFC 9000 12.2 says, packets whose DCID is not the one of the first
    packet in their datagram; it counts them all against MAX_PACKETS. DONE answers DONE
    without reading; FAILED raises its QuicError again.
    """

    __slots__ = ('dcid', 'version', 'server_name', 'alpn', '_aead', '_hp', '_iv', '_largest',
                 '_packets', '_crypto', '_pieces', '_done', '_error')

    def __init__(self):
        _load_crypto()                       # ImportError here, not at the first datagram
        self.dcid: bytes | None = None       # the client's original DCID, its keys' seed
        self.version: int | None = None
        self.server_name: str | None = None
        self.alpn: tuple[str, ...] = ()
        self._aead = self._hp = self._iv = None
        self._largest = -1                   # highest packet number that decrypted
        self._packets = 0
        self._crypto = bytearray()           # CRYPTO data at its offsets, holes zero
        self._pieces: list[tuple[int, int]] = []     # [start, end) of what arrived, sorted
        self._done = False
        self._error: str | None = None

    def feed(self, datagram: bytes) -> str:
        """MORE, DONE or NOT_QUIC for the next datagram of the flow; QuicError if it is bad."""
        if self._done:
            return DONE
        if self._error is not None:
            raise QuicError(self._error)
        try:
            return self._datagram(bytes(datagram))
        except QuicError as e:
            self._error = str(e)
            raise

    def _datagram(self, data: bytes) -> str:
        if self.dcid is None:
            dcid = initial_dcid(data)
            if dcid is None:
                return NOT_QUIC
            if len(data) < MIN_INITIAL_DATAGRAM:      # checked before any key is derived
                raise QuicError(f'an Initial in a datagram of {len(data)} bytes (a client pads '
                                f'them to {MIN_INITIAL_DATAGRAM}: RFC 9000 14.1)')
            self._start(dcid, int.from_bytes(data[1:5], 'big'))
        pos, first_dcid = 0, None
        while pos < len(data) and not self._done:
            header = _long_header(data, pos)
            if header is None:               # not QUIC, a short header, bytes after the packets
                if pos == 0:
                    self._count()
                break
            first, version, dcid, _, p = header
            if first_dcid is None:
                first_dcid = dcid
            self._count()
            kind = (first >> 4) & 3
            if kind == _VERSIONS[version][3]:
                break                        # Retry has no length: nothing can follow it
            initial = kind == _VERSIONS[version][2]
            if initial:
                token, p = _varint(data, p)
                p += token
            length, p = _varint(data, p)
            end = p + length
            if end > len(data):
                raise QuicError('a packet runs past the end of its datagram')
            if initial and version == self.version and dcid == self.dcid == first_dcid:
                self._initial(data, pos, p, end)
            pos = end
        return DONE if self._done else MORE

    def _start(self, dcid: bytes, version: int) -> None:
        aesgcm, cipher, aes, ecb, _ = _crypto
        key, iv, hp = client_initial_keys(dcid, version)
        self.dcid, self.version = dcid, version
        self._aead = aesgcm(key)
        self._hp = cipher(aes(hp), ecb()).encryptor()
        self._iv = int.from_bytes(iv, 'big')

    def _count(self) -> None:
        self._packets += 1
        if self._packets > MAX_PACKETS:
            raise QuicError(f'more than {MAX_PACKETS} packets and no whole ClientHello')

    def _initial(self, data: bytes, start: int, pn_at: int, end: int) -> None:
        """Unmask, decrypt and read the Initial packet data[start:end]."""
        if end - pn_at < 4 + 16:
            raise QuicError('an Initial packet too short for its header protection sample')
        mask = self._hp.update(data[pn_at + 4:pn_at + 20])
        first = data[start] ^ (mask[0] & 0x0F)
        pn_len = (first & 3) + 1
        truncated = int.from_bytes(data[pn_at:pn_at + pn_len], 'big') \
            ^ int.from_bytes(mask[1:1 + pn_len], 'big')
        header = bytearray(data[start:pn_at + pn_len])
        header[0] = first
        header[pn_at - start:] = truncated.to_bytes(pn_len, 'big')
        pn = _packet_number(self._largest, truncated, pn_len * 8)
        nonce = (self._iv ^ pn).to_bytes(12, 'big')
        try:
            payload = self._aead.decrypt(nonce, data[pn_at + pn_len:end], bytes(header))
        except _crypto[4]:
            raise QuicError('an Initial packet does not decrypt') from None
        if first & 0x0C:
            raise QuicError('reserved header bits set in an Initial packet')
        self._largest = max(self._largest, pn)
        self._frames(payload)
        self._hello()

    def _frames(self, payload: bytes) -> None:
        if not payload:
            raise QuicError('an Initial packet without frames')
        p, n = 0, len(payload)
        while p < n:
            kind = payload[p]
            p += 1
            if kind == 0x00:                                     # PADDING: skip the run
                p = n - len(payload[p:].lstrip(b'\x00'))
            elif kind == 0x01:                                   # PING
                pass
            elif kind in (0x02, 0x03):                           # ACK: largest, delay, ranges
                _, p = _varint(payload, p)
                _, p = _varint(payload, p)
                ranges, p = _varint(payload, p)
                _, p = _varint(payload, p)
                if 2 * ranges > n - p:
                    raise QuicError('an ACK frame with more ranges than bytes')
                for _ in range(2 * ranges + (3 if kind == 0x03 else 0)):
                    _, p = _varint(payload, p)                   # gaps and lengths, ECN counts
            elif kind == 0x06:                                   # CRYPTO
                offset, p = _varint(payload, p)
                length, p = _varint(payload, p)
                if p + length > n:
                    raise QuicError('a CRYPTO frame runs past the end of its packet')
                self._store(offset, payload[p:p + length])
                p += length
            elif kind == 0x1C:                                   # CONNECTION_CLOSE (transport)
                _, p = _varint(payload, p)
                _, p = _varint(payload, p)
                length, p = _varint(payload, p)
                if p + length > n:
                    raise QuicError('a CONNECTION_CLOSE frame runs past the end of its packet')
                p += length
            else:
                raise QuicError(f'frame type 0x{kind:02x} in an Initial packet')

    def _store(self, offset: int, chunk: bytes) -> None:
        end = offset + len(chunk)
        if end > MAX_CRYPTO:
            raise QuicError(f'CRYPTO data past {MAX_CRYPTO} bytes')
        if not chunk:
            return
        if len(self._crypto) < end:
            self._crypto.extend(bytes(end - len(self._crypto)))
        self._crypto[offset:end] = chunk
        pieces = []
        for s, e in self._pieces:
            if e < offset or s > end:
                pieces.append((s, e))
            else:                                                # overlapping or touching
                offset, end = min(s, offset), max(e, end)
        pieces.append((offset, end))
        if len(pieces) > MAX_PIECES:
            raise QuicError(f'CRYPTO data in more than {MAX_PIECES} pieces')
        self._pieces = sorted(pieces)

    def _hello(self) -> None:
        """DONE once the CRYPTO data from offset 0 holds a whole ClientHello."""
        if not self._pieces or self._pieces[0][0] != 0 or self._pieces[0][1] < 4:
            return
        have, data = self._pieces[0][1], self._crypto
        if data[0] != 1:
            raise QuicError(f'the first handshake message is of type {data[0]}, not ClientHello')
        need = 4 + int.from_bytes(data[1:4], 'big')
        if need > MAX_CRYPTO:
            raise QuicError(f'a ClientHello of {need} bytes, more than {MAX_CRYPTO}')
        if have < need:
            return
        names = hello_names(bytes(data[4:need]))
        if names is None:
            raise QuicError('a malformed ClientHello')
        self.server_name, self.alpn = names
        self._done = True
        self._crypto, self._pieces = bytearray(), []


def _long_header(data: bytes, pos: int) -> tuple[int, int, bytes, bytes, int] | None:
    """(first byte, version, dcid, scid, offset after them) of a long header of a version we
    read at data[pos:], or None."""
    if len(data) - pos < 7 or not data[pos] & 0x80:
        return None
    version = int.from_bytes(data[pos + 1:pos + 5], 'big')
    if version not in _VERSIONS:
        return None
    p = pos + 5
    dcid_len = data[p]
    if dcid_len > MAX_CID or p + 1 + dcid_len >= len(data):
        return None
    dcid = data[p + 1:p + 1 + dcid_len]
    p += 1 + dcid_len
    scid_len = data[p]
    if scid_len > MAX_CID or p + 1 + scid_len > len(data):
        return None
    return data[pos], version, dcid, data[p + 1:p + 1 + scid_len], p + 1 + scid_len


def _varint(data: bytes, p: int) -> tuple[int, int]:
    """(value, offset after it) of the RFC 9000 16 variable-length integer at data[p:]."""
    if p >= len(data):
        raise QuicError('a packet or frame ends inside a field')
    size = 1 << (data[p] >> 6)
    if p + size > len(data):
        raise QuicError('a packet or frame ends inside a field')
    return int.from_bytes(data[p:p + size], 'big') & ((1 << (8 * size - 2)) - 1), p + size


def _packet_number(largest: int, truncated: int, bits: int) -> int:
    """The full packet number nearest the one expected next (RFC 9000 A.3)."""
    expected = largest + 1
    window = 1 << bits
    candidate = (expected & ~(window - 1)) | truncated
    if candidate <= expected - window // 2 and candidate < (1 << 62) - window:
        return candidate + window
    if candidate > expected + window // 2 and candidate >= window:
        return candidate - window
    return candidate


def _expand_info(label: bytes, length: int) -> bytes:
    """What HKDF-Expand-Label (RFC 8446 7.1) with an empty context MACs for `label`, for
    lengths of one SHA-256 block at most: the output is HMAC(secret, this)[:length]."""
    return length.to_bytes(2, 'big') + bytes((len(label),)) + label + b'\x00' + b'\x01'


# version → (salt, then the HKDF-Expand-Label inputs of the client secret, key, iv and hp)
_LABELS = {version: (salt, _expand_info(b'tls13 client in', 32),
                     _expand_info(b'tls13 ' + prefix + b'key', 16),
                     _expand_info(b'tls13 ' + prefix + b'iv', 12),
                     _expand_info(b'tls13 ' + prefix + b'hp', 16))
           for version, (salt, prefix, _, _) in _VERSIONS.items()}


def _load_crypto() -> None:
    global _crypto
    if _crypto is None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        _crypto = (AESGCM, Cipher, algorithms.AES, modes.ECB, InvalidTag)
