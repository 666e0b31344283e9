"""Building a generation, all or nothing: the first half of the reload transaction.

nginx's `ngx_init_cycle()` builds a whole new cycle beside the running one and
returns NULL, leaving the old one untouched, when any step fails. `Builder.build`
does the same for a loaded `Config`, in this order:

    credentials (the workers' user) ─▶ access log file ─▶ connection-limit indices
      ─▶ listening sockets (reused by key, new ones bound) ─▶ admin socket
      ─▶ health-check block (mmap) ─▶ server-state block ─▶ the workers' channel
      (QUIC sessions that move between workers: worker/peers.py)  ═▶  Generation (STARTING)

Each step that makes something registers how to undo it; when a later step raises
(StartupError, OSError: EADDRINUSE, EMFILE, ENOMEM ...; or anything else), what was made
is undone in reverse and the exception goes on to the caller. Nothing here touches
what runs: the running generation's sockets, admin socket and blocks are only shared,
never changed. Forking the workers is the second half (table.py); committing the
config (arbiter.py) comes only once they all serve, and `discard` undoes a generation
that never did.

The Builder owns the master's long-lived shared blocks that generations draw from:
the listening-socket set and the connection-limit table (made the first time a
config has a limit, then kept for the master's life).
"""

from __future__ import annotations

import os

from mpproxy.config import accounts
from mpproxy.config.accounts import Credentials
from mpproxy.config.schema import Config
from mpproxy.errors import StartupError
from mpproxy.master.sockets import SocketSet
from mpproxy.master.workers import Generation, open_peers
from mpproxy.observe import access
from mpproxy.observe import log as logmod
from mpproxy.shared import limits
from mpproxy.upstream import health

log = logmod.log


class Builder:
    def __init__(self, sockets: SocketSet, observer, servers=None):
        self.sockets = sockets
        self.servers = servers                     # master/servers.py: run-time server states
        self.observer = observer                   # binds and closes admin sockets
        self.limits: limits.LimitTable | None = None   # connection counts shared by all workers
        self.next_number = 1

    def build(self, config: Config, live: list[Generation]) -> Generation:
        """A STARTING generation for `config` with everything it needs, or an exception
        with nothing of it left behind. `live`: the generations that still have workers
        (their sockets and limit indices are kept)."""
        undo = []
        try:
            credentials = credentials_for(config)
            prepare_access_log(config, credentials)
            limit_index = self._limit_index(config, live)
            bound = self.sockets.acquire(config)
            undo.append(lambda: self.sockets.release([g.bound for g in live]))
            admin = self.observer.prepare(config)
            undo.append(lambda: self.observer.discard(admin))
            block = health.allocate(config)
            if block is not None:
                undo.append(block.close)
            states = self.servers.allocate(config) if self.servers is not None else None
            peers = open_peers(config)
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:                    # noqa: BLE001 - undo all we can
                    log.exception('while undoing a failed reload')
            raise
        generation = Generation(self.next_number, config, bound, credentials, self.limits,
                                limit_index, block, admin)
        generation.servers = states
        generation.peers = peers
        self.next_number += 1
        return generation

    def discard(self, generation: Generation, live: list[Generation],
                superseded: bool = False) -> None:
        """`generation` never served: close what it alone holds now. Its admin socket, and,
        when its reload failed, the listening sockets no other generation in `live` uses
        (its exiting workers close their own copies). A generation `superseded` by a newer
        reload keeps its listening sockets until its workers are gone: the newer one may
        reuse them (a TCP address cannot be bound twice)."""
        self.observer.discard(generation.admin)
        generation.admin = None
        if not superseded:
            self.sockets.release([g.bound for g in live if g is not generation])

    def _limit_index(self, config: Config, live: list[Generation]) -> dict:
        """Limit indices for `config`'s limited listeners (StartupError if the table is full)."""
        if self.limits is None:
            if not limits.wanted(config):
                return {}
            self.limits = limits.LimitTable.allocate(limits.slots_for(config))
        try:
            return self.limits.assign(config, [g.config for g in live])
        except limits.LimitsFull as exc:
            raise StartupError(str(exc)) from None


def credentials_for(config: Config) -> Credentials | None:
    """Whom the workers of `config` switch to: None unless `user` is set and the master is
    root (else `user` is ignored, with a warning from config/nofile.py)."""
    if config.user is None or os.geteuid() != 0:
        return None
    try:
        return accounts.resolve(config.user, config.group)
    except ValueError as exc:          # the loader checked; the account went away since
        raise StartupError(f'user {config.user}: {exc}') from None


def prepare_access_log(config: Config, credentials: Credentials | None) -> None:
    """Create `config`'s access log file and give it to the user its workers switch to, so
    that they can open (and on USR1 reopen) it by path; StartupError when it cannot be."""
    if config.access_log is None:
        return
    path = config.access_log.path
    try:
        access.prepare(path, credentials.uid if credentials is not None else None)
    except OSError as exc:
        raise StartupError(f'cannot open access log {path}: {exc.strerror or exc}') from None
