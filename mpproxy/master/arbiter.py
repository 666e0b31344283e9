"""The arbiter: the master's main loop, its signals, and the reload transaction.

(Reaping and reconciling the worker table is the `Children` mixin, children.py.)

Signal handlers only queue the signal; `run()` polls a `selectors` selector over
the signal wake-up pipe and the workers' control sockets, then dispatches each
queued signal to `handle_<name>()`, reaps children, and lets `manage_workers()`
move the worker table towards its target (gunicorn's arbiter, nginx's cycle).
No asyncio loop and no thread ever runs here.
"""

from __future__ import annotations

import os
import selectors
import signal
import time

import setproctitle

from mpproxy.config import ConfigError, accounts, load, nofile
from mpproxy.config.accounts import Credentials
from mpproxy.config.schema import Config
from mpproxy.errors import MpproxyError, StartupError
from mpproxy.master import daemon, notify, upgrade
from mpproxy.master.children import Children, _fmt
from mpproxy.master.pidfile import PidFile
from mpproxy.master.sockets import INHERIT_ENV, SocketSet
from mpproxy.master.status import Observer
from mpproxy.master.watch import ConfigWatch
from mpproxy.master.workers import (ACTIVE, DRAINING, STARTING, Generation, WorkerHandle,
                                    close_handoff, drain_with_handoff)
from mpproxy.observe import access
from mpproxy.observe import log as logmod
from mpproxy.proxy import limits

log = logmod.log

SIGNALS = ('HUP', 'QUIT', 'TERM', 'INT', 'USR1', 'USR2', 'CHLD')
TERM_GRACE = 1.0          # after TERM, SIGKILL what is still alive
CLOSE_SLACK = 1.5         # a worker closes by itself at shutdown_timeout; TERM only after this


