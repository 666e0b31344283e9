"""The master's records of its workers and generations, and how one worker is forked.

(Which workers exist over time, and reaching the target, is `table.WorkerTable`.)
A generation is the set of workers started from one loaded config::

    STARTING --every slot said 'r'--> ACTIVE --newer generation active / QUIT--> DRAINING --all exited--> gone
        |                                                                           |
        +-- a worker died before it was ready, a fork failed, or START_TIMEOUT: ----+
            the reload failed (rolled back), its workers get TERM

Only one generation is ACTIVE; the master respawns its dead workers. A
STARTING generation becomes ACTIVE only when all its workers are serving, so
a reload never leaves a slot without a reader.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from mpproxy.config.accounts import Credentials
from mpproxy.config.schema import Config
from mpproxy.master.sockets import Bound
from mpproxy.observe import log as logmod
from mpproxy.observe import metrics
from mpproxy.shared.limits import LimitTable
from mpproxy.worker import process

log = logmod.log

STARTING, ACTIVE, DRAINING = 'starting', 'active', 'draining'


class WorkerHandle:
    """The master's record of one worker process."""

    __slots__ = ('pid', 'slot', 'generation', 'control', 'started', 'last_beat', 'ready',
                 'killed', 'signalled', 'handoff_peer', 'limit_slot', 'metrics')

    def __init__(self, pid: int, slot: int, generation: 'Generation', control: socket.socket):
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.control = control          # the master's end of the socketpair
        self.started = time.monotonic()
        self.last_beat = self.started
        self.ready = False
        self.killed = False             # SIGKILL sent
        self.signalled: int | None = None
        self.handoff_peer: socket.socket | None = None   # goes to the predecessor on promotion
        self.limit_slot: int | None = None  # its area in the connection-limit table; freed at reap
        self.metrics: metrics.Area | None = None  # its metrics snapshots; read and unmapped at reap

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.killed = True
        self.signalled = sig


class Generation:
    """What one loaded config runs on: built whole by `build.Builder` before any worker of it
    is forked (sockets, shared blocks, the admin socket it wants), then its workers."""

    __slots__ = ('number', 'config', 'bound', 'credentials', 'state', 'workers', 'deadline',
                 'loaded_at', 'health', 'limits', 'limit_index', 'layout', 'admin', 'reload',
                 'inherits', 'pausing', 'servers', 'peers', 'kept_inboxes')

    def __init__(self, number: int, config: Config, bound: Bound,
                 credentials: Credentials | None = None,
                 limits: LimitTable | None = None, limit_index: dict | None = None,
                 health_block=None, admin=None):
        self.number = number
        self.config = config
        self.bound = bound
        self.credentials = credentials                 # the user its workers switch to
        self.state = STARTING
        self.workers: dict[int, WorkerHandle] = {}     # slot -> live worker
        self.deadline: float | None = None             # DRAINING: when to TERM what is left
        self.loaded_at = time.monotonic()
        self.health = health_block                     # shared with its workers, or None
        self.limit_index = limit_index or {}           # listener key -> limit index
        self.limits = limits if self.limit_index else None   # the master's table, if it counts
        self.layout = metrics.Layout(config)           # what its workers' metrics values are
        self.admin = admin                             # (address, socket) it serves admin on
        self.reload: int | None = None                 # the reload that made it (control.py)
        self.inherits = False     # the first of a binary upgrade: its workers wait (no time
                                  # limit) for the old master's UDP sessions
        self.servers = None       # shared/servers.StateBlock: run-time server states
        self.pausing = None       # before its UDP flows are steered: [deadline, old workers
                                  # yet to stop reading UDP], then 'done' (table.pause_udp)
        self.peers = None         # [(inbox, sending end)] per slot: worker/peers.py (open_peers)
        self.kept_inboxes: dict[int, socket.socket] = {}  # `inherits`: each slot's inbox (the
                                  # receiving end), kept while the old master may hand over:
                                  # a worker that replaces a dead one waits on the same inbox

    def drop_kept_inboxes(self) -> None:
        """The old master of the binary upgrade is gone: nothing more can arrive."""
        for inbox in self.kept_inboxes.values():
            inbox.close()
        self.kept_inboxes.clear()

    def close_peers(self) -> None:
        for pair in self.peers or ():
            for sock in pair:
                sock.close()
        self.peers = None

    def udp(self) -> bool:
        return any(l.protocol == 'udp' for l in self.config.listeners)

    def inboxes(self) -> list:
        """Every slot's inbox (the sending end), in slot order; None where a slot has none."""
        return [self.workers[slot].handoff_peer if slot in self.workers else None
                for slot in range(self.config.workers)]

    def signal_all(self, sig: int) -> None:
        for worker in self.workers.values():
            worker.signal(sig)

    def all_ready(self) -> bool:
        return (len(self.workers) == self.config.workers
                and all(w.ready for w in self.workers.values()))


