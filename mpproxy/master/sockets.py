"""The master's listening sockets: bound once, shared by generations, diffed by key.

A key is (protocol, host, port). Its value is a list of sockets indexed by
worker slot: TCP listeners have one shared socket (every slot uses index 0)
unless `reuseport`, UDP listeners one SO_REUSEPORT socket per slot. A reload
`acquire()`s the sockets of the new config: a key already held is reused as it
is (the same socket, so no accept queue is reset and no UDP flow re-hashes), a
new key is bound; if anything fails, only what this call bound is closed.
A socket is closed when no live generation refers to it any more (`release`).

A UDP listener's flows are steered by the proxy (shared/steer.py: a reuseport BPF
program attached when the group is bound), not by the kernel's secret hash, so
that the master knows which slot a client reaches after the number of workers
changes (`steer`): sockets bound for new slots get nothing until the program
for the new count replaces the old one, and sockets of removed slots, always
the last ones of the group, leave it without moving the others.
"""

from __future__ import annotations

import json
import os
import socket

from mpproxy.config.schema import Config, Listener
from mpproxy.errors import StartupError
from mpproxy.observe import log as logmod
from mpproxy.shared import steer

log = logmod.log

Key = tuple[str, str, int]
INHERIT_ENV = 'MPPROXY_INHERIT'   # listening sockets passed to an upgraded master (USR2)
IP_PKTINFO = getattr(socket, 'IP_PKTINFO', 8)      # missing from Python 3.11's socket module


class Bound:
    """The sockets one generation uses: listener → list indexed by slot."""

    def __init__(self, entries: list[tuple[Listener, list[socket.socket], bool]]):
        self.entries = entries          # (listener, sockets, per_slot)

    def for_slot(self, slot: int) -> tuple[tuple[Listener, socket.socket], ...]:
        return tuple((listener, socks[slot] if per_slot else socks[0])
                     for listener, socks, per_slot in self.entries)

    def all_sockets(self) -> set[socket.socket]:
        return {sock for _, socks, _ in self.entries for sock in socks}