class Arbiter(Children):
    def __init__(self, config: Config, config_arg: str, ready_fd: int | None = None):
        self.config = config
        self.config_arg = config_arg
        self.ready_fd = ready_fd
        self.sockets = SocketSet()
        self.generations: list[Generation] = []     # oldest first
        self.next_generation = 1
        self.pidfile: PidFile | None = None
        self.signals: list[int] = []
        self.selector = selectors.DefaultSelector()
        self.stopping: str | None = None            # None | 'quit' | 'term'
        self.stop_deadline: float | None = None
        self.backoff: dict[int, tuple[int, float]] = {}   # slot -> (failures, not before)
        self.exit_code = 0
        self.started = False                        # the first generation became active
        self.upgrade_pid: int | None = None         # the new master started by USR2
        self.upgraded_from: int | None = None       # the old master that started this one
        self.limits: limits.LimitTable | None = None  # connection counts shared by all workers
        self.observer = Observer(self)              # metrics totals and the admin endpoint
        self.watch = ConfigWatch(config.path)         # watch_config: polled by run()

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind, lock, fork: raises StartupError before any worker exists."""
        setproctitle.setproctitle(f'mpproxy: master -c {self.config_arg}')
        credentials = _credentials(self.config)
        _prepare_access_log(self.config, credentials)
        limit_index = self._limit_index(self.config)
        if self.config.pid_file:
            self.pidfile = PidFile(self.config.pid_file)
            self.pidfile.acquire()
        inherited = os.environ.pop(INHERIT_ENV, None)
        if inherited:
            self.sockets.adopt(inherited)
        try:
            bound = self.sockets.acquire(self.config)
            self.observer.start(self.config)
        except BaseException:
            if self.pidfile:
                self.pidfile.release()
            raise
        if inherited:
            self.sockets.release([bound])   # inherited sockets this config does not listen on
            self.upgraded_from = os.getppid()
            log.log(logmod.NOTICE, 'binary upgrade: listening sockets inherited from pid %d',
                    os.getppid())
        _log_warnings(self.config)
        self._install_signals()
        self._new_generation(self.config, bound, credentials, limit_index)
        self.manage_workers()

    def _install_signals(self) -> None:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r, self.wake_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.selector.register(r, selectors.EVENT_READ, self._drain_wakeup)
        for name in SIGNALS:
            signal.signal(getattr(signal, 'SIG' + name), self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)               # only record it (STYLE rule 1)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- main loop --------------------------------------------------------------------------
    def run(self) -> int:
        try:
            while True:
                for key, _ in self.selector.select(self._timeout()):
                    key.data()
                while self.signals:
                    sig = self.signals.pop(0)
                    name = signal.Signals(sig).name[3:].lower()
                    getattr(self, 'handle_' + name)()
                if self._watching() and self.watch.poll():
                    self.handle_hup()                 # the file changed: exactly what HUP does
                self.reap()
                self.manage_workers()
                self.observer.tick()
                if self.stopping and not self._live_workers():
                    break
        finally:
            self._shutdown()
        return self.exit_code

    def _watching(self) -> bool:
        """watch_config is on, and this master neither stops nor has a new master from USR2
        alive (that one watches the file itself; see watch.py)."""
        return self.config.watch_config and not self.stopping and self.upgrade_pid is None

    def _timeout(self) -> float:
        return 0.05 if self.stopping else 0.25

    def _live_workers(self) -> list[WorkerHandle]:
        return [w for g in self.generations for w in g.workers.values()]

    def _on_control(self, worker: WorkerHandle) -> None:
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

    # -- signals ----------------------------------------------------------------------------
    def handle_hup(self) -> None:
        if self.stopping:
            return
        log.log(logmod.NOTICE, 'reloading configuration from %s', self.config.path)
        self._notify(RELOADING=1, MONOTONIC_USEC=notify.monotonic_usec(),
                     STATUS='reloading configuration')
        self.reload()

    def handle_quit(self) -> None:
        if self.stopping:
            return
        log.log(logmod.NOTICE, 'graceful shutdown (QUIT): draining for up to %ss',
                _fmt(self.config.shutdown_timeout))
        self.stopping = 'quit'
        self._notify_stopping('graceful shutdown (QUIT): draining')
        for generation in self.generations:
            self._drain(generation)
        self.sockets.close_all()     # close, not shutdown: an upgraded master may share them
        if self.upgrade_pid is not None:
            self.observer.close()    # the new master answers on the admin socket now
        # else the admin endpoint stays up while draining: /readyz says 503, /healthz 200

    def handle_term(self) -> None:
        if self.stopping == 'term':
            return
        log.log(logmod.NOTICE, 'fast shutdown')
        self.stopping = 'term'
        self._notify_stopping('fast shutdown')
        self.stop_deadline = time.monotonic() + TERM_GRACE
        for generation in self.generations:
            generation.signal_all(signal.SIGTERM)
        self.sockets.close_all()
        self.observer.close()

    handle_int = handle_term

    def handle_usr1(self) -> None:
        log.log(logmod.NOTICE, 'reopening log files')
        logmod.reopen()
        active = next((g for g in self.generations if g.state == ACTIVE), None)
        if active is not None and active.credentials is not None:
            logmod.chown(active.credentials.uid)      # nginx's way: so its workers can reopen it
        for generation in self.generations:
            try:                                  # the access log: created, theirs, then reopened
                _prepare_access_log(generation.config, generation.credentials)
            except StartupError as exc:
                log.error('%s', exc)
            generation.signal_all(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Binary upgrade: exec a new master from the installed program, sockets inherited."""
        if self.stopping:
            return
        if self.upgrade_pid is not None:
            log.warning('binary upgrade already in progress (new master pid %d); ignoring USR2',
                        self.upgrade_pid)
            return
        try:
            self.upgrade_pid = upgrade.begin(self.pidfile, self.config.path, self.sockets,
                                             *self.observer.admin.export())
        except OSError as exc:
            log.error('binary upgrade failed: %s', exc.strerror or exc)
            return
        log.log(logmod.NOTICE, 'binary upgrade: new master pid %d started; send QUIT to this '
                'master (pid %d) once it serves', self.upgrade_pid, os.getpid())
        notify.send(STATUS=f'binary upgrade: new master pid {self.upgrade_pid} starting')

    def handle_chld(self) -> None:
        pass                      # reap() runs after every dispatch

    # -- reload -----------------------------------------------------------------------------
    def reload(self) -> None:
        """Parse, validate and bind into a new generation; on failure keep the old one."""
        self.watch.loading()                  # what is read now counts as tried (watch.py)
        try:
            config = load(self.config.path)
            self._check_reloadable(config)
            credentials = _credentials(config)
            _prepare_access_log(config, credentials)
            limit_index = self._limit_index(config)
            bound = self.sockets.acquire(config)
            try:
                admin = self.observer.prepare(config)
            except StartupError:
                self.sockets.release([g.bound for g in self.generations])   # what acquire bound
                raise
        except ConfigError as exc:
            log.error('reload failed, keeping the running configuration: %s',
                      '; '.join(exc.problems))
            self._reload_done('reload failed, keeping the running configuration: '
                              + '; '.join(exc.problems))
            return
        except (MpproxyError, OSError) as exc:
            log.error('reload failed, keeping the running configuration: %s', exc)
            self._reload_done(f'reload failed, keeping the running configuration: {exc}')
            return
        for generation in self.generations:
            if generation.state == STARTING:     # superseded before it was ready
                self._drain(generation, quiet=True)
        if config.workers != self.config.workers and any(l.protocol == 'udp' for l in config.listeners):
            log.warning('workers changed from %d to %d: UDP flows re-hash to other workers',
                        self.config.workers, config.workers)
        if config.log_level != self.config.log_level or config.error_log != self.config.error_log:
            try:
                logmod.setup(config.error_log, config.log_level)
            except OSError as exc:
                log.error('cannot open error log %s: %s; keeping the old one',
                          config.error_log, exc.strerror)
        self.config = config
        self.observer.commit(admin)
        _log_warnings(config)
        self._new_generation(config, bound, credentials, limit_index)

    def _check_reloadable(self, config: Config) -> None:
        if config.pid_file != self.config.pid_file:
            raise StartupError('pid_file cannot change on reload; restart to change it')

    def _limit_index(self, config: Config) -> dict:
        """Limit indices for `config`'s limited listeners; the shared table is made the first
        time a config has a limit and lives as long as the master (StartupError if full)."""
        if self.limits is None:
            if not limits.wanted(config):
                return {}
            self.limits = limits.LimitTable.allocate(limits.slots_for(config))
        try:
            return self.limits.assign(config, [g.config for g in self.generations])
        except limits.LimitsFull as exc:
            raise StartupError(str(exc)) from None

    def _new_generation(self, config: Config, bound, credentials: Credentials | None,
                        limit_index: dict) -> Generation:
        generation = Generation(self.next_generation, config, bound, credentials,
                                self.limits, limit_index)
        self.next_generation += 1
        self.generations.append(generation)
        return generation

    def _promote(self, generation: Generation) -> None:
        """All workers of a starting generation serve: it becomes active, the old one drains
        (handing its UDP sessions slot by slot to the new workers)."""
        generation.state = ACTIVE
        for other in self.generations:
            if other is not generation and other.state in (ACTIVE, STARTING):
                self._drain(other, quiet=other.state == STARTING, successors=generation)
        for worker in generation.workers.values():
            close_handoff(worker)
        self.sockets.shutdown_unused(generation.bound)
        if not self.started:
            self.started = True
            log.log(logmod.NOTICE, 'mpproxy started: %d worker(s), %d listener(s), generation %d',
                    generation.config.workers, len(generation.config.listeners), generation.number)
            notify.send(READY=1, STATUS=f'serving: generation {generation.number}',
                        MAINPID=os.getpid())
            daemon.report(self.ready_fd, 'ok')
            self.ready_fd = None
        else:
            log.log(logmod.NOTICE, 'generation %d active', generation.number)
            self._reload_done(f'serving: generation {generation.number} active')

    def _drain(self, generation: Generation, quiet: bool = False,
               successors: Generation | None = None) -> None:
        if generation.state == DRAINING:
            return
        generation.state = DRAINING
        generation.deadline = time.monotonic() + generation.config.shutdown_timeout + CLOSE_SLACK
        if not quiet:
            log.info('generation %d draining (%d worker(s))', generation.number,
                     len(generation.workers))
        for slot, worker in generation.workers.items():
            close_handoff(worker)             # it never got sessions: nothing to wait for
            new = successors.workers.get(slot) if successors else None
            if new is not None and new.handoff_peer is not None:
                drain_with_handoff(worker, new)
            else:
                worker.signal(signal.SIGQUIT)

    # -- systemd (sd_notify) ----------------------------------------------------------------
    def _notify(self, **fields) -> None:
        """sd_notify, unless a new master started by USR2 lives: it speaks for the service
        (its MAINPID=), so this one must not tell systemd it reloads or stops."""
        if self.upgrade_pid is None:
            notify.send(**fields)

    def _notify_stopping(self, status: str) -> None:
        """STOPPING=1, unless the service goes on in the other master of a binary upgrade:
        the new one this master started, or the old one that started this master (while it
        lives it is our parent; backing out of an upgrade is QUIT to the new master)."""
        if self.upgraded_from is None or os.getppid() != self.upgraded_from:
            self._notify(STOPPING=1, STATUS=status)

    def _reload_done(self, status: str) -> None:
        """READY=1 after RELOADING=1, once no new generation is still starting."""
        if not any(g.state == STARTING for g in self.generations):
            self._notify(READY=1, STATUS=status)

    def _shutdown(self) -> None:
        self.sockets.close_all()
        self.observer.close()
        for worker in self._live_workers():
            worker.signal(signal.SIGKILL)
        if self.pidfile:
            self.pidfile.release()
        log.log(logmod.NOTICE, 'mpproxy exited')


def _credentials(config: Config) -> Credentials | None:
    """Whom the workers of `config` switch to: None unless `user` is set and the master is
    root (else `user` is ignored, with the warning of `_log_warnings`)."""
    if config.user is None or os.geteuid() != 0:
        return None
    try:
        return accounts.resolve(config.user, config.group)
    except ValueError as exc:          # the loader checked; the account went away since
        raise StartupError(f'user {config.user}: {exc}') from None


def _prepare_access_log(config: Config, credentials: Credentials | None) -> None:
    """Create `config`'s access log file and give it to the user its workers switch to, so
    that they can open (and on USR1 reopen) it by path; StartupError when it cannot be."""
    if config.access_log is None:
        return
    path = config.access_log.path
    try:
        access.prepare(path, credentials.uid if credentials is not None else None)
    except OSError as exc:
        raise StartupError(f'cannot open access log {path}: {exc.strerror or exc}') from None


def _log_warnings(config: Config) -> None:
    """The warnings `mpproxy -t` prints for `config`, logged when the master applies it."""
    for line in nofile.startup_warnings(config):
        log.warning('%s', line)
