"""The worker table: every generation's workers over time, and reconciling them.

`WorkerTable` owns the generations (oldest first), each slot's respawn back-off, the
record of failed forks, and the workers' control sockets in the master's selector. It
never touches sockets, shared blocks or the config: those belong to the arbiter and the
builder. The arbiter calls, on every turn of its loop (gunicorn's `manage_workers`,
nginx's `ngx_reap_children` + `ngx_start_worker_processes`):

    reap()          wait for exited children; a worker's slot is freed, its limits area
                    zeroed, its last metrics retired (the `retire` callback)
    manage(n)       move every generation towards its target (below); n: how many draining
                    generations may stay
    events()        what the arbiter must act on, once each:
                      ('ready', g)        g's workers all serve: promote(g), then commit
                      ('failed', g, why)  g never served; its workers already got TERM
                      ('finished', g)     g's last worker is gone: release its sockets
                      ('child', pid, st)  a child that is no worker (the USR2 master)
                      ('grace_over',)     QUIT's shutdown_grace has run out: the arbiter
                                          drains; reported on every pass until quit() or term()

and, on its own decisions: add(g) a built generation, promote(g), supersede(g), grace(s),
quit(), term(). Stopping (`stopping`, and `grace_until` for the grace):

    serving --QUIT, shutdown_grace > 0--> grace --grace_over, or a 2nd QUIT--> quit --> exit
       +--QUIT, no grace (none set, or a binary upgrade) ------------------------^
    serving, grace or quit --TERM, INT--> term --> exit

During the grace nothing changes for the workers: they accept, read UDP and are
respawned as ever; only the arbiter and the probes (status.py) know the master stops.

`manage` forks the missing workers of ACTIVE and STARTING generations; a fork
that fails (EAGAIN from a pids cgroup or RLIMIT_NPROC, ENOMEM, EMFILE for its sockets)
fails a STARTING generation (the reload fails, nothing else changes) and puts an ACTIVE
slot on the respawn back-off (0.5 s doubling to 30 s), logged once per slot and cause per
FORK_LOG_INTERVAL. It also fails a STARTING generation that is not serving within
START_TIMEOUT, kills workers without heartbeat for `worker_timeout`, sends TERM and then
SIGKILL to what outlives a drain deadline, and forgets finished generations.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import selectors
import signal
import time

from mpproxy.errors import EXIT_WORKER_BOOT
from mpproxy.master.workers import (ACTIVE, DRAINING, STARTING, Generation, WorkerHandle,
                                    close_handoff, drain_with_handoff, handover_plan, spawn)
from mpproxy.observe import log as logmod

log = logmod.log

TERM_GRACE = 1.0          # after a fast stop's TERM, SIGKILL
CLOSE_SLACK = 1.5         # a worker closes by itself at shutdown_timeout; TERM only after this
KILL_GRACE = 2.0          # after a drain deadline's TERM, SIGKILL
BACKOFF_MAX = 30.0        # a slot whose worker keeps dying (or cannot be forked) waits this long
STABLE_AFTER = 10.0       # a worker that lived this long resets its slot's back-off
START_TIMEOUT = 10.0      # a new generation's workers must all be serving by then
FORK_LOG_INTERVAL = 30.0  # one line per slot and fork failure cause per this many seconds
PAUSE_WAIT = 1.0          # how long the old workers may take to stop reading UDP (pause_udp)


class WorkerTable:
    def __init__(self, selector: selectors.BaseSelector, retire):
        self.selector = selector
        self.retire = retire                      # retire(worker): its last metrics counted
        self.generations: list[Generation] = []   # oldest first
        self.backoff: dict[int, tuple[int, float]] = {}   # slot -> (failures, not before)
        self.unforked: dict[int, int] = {}        # slot -> forks failed in a row
        self.fork_reports: dict[tuple[int, int], list] = {}   # (slot, errno) -> [next, quiet]
        self.stopping: str | None = None          # None | 'quit' | 'term'
        self.grace_until: float | None = None     # QUIT's shutdown_grace: serving until then
        self.stop_deadline: float | None = None
        self._events: list[tuple] = []

    # -- what the arbiter reads -------------------------------------------------------------
    def live_workers(self) -> list[WorkerHandle]:
        return [w for g in self.generations for w in g.workers.values()]

    def active(self) -> Generation | None:
        return next((g for g in self.generations if g.state == ACTIVE), None)

    def starting(self) -> list[Generation]:
        return [g for g in self.generations if g.state == STARTING]

    def events(self) -> list[tuple]:
        events, self._events = self._events, []
        return events

    # -- what the arbiter decides -----------------------------------------------------------
    def add(self, generation: Generation) -> None:
        """A built generation; its workers are forked by the next `manage`."""
        self.generations.append(generation)

    def promote(self, generation: Generation, steered: int | None = None) -> None:
        """All workers of a starting generation serve: it becomes active, the old one drains,
        handing its UDP sessions to the new workers: slot by slot, or with `steered` (the
        flows were just steered to that many slots) each to the slot its client now reaches.
        Then the master's copies of the inboxes close: EOF once the old workers are done."""
        generation.state = ACTIVE
        plan = handover_plan(generation.inboxes(), steered)
        for other in self.generations:
            if other is not generation and other.state in (ACTIVE, STARTING):
                self._drain(other, quiet=other.state == STARTING, handover=plan)
        for worker in generation.workers.values():
            close_handoff(worker)

    def pause_udp(self, generation: Generation) -> None:
        """`generation` serves and will steer the UDP flows to a new worker count: first the
        active generation's workers stop reading their UDP sockets (`S`, answered `s`), so
        that none reads a flow the new program sends it before it hands its sessions over.
        ('ready', generation) comes again once all answered, or after PAUSE_WAIT."""
        active = self.active()
        waiting = set()
        for worker in active.workers.values() if active is not None else ():
            try:
                worker.control.send(b'S')
                waiting.add(worker.slot)
            except OSError:
                pass
        generation.pausing = [time.monotonic() + PAUSE_WAIT, waiting]

    def pause_udp_now(self, timeout: float = PAUSE_WAIT) -> None:
        """`pause_udp` at QUIT after USR2, when the master cannot wait a loop turn: ask the
        active workers to stop reading UDP and wait here (at most `timeout`) for each `s`."""
        active = self.active()
        waiting = {}
        for worker in active.workers.values() if active is not None else ():
            try:
                worker.control.send(b'S')
                waiting[worker.control] = worker
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            ready, _, _ = select.select(list(waiting), [], [], deadline - time.monotonic())
            for sock in ready:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b''
                worker = waiting[sock]
                if data:
                    worker.last_beat = time.monotonic()
                if not data or b's' in data:
                    del waiting[sock]

    def resume_udp(self) -> None:
        """A reload that paused the active workers' UDP failed: they read again (`R`)."""
        active = self.active()
        for worker in active.workers.values() if active is not None else ():
            try:
                worker.control.send(b'R')
            except OSError:
                pass

    def supersede(self, generation: Generation) -> None:
        """A newer reload replaces a generation still starting: its workers drain (they
        serve nothing yet) and it is forgotten once they are gone. If it had paused the
        active workers' UDP (pause_udp), they read again: the newer one pauses anew."""
        if isinstance(generation.pausing, list):
            generation.pausing = None
            self.resume_udp()
        self._drain(generation, quiet=True)

    def grace(self, seconds: float) -> None:
        """QUIT with shutdown_grace: every generation serves on for `seconds` (the workers
        are told nothing), then `manage` reports ('grace_over',)."""
        self.grace_until = time.monotonic() + seconds

    def grace_left(self) -> float | None:
        """The seconds of shutdown_grace left (0.0 once it ran out), None outside a grace."""
        if self.grace_until is None:
            return None
        return max(0.0, self.grace_until - time.monotonic())

    def quit(self, handover=None) -> None:
        """Drain every generation; `handover` (a `handover_plan`, at the end of a binary
        upgrade): the active one's UDP sessions go to the new master's workers."""
        self.stopping = 'quit'
        self.grace_until = None
        for generation in self.generations:
            self._drain(generation, handover=handover if generation.state == ACTIVE else None)

    def term(self) -> None:
        self.stopping = 'term'
        self.grace_until = None
        self.stop_deadline = time.monotonic() + TERM_GRACE
        for generation in self.generations:
            generation.signal_all(signal.SIGTERM)

    def signal_all(self, sig: int) -> None:
        for generation in self.generations:
            generation.signal_all(sig)

    def kill_all(self) -> None:
        for worker in self.live_workers():
            worker.signal(signal.SIGKILL)

    # -- children ---------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if pid == 0:
                return
            if not self._worker_exited(pid, status):
                self._events.append(('child', pid, status))

    def _worker_exited(self, pid: int, status: int) -> bool:
        for generation in self.generations:
            for slot, worker in list(generation.workers.items()):
                if worker.pid == pid:
                    del generation.workers[slot]
                    self._forget(worker)
                    self._judge_exit(worker, status)
                    return True
        return False

    def _forget(self, worker: WorkerHandle) -> None:
        close_handoff(worker)
        if worker.limit_slot is not None:     # it has exited: zero what it counted
            worker.generation.limits.free_slot(worker.limit_slot)
        try:
            self.selector.unregister(worker.control)
        except (KeyError, ValueError):
            pass
        worker.control.close()
        self.retire(worker)                   # its last counts join the retired totals

    def _judge_exit(self, worker: WorkerHandle, status: int) -> None:
        generation = worker.generation
        code = os.waitstatus_to_exitcode(status)
        expected = generation.state == DRAINING or self.stopping or worker.signalled is not None
        how = f'exited with code {code}' if code >= 0 else f'was killed by {signal.Signals(-code).name}'
        if expected and code in (0, -signal.SIGTERM, -signal.SIGKILL, -signal.SIGQUIT):
            log.info('worker %d (pid %d, generation %d) %s', worker.slot, worker.pid,
                     generation.number, how)
            return
        if generation.state == STARTING and not worker.ready:
            self._fail(generation, f'worker {worker.slot} {how} before it was ready')
            return
        if self.stopping:
            return
        failures, _ = self.backoff.get(worker.slot, (0, 0.0))
        lived = time.monotonic() - worker.started
        failures = 1 if lived >= STABLE_AFTER and code != EXIT_WORKER_BOOT else failures + 1
        delay = 0.0 if failures <= 1 else min(BACKOFF_MAX, 0.5 * 2 ** (failures - 2))
        self.backoff[worker.slot] = (failures, time.monotonic() + delay)
        log.error('worker %d (pid %d) %s unexpectedly; respawning%s', worker.slot, worker.pid,
                  how, f' in {delay:.1f}s (it keeps dying)' if delay else '')

    # -- reconcile --------------------------------------------------------------------------
    def manage(self, max_draining: int) -> None:
        now = time.monotonic()
        for generation in list(self.generations):
            if generation.state in (ACTIVE, STARTING) and not self.stopping:
                self._spawn_missing(generation, now)
            if generation.state == STARTING and generation.all_ready():
                pausing = generation.pausing
                if isinstance(pausing, list) and (not pausing[1] or now >= pausing[0]):
                    generation.pausing = pausing = 'done'
                if not isinstance(pausing, list):
                    self._events.append(('ready', generation))
            self._watch_heartbeats(generation, now)
            if generation.state == DRAINING and generation.deadline is not None:
                if now >= generation.deadline + KILL_GRACE:
                    for worker in generation.workers.values():
                        if not worker.killed:
                            log.warning('worker %d (pid %d) did not stop, killing it',
                                        worker.slot, worker.pid)
                            worker.signal(signal.SIGKILL)
                elif now >= generation.deadline:
                    for worker in generation.workers.values():
                        if worker.signalled not in (signal.SIGTERM, signal.SIGKILL):
                            worker.signal(signal.SIGTERM)
            if generation.state == DRAINING and not generation.workers:
                self.generations.remove(generation)
                generation.close_peers()
                generation.drop_kept_inboxes()
                self._events.append(('finished', generation))
        self._limit_draining(max_draining)
        if self.grace_until is not None and now >= self.grace_until:
            self._events.append(('grace_over',))
        if self.stopping == 'term' and self.stop_deadline and now >= self.stop_deadline:
            for worker in self.live_workers():
                if not worker.killed:
                    worker.signal(signal.SIGKILL)

    def _fail(self, generation: Generation, why: str) -> None:
        """A starting generation will never serve: TERM its workers, tell the arbiter once."""
        if generation.state != STARTING:
            return
        self._drain(generation, quiet=True)
        generation.signal_all(signal.SIGTERM)
        self._events.append(('failed', generation, why))

    def _spawn_missing(self, generation: Generation, now: float) -> None:
        if generation.state == STARTING and now - generation.loaded_at > START_TIMEOUT \
                and not generation.all_ready():
            self._fail(generation, f'its workers did not start within {START_TIMEOUT:g}s')
            return
        for slot in range(generation.config.workers):
            if slot in generation.workers:
                continue
            if generation.state == ACTIVE:
                _, not_before = self.backoff.get(slot, (0, 0.0))
                if now < not_before:
                    continue
            try:
                worker = spawn(generation, slot,
                               take_over=self._has_udp_to_take(generation, slot))
            except OSError as exc:
                if generation.state == STARTING:
                    self._fail(generation, f'cannot fork worker {slot}: {exc.strerror or exc}')
                    return
                self._fork_failed(generation, slot, exc, now)
                continue
            generation.workers[slot] = worker
            self.selector.register(worker.control, selectors.EVENT_READ,
                                   functools.partial(self._on_control, worker))
            failed = self.unforked.pop(slot, 0)
            if failed:
                for key in [k for k in self.fork_reports if k[0] == slot]:
                    del self.fork_reports[key]
                log.log(logmod.NOTICE, 'worker %d (pid %d, generation %d) forked after %d '
                        'failed attempt(s)', slot, worker.pid, generation.number, failed)

    def _fork_failed(self, generation: Generation, slot: int, exc: OSError, now: float) -> None:
        """An ACTIVE slot could not be forked: retry on the back-off, say so once per cause."""
        failures = self.backoff.get(slot, (0, 0.0))[0] + 1
        delay = min(BACKOFF_MAX, 0.5 * 2 ** max(0, failures - 2))
        self.backoff[slot] = (failures, now + delay)
        self.unforked[slot] = self.unforked.get(slot, 0) + 1
        report = self.fork_reports.get((slot, exc.errno))
        if report is not None and now < report[0]:
            report[1] += 1
            return
        quiet = f' ({report[1]} more failure(s) not logged)' if report and report[1] else ''
        log.error('cannot fork worker %d (generation %d): %s; retrying in %.1fs%s', slot,
                  generation.number, exc.strerror or exc, delay, quiet)
        self.fork_reports[(slot, exc.errno)] = [now + FORK_LOG_INTERVAL, 0]

    def _has_udp_to_take(self, generation: Generation, slot: int) -> bool:
        """A starting worker takes over UDP sessions of the active generation (its slot's,
        or any slot's when the worker count changes), or of the old master (`inherits`);
        so does one that replaces a dead worker while the old master may still hand over."""
        if not generation.udp():
            return False
        if generation.state != STARTING:
            return slot in generation.kept_inboxes
        return generation.inherits or any(g.state == ACTIVE and g.udp() for g in self.generations)

    def _on_control(self, worker: WorkerHandle) -> None:
        """A worker's control socket: heartbeats ('.' a second) and 'r' once it serves."""
        try:
            data = worker.control.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b''
        if not data:
            self.selector.unregister(worker.control)
            return
        worker.last_beat = time.monotonic()
        if b'r' in data and not worker.ready:
            worker.ready = True
        if b's' in data:          # it stopped reading UDP (pause_udp)
            for generation in self.generations:
                if isinstance(generation.pausing, list) and worker.generation.state == ACTIVE:
                    generation.pausing[1].discard(worker.slot)

    def _watch_heartbeats(self, generation: Generation, now: float) -> None:
        timeout = generation.config.worker_timeout
        for worker in generation.workers.values():
            if not worker.killed and now - worker.last_beat > timeout:
                # Read what it sent first: after the master itself was stopped (SIGSTOP, a
                # starved host) the poll that woke it may have returned nothing, and its
                # beats still wait unread in the socket.
                self._on_control(worker)
            if not worker.killed and now - worker.last_beat > timeout:
                log.error('worker %d (pid %d) gave no heartbeat for %ss, killing it',
                          worker.slot, worker.pid, fmt(timeout))
                worker.signal(signal.SIGKILL)

    def _drain(self, generation: Generation, quiet: bool = False, handover=None) -> None:
        if generation.state == DRAINING:
            return
        generation.state = DRAINING
        generation.drop_kept_inboxes()        # the old master's sessions can no longer come
        generation.deadline = time.monotonic() + generation.config.shutdown_timeout + CLOSE_SLACK
        if not quiet:
            log.info('generation %d draining (%d worker(s))', generation.number,
                     len(generation.workers))
        for slot, worker in generation.workers.items():
            close_handoff(worker)             # it never got sessions: nothing to wait for
            plan = handover(slot) if handover is not None else None
            if plan is not None:
                drain_with_handoff(worker, *plan)
            else:
                worker.signal(signal.SIGQUIT)

    def _limit_draining(self, max_draining: int) -> None:
        draining = [g for g in self.generations if g.state == DRAINING]
        excess = len(draining) - max_draining
        for generation in draining[:max(0, excess)]:
            if generation.deadline > time.monotonic():
                log.warning('too many draining generations, generation %d finishes now',
                            generation.number)
                generation.deadline = time.monotonic()


def fmt(seconds: float) -> str:
    return f'{seconds:g}'
