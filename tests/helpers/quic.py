"""QUIC client Initials for the tests: the datagrams a real QUIC stack (aioquic) sends first,
and Initial packets sealed here from RFC 9001 5 (checked against the RFC's own sample) to put
any frames, packet number or header bits on the wire; a TLS ClientHello built by hand."""

from __future__ import annotations

from mpproxy.proxy.edge.quic import V1, V2, client_initial_keys

LONG_TYPES = {V1: {'initial': 0, '0rtt': 1, 'handshake': 2, 'retry': 3},
              V2: {'initial': 1, '0rtt': 2, 'handshake': 3, 'retry': 0}}


def aioquic_initials(server_name: str | None, alpn: list[str], version: int = V1) -> list[bytes]:
    """The datagrams an aioquic client sends first to connect with this name and ALPN."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    config = QuicConfiguration(is_client=True, server_name=server_name, alpn_protocols=alpn)
    config.original_version = version
    config.supported_versions = [version]
    client = QuicConnection(configuration=config)
    client.connect(('192.0.2.1', 443), now=0.0)
    return [datagram for datagram, _ in client.datagrams_to_send(now=0.0)]


def send_initials(env, addr, server_name: str, alpn=('h3',)):
    """A new client socket of a unit test's `env` (helpers.udp_unit.Env) that sent the
    datagrams an aioquic client sends first for `server_name` to `addr`: (socket, them)."""
    from helpers.udp_unit import V4
    client = env.udp(V4, ('127.0.0.1', 0))
    initials = aioquic_initials(server_name, list(alpn))
    for datagram in initials:
        client.sendto(datagram, addr)
    return client, initials


def varint(value: int, size: int | None = None) -> bytes:
    """RFC 9000 16: the shortest encoding, or the one of `size` bytes."""
    if size is None:
        size = next(s for s in (1, 2, 4, 8) if value < 1 << (8 * s - 2))
    return (value | {1: 0, 2: 1, 4: 2, 8: 3}[size] << (8 * size - 2)).to_bytes(size, 'big')


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b'\x06' + varint(offset) + varint(len(data)) + data


def seal_initial(dcid: bytes, payload: bytes, *, pn: int = 0, pn_len: int = 4,
                 version: int = V1, scid: bytes = b'', token: bytes = b'', reserved: int = 0,
                 pad_to: int = 0) -> bytes:
    """A client Initial packet carrying `payload` (frames), protected as RFC 9001 5 says;
    PADDING frames appended until the packet has `pad_to` bytes."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    key, iv, hp = client_initial_keys(dcid, version)
    first = 0xC0 | LONG_TYPES[version]['initial'] << 4 | reserved << 2 | (pn_len - 1)
    head = (bytes((first,)) + version.to_bytes(4, 'big') + bytes((len(dcid),)) + dcid
            + bytes((len(scid),)) + scid + varint(len(token)) + token)
    length = pn_len + len(payload) + 16
    if pad_to > len(head) + 2 + length:
        payload += bytes(pad_to - len(head) - 2 - length)
        length = pn_len + len(payload) + 16
    header = head + varint(length, 2) + (pn % (1 << 8 * pn_len)).to_bytes(pn_len, 'big')
    nonce = (int.from_bytes(iv, 'big') ^ pn).to_bytes(12, 'big')
    sealed = AESGCM(key).encrypt(nonce, payload, header)
    sample = sealed[4 - pn_len:20 - pn_len]
    mask = Cipher(algorithms.AES(hp), modes.ECB()).encryptor().update(sample)
    protected = bytearray(header)
    protected[0] ^= mask[0] & 0x0F
    for i in range(pn_len):
        protected[len(header) - pn_len + i] ^= mask[1 + i]
    return bytes(protected) + sealed


def long_packet(dcid: bytes, kind: str, body: bytes, version: int = V1) -> bytes:
    """A long-header packet of `kind` with `body` as it is (no protection: a stand-in for a
    0-RTT or Handshake packet the reader has no keys for)."""
    first = 0xC0 | LONG_TYPES[version][kind] << 4
    return (bytes((first,)) + version.to_bytes(4, 'big') + bytes((len(dcid),)) + dcid + b'\x00'
            + varint(len(body), 2) + body)