def spawn(generation: Generation, slot: int, take_over: bool = False) -> WorkerHandle:
    """Fork one worker for `slot`; the child never returns from here.

    Raises OSError (fork's EAGAIN or ENOMEM, EMFILE for its sockets) with nothing left
    behind: no socket, limit slot or metrics block of the attempt stays open.

    With `take_over`, the worker waits for the UDP sessions of the slot's current
    worker on a socketpair whose other end the master keeps in `handoff_peer`; in a
    generation that `inherits` from an old master, on the slot's kept inbox if it has one
    (it replaces a worker that died while the old master still serves).
    """
    made: list = []                 # what to undo if the fork fails
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    made += (master_end, worker_end)
    peer = successor = None
    # an inbox already offered to the old master is waited on again; before the offer (the
    # generation still starting) a fresh one is made, whose sending end is offered instead
    kept = generation.kept_inboxes.get(slot) \
        if take_over and generation.state != STARTING else None
    try:
        if take_over and kept is None:
            peer, successor = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            made += (peer, successor)
    except BaseException:
        _undo(made)
        raise
    limit_slot = _take_limit_slot(generation, slot)
    area = _metrics_area(generation, slot)
    spec = process.WorkerSpec(
        slot=slot, generation=generation.number, config=generation.config,
        master_pid=os.getpid(), control=worker_end, sockets=generation.bound.for_slot(slot),
        handoff=kept or successor,
        handoff_wait=None if generation.inherits else process.HANDOFF_WAIT,
        health=generation.health,
        servers=generation.servers.block if generation.servers is not None else None, credentials=generation.credentials,
        limits=generation.limits, limit_slot=limit_slot, limit_index=generation.limit_index,
        metrics=area, peers=None if generation.peers is None else (
            generation.peers[slot][0], [tx for _, tx in generation.peers]))
    for handler in log.handlers:     # the child must not write the master's pending lines
        try:
            handler.flush()
        except (OSError, ValueError):    # a full disk under stderr: those lines are lost
            pass
    # The child keeps these blocked until its loop handles them, so a QUIT or TERM sent
    # while it boots waits for it instead of killing it (or reaching the master's handler).
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, process.WORKER_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            process.run(spec)       # ends with os._exit
    except BaseException:
        if limit_slot is not None:
            generation.limits.free_slot(limit_slot)
        if area is not None:
            area.close()
        _undo(made)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    worker_end.close()
    master_end.setblocking(False)
    handle = WorkerHandle(pid, slot, generation, master_end)
    handle.limit_slot = limit_slot
    handle.metrics = area
    if successor is not None:
        if generation.inherits:       # kept: a replacement of this worker waits on it too
            old = generation.kept_inboxes.pop(slot, None)
            if old is not None:
                old.close()
            generation.kept_inboxes[slot] = successor
        else:
            successor.close()
        handle.handoff_peer = peer
    return handle


def open_peers(config: Config) -> list | None:
    """The channel between the workers of a generation (worker/peers.py): one SOCK_DGRAM
    socketpair per slot, (inbox, sending end). Only a config with more than one worker and
    a udp listener routing QUIC by name (sni_routes) has one: else None."""
    if config.workers < 2 or not any(l.protocol == 'udp' and l.sni_routes is not None
                                     for l in config.listeners):
        return None
    pairs: list = []
    try:
        for _ in range(config.workers):
            pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM))
    except OSError:
        for pair in pairs:
            _undo(pair)
        raise
    return pairs


def _undo(sockets: list) -> None:
    for sock in sockets:
        sock.close()


def _take_limit_slot(generation: Generation, slot: int) -> int | None:
    """An area of the connection-limit table for a worker about to be forked, if it counts."""
    if generation.limits is None:
        return None
    limit_slot = generation.limits.take_slot()
    if limit_slot is None:
        log.warning('worker %d (generation %d): no free slot in the connection-limit table; '
                    'it counts its connections privately (it sees the other workers\' counts, '
                    'they do not see its own)', slot, generation.number)
    return limit_slot


def _metrics_area(generation: Generation, slot: int) -> metrics.Area | None:
    """The shared block a worker about to be forked publishes its metrics in."""
    try:
        return metrics.Area.allocate(generation.layout)
    except OSError as exc:
        log.warning('worker %d (generation %d): no memory for its metrics (%s); /metrics '
                    'will not count it', slot, generation.number, exc.strerror or exc)
        return None


def handover_plan(inboxes: list, steered: int | None):
    """How a draining generation's workers hand their UDP sessions to `inboxes` (the new
    workers' sending ends by slot, None where a slot has none): plan(slot) -> (inboxes,
    slots) for `drain_with_handoff`, or None (no hand-over: QUIT). With `steered` (the
    flows were just steered to that many slots) and every inbox there, each session goes to
    its client's slot; otherwise to its own slot's successor."""
    if steered is not None and len(inboxes) == steered and all(i is not None for i in inboxes):
        return lambda slot: (inboxes, steered)

    def same_slot(slot: int):
        inbox = inboxes[slot] if slot < len(inboxes) else None
        return ([inbox], None) if inbox is not None else None
    return same_slot


def close_handoff(worker: WorkerHandle) -> None:
    """Give up a pending handoff: the worker sees EOF and starts serving UDP itself."""
    if worker.handoff_peer is not None:
        worker.handoff_peer.close()
        worker.handoff_peer = None


def drain_with_handoff(old: WorkerHandle, inboxes: list[socket.socket],
                       slots: int | None = None) -> None:
    """Tell `old` to drain and to hand its UDP sessions to `inboxes`: one `Q` with their
    fds; `Q{"slots": M}` when the flows were just steered to M slots (inbox i = slot i),
    else every session goes to the one inbox (its slot's successor)."""
    message = b'Q' if slots is None else b'Q' + json.dumps({'slots': slots}).encode() + b'\n'
    try:
        socket.send_fds(old.control, [message], [inbox.fileno() for inbox in inboxes])
    except OSError:               # the old worker is gone: the new ones see EOF and go on
        old.signal(signal.SIGQUIT)
    old.signalled = signal.SIGQUIT
