"""The master's worker table over time: reaping children, judging exits, and reconciling.

`Children` is a mixin of `arbiter.Arbiter` (it owns no state of its own). Each turn of
the main loop reaps what exited (`reap`: a worker's slot is freed, its limits area
zeroed, its last metrics retired) and lets `manage_workers` move every generation
towards its target: fork missing workers (with back-off for a slot whose worker keeps
dying), promote a STARTING generation once all its workers serve (or fail it after
START_TIMEOUT), kill workers without heartbeat, TERM then SIGKILL what outlives a
drain deadline, and forget finished generations.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal
import time

from mpproxy.errors import EXIT_FAILURE, EXIT_WORKER_BOOT
from mpproxy.master import daemon, notify, upgrade
from mpproxy.master.workers import (ACTIVE, DRAINING, STARTING, Generation, WorkerHandle,
                                    close_handoff, spawn)
from mpproxy.observe import log as logmod

log = logmod.log

KILL_GRACE = 2.0          # after a drain deadline's TERM, SIGKILL
BACKOFF_MAX = 30.0        # a slot whose worker keeps dying waits at most this long
STABLE_AFTER = 10.0       # a worker that lived this long resets its slot's back-off
START_TIMEOUT = 10.0      # a new generation's workers must all be serving by then


class Children:
    __slots__ = ()

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
            self._worker_exited(pid, status)

    def _worker_exited(self, pid: int, status: int) -> None:
        if pid == self.upgrade_pid:
            self.upgrade_pid = None
            upgrade.restore_pidfile(self.pidfile)     # before the log line: whoever reads it
            log.error('binary upgrade failed: the new master (pid %d) exited with code %d; '
                      'this master goes on serving', pid, os.waitstatus_to_exitcode(status))
            if not self.stopping:     # take the service back, should the new one have had it
                notify.send(READY=1, STATUS='binary upgrade failed; serving from this master',
                            MAINPID=os.getpid())
            return
        for generation in self.generations:
            for slot, worker in list(generation.workers.items()):
                if worker.pid == pid:
                    del generation.workers[slot]
                    self._forget(worker)
                    self._judge_exit(worker, status)
                    return

    def _forget(self, worker: WorkerHandle) -> None:
        close_handoff(worker)
        if worker.limit_slot is not None:     # it has exited: zero what it counted
            self.limits.free_slot(worker.limit_slot)
        self.observer.retire(worker)          # its last counts join the retired totals
        try:
            self.selector.unregister(worker.control)
        except (KeyError, ValueError):
            pass
        worker.control.close()

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
            self._start_failed(generation, f'worker {worker.slot} {how} before it was ready')
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
    def manage_workers(self) -> None:
        now = time.monotonic()
        for generation in list(self.generations):
            if generation.state in (ACTIVE, STARTING) and not self.stopping:
                self._spawn_missing(generation, now)
            if generation.state == STARTING and generation.all_ready():
                self._promote(generation)
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
                self.sockets.release([g.bound for g in self.generations])
                log.info('generation %d finished', generation.number)
        self._limit_draining()
        if self.stopping == 'term' and self.stop_deadline and now >= self.stop_deadline:
            for worker in self._live_workers():
                if not worker.killed:
                    worker.signal(signal.SIGKILL)

    def _start_failed(self, generation: Generation, why: str) -> None:
        """A starting generation failed: a reload keeps the old one; a first start stops."""
        self._drain(generation, quiet=True)
        generation.signal_all(signal.SIGTERM)
        if self.started:
            log.error('reload failed: generation %d: %s; keeping the running generation',
                      generation.number, why)
            self._reload_done(f'reload failed: generation {generation.number}: {why}; '
                              'keeping the running generation')
            return
        log.error('cannot start: %s', why)
        daemon.report(self.ready_fd, f'mpproxy: cannot start: {why}\n')
        self.ready_fd = None
        self.exit_code = EXIT_FAILURE
        self.handle_term()

    def _spawn_missing(self, generation: Generation, now: float) -> None:
        if generation.state == STARTING and now - generation.loaded_at > START_TIMEOUT \
                and not generation.all_ready():
            self._start_failed(generation, f'its workers did not start within {START_TIMEOUT:g}s')
            return
        for slot in range(generation.config.workers):
            if slot in generation.workers:
                continue
            if generation.state == ACTIVE:
                failures, not_before = self.backoff.get(slot, (0, 0.0))
                if now < not_before:
                    continue
            worker = spawn(generation, slot, take_over=self._has_udp_to_take(generation, slot))
            generation.workers[slot] = worker
            self.selector.register(worker.control, selectors.EVENT_READ,
                                   lambda w=worker: self._on_control(w))

    def _has_udp_to_take(self, generation: Generation, slot: int) -> bool:
        """A starting worker takes over the UDP sessions of the active worker of its slot."""
        if generation.state != STARTING:
            return False
        if not any(l.protocol == 'udp' for l in generation.config.listeners):
            return False
        return any(g.state == ACTIVE and slot in g.workers
                   and any(l.protocol == 'udp' for l in g.config.listeners)
                   for g in self.generations)

    def _watch_heartbeats(self, generation: Generation, now: float) -> None:
        timeout = generation.config.worker_timeout
        for worker in generation.workers.values():
            if not worker.killed and now - worker.last_beat > timeout:
                log.error('worker %d (pid %d) gave no heartbeat for %ss, killing it',
                          worker.slot, worker.pid, _fmt(timeout))
                worker.signal(signal.SIGKILL)

    def _limit_draining(self) -> None:
        draining = [g for g in self.generations if g.state == DRAINING]
        excess = len(draining) - self.config.max_draining_generations
        for generation in draining[:max(0, excess)]:
            if generation.deadline > time.monotonic():
                log.warning('too many draining generations, generation %d finishes now',
                            generation.number)
                generation.deadline = time.monotonic()


def _fmt(seconds: float) -> str:
    return f'{seconds:g}'
