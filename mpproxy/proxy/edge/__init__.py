"""Pure rules and parsers at the edge: functions over bytes and addresses, no I/O.

Owns: allow/deny CIDR rules (`acl.py`), reading and writing PROXY protocol v1/v2 headers
(`proxy_header.py`), the TLS ClientHello's server name and the SNI routes (`sni.py`), the
server name and ALPN of a QUIC client's Initial packets (`quic.py`; its AES comes from the
optional `cryptography`, imported only when a reader is built).
May import: nothing.
"""