def client_hello(server_name: str | None = None, alpn: tuple[bytes, ...] = (),
                 padding: int = 0, extensions: bytes = b'') -> bytes:
    """A TLS 1.3 ClientHello handshake message (type, length, body): server_name, ALPN, a
    padding extension of `padding` bytes (a stand-in for post-quantum key shares), then
    `extensions` as they are."""
    def u16(n):
        return n.to_bytes(2, 'big')
    exts = b''
    if server_name is not None:
        entry = b'\x00' + u16(len(server_name)) + server_name.encode()
        exts += u16(0) + u16(len(entry) + 2) + u16(len(entry)) + entry
    if alpn:
        names = b''.join(bytes((len(a),)) + a for a in alpn)
        exts += u16(16) + u16(len(names) + 2) + u16(len(names)) + names
    if padding:
        exts += u16(21) + u16(padding) + bytes(padding)
    exts += extensions
    body = (b'\x03\x03' + bytes(range(32)) + b'\x00' + u16(2) + b'\x13\x01' + b'\x01\x00'
            + u16(len(exts)) + exts)
    return b'\x01' + len(body).to_bytes(3, 'big') + body


def split_initials(dcid: bytes, hello: bytes, parts: int, version: int = V1,
                   pad_to: int = 1200) -> list[bytes]:
    """`hello` in `parts` CRYPTO frames, one per Initial packet (packet numbers 0, 1, ...)."""
    size = -(-len(hello) // parts)
    return [seal_initial(dcid, crypto_frame(i * size, hello[i * size:(i + 1) * size]), pn=i,
                         version=version, pad_to=pad_to)
            for i in range(parts)]


# -- a real QUIC stack on both sides (aioquic, asyncio): for the end-to-end tests ----------

ALPN = 'mpx-test'


def self_signed(name: str):
    """(certificate, private key) for `name`, made now (cryptography's x509)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


async def quic_server(name: str, host: str = '127.0.0.1', seen: list | None = None):
    """An aioquic server on (host, an ephemeral port) with its own certificate for `name`:
    each stream is answered with `name|` + what the client sent; with `seen`, the address
    the connection's packets came from is appended to it per stream. Returns (server,
    port); `server.close()` stops it."""
    import socket

    from aioquic.asyncio import serve
    from aioquic.quic.configuration import QuicConfiguration
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.certificate, config.private_key = self_signed(name)

    def on_stream(reader, writer):
        if seen is not None:
            seen.append(writer.transport.protocol._quic._network_paths[0].addr)

        async def answer():
            data = await reader.read()
            writer.write(name.encode() + b'|' + data)
            writer.write_eof()
        import asyncio
        asyncio.ensure_future(answer())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:    # a free port (race: small)
        s.bind((host, 0))
        port = s.getsockname()[1]
    server = await serve(host, port, configuration=config, stream_handler=on_stream)
    return server, port


async def quic_exchange(port: int, server_name: str, message: bytes, *, alpn=(ALPN,),
                        host: str = '127.0.0.1', timeout: float = 3.0) -> tuple[str, bytes]:
    """Connect with aioquic to host:port as `server_name` (no verification), send `message`
    on one stream; (the common name of the certificate the server showed, the answer).
    Raises TimeoutError when no handshake completes within `timeout`."""
    import asyncio
    import ssl

    from aioquic.asyncio import connect
    from aioquic.quic.configuration import QuicConfiguration
    from cryptography.x509.oid import NameOID
    config = QuicConfiguration(is_client=True, alpn_protocols=list(alpn), server_name=server_name,
                               verify_mode=ssl.CERT_NONE, idle_timeout=timeout)

    async def run():
        async with connect(host, port, configuration=config) as client:
            cert = client._quic.tls._peer_certificate      # what the server showed
            common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            reader, writer = await client.create_stream()
            writer.write(message)
            writer.write_eof()
            return common, await reader.read()
    return await asyncio.wait_for(run(), timeout)