class SocketSet:
    def __init__(self):
        self._held: dict[Key, list[socket.socket]] = {}
        self._mode: dict[Key, tuple] = {}
        self._steered: dict[Key, int] = {}    # UDP key -> slots its flows are steered to
                                              # (0: the kernel's hash; steering failed)

    def acquire(self, config: Config) -> Bound:
        """Bind or reuse every listener of `config`; all or nothing (raises StartupError)."""
        new: list[socket.socket] = []
        entries = []
        try:
            for listener in config.listeners:
                per_slot = listener.protocol == 'udp' or listener.reuseport
                wanted = config.workers if per_slot else 1
                key = listener.key
                mode = (per_slot, listener.ipv6only)
                held = self._held.get(key)
                if held is not None and self._mode[key] != mode:
                    raise StartupError(
                        f'listener {listener.name}: changing reuseport or ipv6only of a bound '
                        f'address needs a restart')
                socks = list(held or ())
                while len(socks) < wanted:
                    sock = _bind(listener)
                    new.append(sock)
                    socks.append(sock)
                if held is not None and listener.protocol == 'tcp':
                    for sock in socks[:wanted]:
                        sock.listen(listener.backlog)   # a changed backlog applies at once
                entries.append((listener, socks[:wanted], per_slot))
        except BaseException:
            for sock in new:
                sock.close()
            raise
        for listener, socks, per_slot in entries:
            key = listener.key
            if listener.protocol == 'udp' and key not in self._held:
                self._steered[key] = _attach(listener.name, socks[0], len(socks))
            held = self._held.setdefault(key, [])
            held.extend(s for s in socks if s not in held)
            self._mode[key] = (per_slot, listener.ipv6only)
        return Bound(entries)

    def steer(self, bound: Bound, slots: int) -> int | None:
        """Steer the UDP listeners of `bound` to `slots` slots (their worker count changed):
        `slots` when some flows moved, and each session must follow its client; None when
        nothing moved, or steering failed (logged: sessions then stay in their slot)."""
        moved = failed = False
        for listener, socks, _ in bound.entries:
            key = listener.key
            current = self._steered.get(key, 0)
            if listener.protocol != 'udp' or not current or current == slots:
                failed = failed or (listener.protocol == 'udp' and not current)
                continue
            self._steered[key] = _attach(listener.name, socks[0], slots)
            moved = True
            failed = failed or not self._steered[key]
        return slots if moved and not failed else None

    def resteer(self, bound: Bound, slots: int) -> None:
        """Attach the program for `slots` again to every steered UDP listener of `bound`,
        whatever it is believed to be steered to (another master may have attached its own)."""
        for listener, socks, _ in bound.entries:
            if listener.protocol == 'udp' and self._steered.get(listener.key):
                self._steered[listener.key] = _attach(listener.name, socks[0], slots)

    def steerable(self, bound: Bound) -> bool:
        """Every UDP listener of `bound` that existed before is steered (steer() can move
        its flows)."""
        return all(self._steered.get(l.key, 0) for l, _, _ in bound.entries
                   if l.protocol == 'udp' and l.key in self._held)

    def assume_steered(self, bound: Bound, slots: int) -> None:
        """An upgraded master: its UDP listeners will be steered to `slots` by the old master
        when it hands its sessions over (or are already)."""
        for listener, _, _ in bound.entries:
            if self._steered.get(listener.key):
                self._steered[listener.key] = slots

    def export(self) -> str:
        """The held sockets as the value of INHERIT_ENV, made inheritable for an exec."""
        entries = []
        for key, socks in self._held.items():
            for sock in socks:
                os.set_inheritable(sock.fileno(), True)
            entries.append([*key, *self._mode[key], [s.fileno() for s in socks],
                            self._steered.get(key, 0)])
        return json.dumps(entries)

    def adopt(self, value: str) -> None:
        """Take the sockets an upgrading master passed in INHERIT_ENV; bad entries are skipped."""
        try:
            entries = json.loads(value)
        except ValueError:
            return
        for entry in entries if isinstance(entries, list) else ():
            try:
                proto, host, port, per_slot, ipv6only, fds, *more = entry
                socks = [socket.socket(fileno=int(fd)) for fd in fds]
                steered = int(more[0]) if more else 0
            except (ValueError, TypeError, OSError):
                continue
            for sock in socks:
                os.set_inheritable(sock.fileno(), False)
                sock.setblocking(False)
            key = (proto, host, int(port))
            self._held[key] = socks
            self._mode[key] = (bool(per_slot), bool(ipv6only))
            if proto == 'udp':
                self._steered[key] = steered

    def shutdown_unused(self, active: Bound) -> None:
        """Stop accepting on TCP sockets the active generation no longer listens on.

        They stay open (old workers hold copies) until `release` closes them.
        """
        in_use = active.all_sockets()
        for key, socks in self._held.items():
            if key[0] != 'tcp':
                continue
            for sock in socks:
                if sock not in in_use:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def release(self, live: list[Bound]) -> None:
        """Close every socket no live generation uses."""
        in_use = set()
        for bound in live:
            in_use |= bound.all_sockets()
        for key in list(self._held):
            keep = [s for s in self._held[key] if s in in_use]
            for sock in self._held[key]:
                if sock not in in_use:
                    sock.close()
            if keep:
                self._held[key] = keep
            else:
                del self._held[key]
                del self._mode[key]
                self._steered.pop(key, None)

    def close_all(self) -> None:
        for socks in self._held.values():
            for sock in socks:
                sock.close()
        self._held.clear()
        self._mode.clear()
        self._steered.clear()

    def fds(self) -> list[int]:
        return [s.fileno() for socks in self._held.values() for s in socks]


def _attach(name: str, sock: socket.socket, slots: int) -> int:
    """Steer a UDP group's flows to `slots` slots: `slots`, or 0 when the kernel refuses."""
    try:
        steer.attach(sock, slots)
    except OSError as exc:
        log.warning('udp listener %s: cannot steer its flows (%s); a change of the number '
                    'of workers will move clients to new UDP sessions', name,
                    exc.strerror or exc)
        return 0
    return slots


def _bind(listener: Listener) -> socket.socket:
    addr = listener.listen
    family = socket.AF_INET6 if addr.is_ipv6 else socket.AF_INET
    udp = listener.protocol == 'udp'
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if udp or listener.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(listener.ipv6only))
        if udp and addr.is_wildcard:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                if not listener.ipv6only:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((addr.host, addr.port))
        if not udp:
            sock.listen(listener.backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f'cannot bind {listener.protocol} {addr}: {exc.strerror or exc}') from None
    return sock
