"""The configuration as frozen dataclasses: what the rest of mpproxy reads.

Every field's default here is the default of ../shared/DESIGN.md. The loader
(`loader.py`) builds these from YAML and is the only place that validates;
code that receives a `Config` may trust it.

Durations are floats (seconds). Addresses are `Address` values, kept as the
user wrote the host (an IP literal or a DNS name); resolving is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Address:
    host: str            # IP literal ('127.0.0.1', '::1', '0.0.0.0', '::') or a DNS name
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ':' in self.host

    @property
    def is_wildcard(self) -> bool:
        return self.host in ('0.0.0.0', '::')

    def __str__(self) -> str:
        if self.is_ipv6:
            return f'[{self.host}]:{self.port}'
        return f'{self.host}:{self.port}'


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive on both sides of a relay; None fields keep the kernel's value."""
    idle: float | None = None
    interval: float | None = None
    count: int | None = None


@dataclass(frozen=True)
class ProxyProtocol:
    accept: bool = False
    trusted: tuple[str, ...] = ()      # CIDRs
    send: str = 'none'                 # none | v1 | v2


@dataclass(frozen=True)
class UdpOptions:
    responses: int = 0                 # end a session after N replies; 0 = never
    max_sessions: int = 10000          # per worker
    max_sessions_per_ip: int = 0


@dataclass(frozen=True)
class HealthCheck:
    type: str = 'tcp'                  # tcp | udp
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    send: str | None = None
    expect: str | None = None


@dataclass(frozen=True)
class Server:
    address: Address
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    max_conns: int = 0
    backup: bool = False
    slow_start: float | None = None    # back in rotation: weight ramps up over this (0: at
                                       # once; None: the upstream's slow_start)


@dataclass(frozen=True)
class Resolve:
    """When a worker looks an upstream's names up again: once the answer's TTL has run out,
    kept within [min, max] seconds. `resolve: 30s` is min = max = 30: a fixed interval."""
    min: float
    max: float


@dataclass(frozen=True)
class Upstream:
    name: str
    servers: tuple[Server, ...]
    balance: str = 'round_robin'       # round_robin | least_conn | hash | random_two
    hash_key: str = 'client_ip'        # client_ip | client_addr
    health_check: HealthCheck | None = None
    resolve: Resolve | None = None     # re-resolve DNS names; None: only at the start
    slow_start: float = 0.0            # its servers' slow_start unless they set their own


@dataclass(frozen=True)
class AccessLog:
    path: str
    format: str = 'json'               # json | text


@dataclass(frozen=True)
class Admin:
    listen: Address
    token_file: str | None = None      # a bearer token in this file allows writes over TCP
    socket: str | None = None          # a Unix socket (mode 0600): who can connect may write


@dataclass(frozen=True)
class Listener:
    name: str
    listen: Address
    protocol: str                      # tcp | udp
    upstream: str                      # a key of Config.upstreams (inline lists get one)
    backlog: int = 511
    reuseport: bool = False
    ipv6only: bool = True
    keepalive: Keepalive | None = None  # None = off
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0        # the loader uses 30s for udp listeners
    half_close_timeout: float = 60.0
    half_close: bool = True            # false: one side's FIN ends both (nginx's default)
    next_upstream_tries: int = 3
    sni_routes: tuple[tuple[str, str], ...] | None = None
    proxy_protocol: ProxyProtocol = field(default_factory=ProxyProtocol)
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_connections: int = 0
    max_connections_per_ip: int = 0
    upload_rate: int = 0
    download_rate: int = 0
    udp: UdpOptions = field(default_factory=UdpOptions)

    @property
    def key(self) -> tuple[str, str, int]:
        """What identifies a listening socket across reloads."""
        return (self.protocol, self.listen.host, self.listen.port)


@dataclass(frozen=True)
class Config:
    path: str
    workers: int = 1                   # 'auto' is resolved by the loader
    pid_file: str | None = None
    user: str | None = None
    group: str | None = None
    worker_rlimit_nofile: int | None = None
    shutdown_grace: float = 0.0        # QUIT: /readyz fails, listeners accept this long more
    shutdown_timeout: float = 30.0
    max_draining_generations: int = 4
    worker_timeout: float = 30.0
    resolver: tuple[Address, ...] = ()
    error_log: str = 'stderr'
    log_level: str = 'info'            # debug | info | notice | warn | error | crit
    access_log: AccessLog | None = None
    admin: Admin | None = None
    watch_config: bool = False
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    listeners: tuple[Listener, ...] = ()
