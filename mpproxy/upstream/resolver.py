"""Upstream names to socket addresses, with how long the answer holds: dnspython's asyncio
stub resolver, run in workers only (and by `-t`, in its own process).

A and AAAA are asked at the same time. The library does what a small hand-written client
does not: a truncated UDP answer (TC set) is asked again over TCP (a headless Service with
60 pods does not fit in 512 bytes), queries carry EDNS0 with a 1232-byte payload (most
such answers then fit in one datagram), the answer's TTL is known (the shortest along its
CNAME chain), and the system's search list and ndots apply.

- `resolver:` servers configured: every query goes to them, the name as written (absolute:
  no search list, no hosts file). Each try gives a server `TRY_TIMEOUT` seconds, the list
  is walked `TRIES` times (dnspython backs off 0.1 s, 0.2 s... between rounds), and a
  server that is unreachable, answers SERVFAIL or REFUSED, or sends garbage is skipped for
  the rest of that query.
- none: the system's configuration, as the C library uses it: the hosts file first
  (`hosts.py`), then the nameservers, search list, ndots and timeout of /etc/resolv.conf
  (or of the file $MPPROXY_RESOLV_CONF names), each query bounded by `SYSTEM_TIMEOUT`.
  A nameserver may carry a port as `[address]:port` (the C library skips such a line; the
  tests use it); no nameserver means 127.0.0.1, as in glibc. The file is read at the
  first lookup of the Resolver, i.e. once per worker: a reload picks up a change.

Every failure is a ResolveError whose message says why (`DNS error NXDOMAIN`,
`no answer within 4.1s`, `DNS error SERVFAIL from 10.0.0.53:53`, ...).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import socket
from typing import NamedTuple

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from mpproxy.config.values import format_sockaddr
from mpproxy.upstream import hosts

TRY_TIMEOUT = 2.0
TRIES = 2
SYSTEM_TIMEOUT = 5.0
EDNS_PAYLOAD = 1232            # DNS Flag Day 2020: fits an IPv6 path without fragments
RESOLV_CONF = '/etc/resolv.conf'
RESOLV_CONF_ENV = 'MPPROXY_RESOLV_CONF'


class ResolveError(Exception):
    """A name could not be resolved; the message says why."""


class Answer(NamedTuple):
    """What a name resolved to: [(family, sockaddr), ...] and for how long, in seconds
    (None: no TTL, for an IP literal or a hosts-file entry)."""
    addresses: list
    ttl: float | None


class Resolver:
    """Resolves a host to socket addresses for connecting to `port`, with the answer's TTL."""

    def __init__(self, servers=(), timeout: float = TRY_TIMEOUT, tries: int = TRIES,
                 system_timeout: float = SYSTEM_TIMEOUT, resolv_conf: str | None = None,
                 hosts_file: str = hosts.HOSTS):
        self.servers = tuple(servers)
        self.timeout = timeout
        self.lifetime = lifetime(timeout, tries, len(self.servers)) if self.servers \
            else system_timeout
        self.resolv_conf = resolv_conf or os.environ.get(RESOLV_CONF_ENV) or RESOLV_CONF
        self.hosts_file = hosts_file
        self._stub: dns.asyncresolver.Resolver | None = None     # made at the first lookup

    def stub(self) -> dns.asyncresolver.Resolver:
        """The dnspython resolver this one asks through (configured at the first call)."""
        if self._stub is None:
            if self.servers:
                stub = dns.asyncresolver.Resolver(configure=False)
                stub.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port)
                                    for s in self.servers]
                stub.timeout = self.timeout
            else:
                stub = system_stub(self.resolv_conf)
            stub.use_edns(0, 0, EDNS_PAYLOAD)
            self._stub = stub
        return self._stub

    async def resolve(self, host: str, port: int) -> Answer:
        """The addresses of `host` in a stable order, and their TTL; ResolveError when none."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return Answer([_sockaddr(str(ip), port)], None)
        if not self.servers:
            pinned = hosts.lookup(host, self.hosts_file)
            if pinned:
                return Answer([_sockaddr(address, port) for address in pinned], None)
        results = await asyncio.gather(self._ask(host, dns.rdatatype.A),
                                       self._ask(host, dns.rdatatype.AAAA),
                                       return_exceptions=True)
        addresses, ttls, errors = [], [], []
        for result in results:
            if isinstance(result, ResolveError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result[0]:
                addresses.extend(result[0])
                ttls.append(result[1])
        if not addresses:
            raise errors[0] if errors else ResolveError('no A or AAAA record')
        return Answer(_unique(_sockaddr(a, port) for a in addresses), min(ttls))

    async def _ask(self, host: str, rdtype) -> tuple[list[str], float]:
        """The addresses of one type and their TTL; ([], 0) when the name has none."""
        stub = self.stub()
        try:
            answer = await stub.resolve(host, rdtype, raise_on_no_answer=False,
                                        search=not self.servers, lifetime=self.lifetime,
                                        backend=dns.asyncbackend.get_backend('asyncio'))
        except dns.resolver.NXDOMAIN as exc:
            names = exc.kwargs.get('qnames') or ()
            asked = f" (asked {', '.join(map(str, names))})" if len(names) > 1 else ''
            raise ResolveError(f'DNS error NXDOMAIN{asked}') from None
        except dns.resolver.LifetimeTimeout:
            raise ResolveError(f'no answer within {self.lifetime:g}s') from None
        except dns.resolver.NoNameservers as exc:
            raise ResolveError(_failures(exc.kwargs.get('errors') or ())) from None
        except (dns.exception.DNSException, ValueError) as exc:
            raise ResolveError(str(exc) or type(exc).__name__) from None
        if answer.rrset is None:
            return [], 0.0
        return [record.address for record in answer.rrset], \
            float(answer.chaining_result.minimum_ttl)


def lifetime(timeout: float, tries: int, servers: int) -> float:
    """The bound of one query that gives each of `servers` `timeout` seconds on each of
    `tries` walks of the list, with dnspython's back-off (0.1 s, doubling, at most 2 s)
    between two walks, and a little slack so scheduling jitter costs no try."""
    backoff = sum(min(0.1 * 2 ** k, 2.0) for k in range(tries - 1))
    return round(timeout * tries * servers + backoff + 0.05, 3)


def system_stub(path: str) -> dns.asyncresolver.Resolver:
    """A dnspython resolver configured from the resolv.conf at `path`, as glibc would be,
    plus `[address]:port` nameservers."""
    stub = dns.asyncresolver.Resolver(configure=False)
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    servers, rest = [], []
    for line in lines:
        tokens = line.split()
        if len(tokens) >= 2 and tokens[0] == 'nameserver':
            server = _nameserver(tokens[1])
            if server is not None:
                servers.append(server)
        else:
            rest.append(line)
    rest.append('nameserver 127.0.0.1')      # dnspython insists on one; replaced below
    try:
        stub.read_resolv_conf(io.StringIO('\n'.join(rest) + '\n'))   # search, ndots, timeout
    except (dns.exception.DNSException, ValueError):
        pass                                 # a bad search domain: as if none, like glibc
    stub.nameservers = servers or [dns.nameserver.Do53Nameserver('127.0.0.1', 53)]
    return stub


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver | None:
    host, port = text, 53
    if text.startswith('[') and ']:' in text:
        host, _, port_text = text[1:].partition(']:')
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return None
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return dns.nameserver.Do53Nameserver(host, port)


def _failures(errors) -> str:
    """One line for dnspython's (server, tcp, port, error, response) tuples."""
    parts = []
    for server, tcp, port, error, _ in errors:
        if server.startswith('Do53:'):           # dnspython's `Do53:address@port`
            server = server[5:].rpartition('@')[0]
        where = format_sockaddr((server, port)) + (' over TCP' if tcp else '')
        if isinstance(error, str):
            parts.append(f'DNS error {error} from {where}')
        elif isinstance(error, OSError):
            parts.append(f'cannot query {where}: {error.strerror or error}')
        else:
            parts.append(f'bad answer from {where}: {error or type(error).__name__}')
    return '; '.join(parts) or 'no DNS server could be asked'


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
