"""Pure rules and parsers at the edge: functions over bytes and addresses, no I/O.

Owns: allow/deny CIDR rules (`acl.py`), reading and writing PROXY protocol v1/v2 headers
(`proxy_header.py`), the TLS ClientHello's server name and the SNI routes (`sni.py`).
May import: nothing.
"""
