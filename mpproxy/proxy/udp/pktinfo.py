"""IP_PKTINFO / IPV6_PKTINFO for wildcard UDP listeners (Linux).

A UDP socket bound to 0.0.0.0 or :: receives datagrams sent to any local
address, but a plain `sendto()` answers from whatever source address the
routing table picks. A client that sent to 127.0.0.2 (or to the second address
of a multi-homed host) would get its reply from another address and drop it.
With IP_PKTINFO / IPV6_RECVPKTINFO the kernel tells us, per datagram, the
address the client sent to; we hand it back in the `sendmsg()` ancillary data
of each reply, so the reply leaves from that address (as nginx does in
`ngx_set_srcaddr_cmsg`).

    struct in_pktinfo  { int ipi_ifindex; struct in_addr ipi_spec_dst; struct in_addr ipi_addr; }  12 bytes
    struct in6_pktinfo { struct in6_addr ipi6_addr; unsigned int ipi6_ifindex; }                   20 bytes
"""

from __future__ import annotations

import socket

# Python 3.11's socket module lacks IP_PKTINFO; these are the Linux values.
IP_PKTINFO = getattr(socket, 'IP_PKTINFO', 8)
IPV6_RECVPKTINFO = getattr(socket, 'IPV6_RECVPKTINFO', 49)
IPV6_PKTINFO = getattr(socket, 'IPV6_PKTINFO', 50)

# Room for the pktinfo message and a couple of others someone may enable.
ANCBUFSIZE = socket.CMSG_SPACE(20) * 4

_ZERO4 = bytes(4)


def is_wildcard(sock: socket.socket) -> bool:
    """True when `sock` is bound to 0.0.0.0 or ::."""
    try:
        host = sock.getsockname()[0]
    except OSError:
        return False
    return host in ('0.0.0.0', '::')


def enable(sock: socket.socket) -> None:
    """Ask the kernel for the destination address of each received datagram."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def recv_spec(family: int) -> tuple[int, int, slice]:
    """(cmsg level, cmsg type, slice of the cmsg data that names the destination).

    The slice is what a session key holds: for IPv4 ipi_spec_dst + ipi_addr
    (not the ifindex, so a client whose packets change interface keeps its
    session), for IPv6 the address only.
    """
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_PKTINFO, slice(0, 16)
    return socket.IPPROTO_IP, IP_PKTINFO, slice(4, 12)


def reply_ancdata(family: int, cdata: bytes) -> list[tuple[int, int, bytes]] | None:
    """The `sendmsg()` ancillary data that makes a reply leave from the address
    named by `cdata` (the pktinfo data received with the client's datagram).

    Built once per session. The interface index is left 0 (the routing table
    chooses the way out), except for IPv6 link-local addresses, which only mean
    something together with their interface.
    """
    if family == socket.AF_INET6:
        if len(cdata) < 20:
            return None
        addr = cdata[:16]
        if addr[0] == 0xfe and (addr[1] & 0xc0) == 0x80:      # fe80::/10
            return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, bytes(cdata[:20]))]
        return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, addr + _ZERO4)]
    if len(cdata) < 12:
        return None
    # ipi_spec_dst is the local address the kernel would answer from: the
    # destination itself for unicast, a local address for a broadcast.
    return [(socket.IPPROTO_IP, IP_PKTINFO, _ZERO4 + cdata[4:8] + _ZERO4)]


def destination(family: int, dst: bytes) -> str:
    """The address a client sent to, as text, from the part of the pktinfo data that a
    session key holds (see `recv_spec`): IPv4 ipi_addr, IPv6 ipi6_addr (an IPv4 client of a
    dual-stack socket: ::ffff:a.b.c.d)."""
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, bytes(dst[:16]))
    return socket.inet_ntop(socket.AF_INET, bytes(dst[4:8]))
