"""`allow` / `deny` CIDR lists of a listener: deny is checked first, then a non-empty allow
must match. IPv4 clients of a dual-stack [::] listener (::ffff:a.b.c.d) match IPv4 CIDRs."""

from __future__ import annotations

import ipaddress


class Acl:
    __slots__ = ('allow', 'deny')

    def __init__(self, allow=(), deny=()):
        self.allow = tuple(ipaddress.ip_network(c, strict=False) for c in allow)
        self.deny = tuple(ipaddress.ip_network(c, strict=False) for c in deny)

    def permits(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split('%', 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.deny if net.version == ip.version):
            return False
        return not self.allow or any(ip in net for net in self.allow if net.version == ip.version)


def for_listener(listener) -> Acl | None:
    """The listener's Acl, or None when it has no lists (then nothing is checked at all)."""
    if not listener.allow and not listener.deny:
        return None
    return Acl(listener.allow, listener.deny)
