"""The worker table: generations of worker processes and how one is forked.

A generation is the set of workers started from one loaded config::

    STARTING --every slot said 'r'--> ACTIVE --newer generation active / QUIT--> DRAINING --all exited--> gone
        |                                                                           |
        +-- a worker died before it was ready: the reload failed, TERM -------------+

Only one generation is ACTIVE; the master respawns its dead workers. A
STARTING generation becomes ACTIVE only when all its workers are serving, so
a reload never leaves a slot without a reader.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from mpproxy.config.schema import Config
from mpproxy.master.sockets import Bound
from mpproxy.observe import log as logmod
from mpproxy.worker import process

log = logmod.log

STARTING, ACTIVE, DRAINING = 'starting', 'active', 'draining'


class WorkerHandle:
    """The master's record of one worker process."""

    __slots__ = ('pid', 'slot', 'generation', 'control', 'started', 'last_beat', 'ready',
                 'killed', 'signalled')

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

    def signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.killed = True
        self.signalled = sig


class Generation:
    __slots__ = ('number', 'config', 'bound', 'state', 'workers', 'deadline', 'loaded_at')

    def __init__(self, number: int, config: Config, bound: Bound):
        self.number = number
        self.config = config
        self.bound = bound
        self.state = STARTING
        self.workers: dict[int, WorkerHandle] = {}     # slot -> live worker
        self.deadline: float | None = None             # DRAINING: when to TERM what is left
        self.loaded_at = time.time()

    def signal_all(self, sig: int) -> None:
        for worker in self.workers.values():
            worker.signal(sig)

    def all_ready(self) -> bool:
        return (len(self.workers) == self.config.workers
                and all(w.ready for w in self.workers.values()))


def spawn(generation: Generation, slot: int) -> WorkerHandle:
    """Fork one worker for `slot`; the child never returns from here."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    spec = process.WorkerSpec(
        slot=slot, generation=generation.number, config=generation.config,
        master_pid=os.getpid(), control=worker_end, sockets=generation.bound.for_slot(slot))
    for handler in log.handlers:
        handler.flush()
    pid = os.fork()
    if pid == 0:
        process.run(spec)       # ends with os._exit
    worker_end.close()
    master_end.setblocking(False)
    return WorkerHandle(pid, slot, generation, master_end)
