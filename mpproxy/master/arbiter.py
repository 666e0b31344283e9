"""The arbiter: the master's main loop, its signals, and the reload transaction.

Signal handlers only queue the signal; `turn()` polls a `selectors` selector over the
signal wake-up pipe, the workers' control sockets and the admin endpoint, dispatches each
queued signal to `handle_<name>()`, and lets the worker table reap and reconcile
(gunicorn's arbiter, nginx's cycle). No asyncio loop and no thread ever runs here. Each
step of a turn runs under the `Guard` (guard.py): an exception nobody planned for is
logged at `crit` and the master goes on.

A reload is a transaction (nginx's `ngx_init_cycle`):

    load + check the file ─▶ build the generation (build.py: sockets, admin socket, shared
    blocks; all or nothing) ─▶ fork its workers (table.py) ─▶ all serve: commit (the
    config, the admin socket, the error log) and drain the old generation

A failure at any step undoes what that reload made and logs one line,
`reload failed, keeping the running configuration: <cause>`; the running generation
never notices. `self.config` is always the serving generation's config.
"""

from __future__ import annotations

import os
import selectors
import signal
import time

import setproctitle

from mpproxy.config import ConfigError, load, nofile
from mpproxy.config.schema import Config
from mpproxy.errors import EXIT_FAILURE, MpproxyError, StartupError
from mpproxy.master import daemon, notify, upgrade
from mpproxy.master.build import Builder, prepare_access_log
from mpproxy.master.control import ControlEndpoint
from mpproxy.master.guard import Guard
from mpproxy.master.pidfile import PidFile
from mpproxy.master.servers import ServerControl
from mpproxy.master.sockets import INHERIT_ENV, SocketSet
from mpproxy.master.status import Observer
from mpproxy.master.table import WorkerTable, fmt
from mpproxy.master.watch import ConfigWatch
from mpproxy.master.workers import Generation, handover_plan
from mpproxy.observe import log as logmod

log = logmod.log

SIGNALS = ('HUP', 'QUIT', 'TERM', 'INT', 'USR1', 'USR2', 'CHLD')
RELOAD_FAILED = 'reload failed, keeping the running configuration: '


class Arbiter:
    def __init__(self, config: Config, config_arg: str, ready_fd: int | None = None):
        self.config = config                        # the serving generation's (committed)
        self.config_arg = config_arg
        self.ready_fd = ready_fd
        self.selector = selectors.DefaultSelector()
        self.sockets = SocketSet()
        self.table = WorkerTable(self.selector, retire=self._retire)
        self.servers = ServerControl()              # `mpproxy server ...`: run-time states
        self.observer = Observer(self.selector, self.table, config.path, self.servers)
        self.builder = Builder(self.sockets, self.observer, self.servers)
        self.guard = Guard()
        self.pidfile: PidFile | None = None
        self.signals: list[int] = []
        self.exit_code = 0
        self.started = False                        # the first generation became active
        self.upgrade_pid: int | None = None         # the new master started by USR2
        self.upgraded_from: int | None = None       # the old master that started this one
        self.channel: upgrade.SessionChannel | None = None  # USR2: the new master's inboxes
        self.offering: upgrade.SessionChannel | None = None  # upgraded: where to send ours
        self.watch = ConfigWatch(config.path)       # watch_config: polled by turn()
        self.control = ControlEndpoint(self.selector, self._reload_requested, log)
        self.reloads = 0                            # reloads started, numbered for control.py

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind, lock, fork: raises StartupError before any worker exists."""
        setproctitle.setproctitle(f'mpproxy: master -c {self.config_arg}')
        if self.config.pid_file:
            self.pidfile = PidFile(self.config.pid_file)
            self.pidfile.acquire()
        inherited = os.environ.pop(INHERIT_ENV, None)
        if inherited:
            self.sockets.adopt(inherited)
            self.servers.adopt()
        try:
            self.observer.start(self.config)
            generation = self.builder.build(self.config, [])
        except BaseException:
            self.observer.close()
            if self.pidfile:
                self.pidfile.release()
            raise
        if inherited:
            self.sockets.release([generation.bound])   # inherited sockets not listened on
            self.offering = upgrade.SessionChannel.inherited()
            if self.offering is not None:
                generation.inherits = generation.udp()  # its workers wait for the sessions
                self.sockets.assume_steered(generation.bound, generation.config.workers)
            self.upgraded_from = os.getppid()
            log.log(logmod.NOTICE, 'binary upgrade: listening sockets inherited from pid %d',
                    os.getppid())
        _log_warnings(self.config)
        self._install_signals()
        self.control.open()
        self.table.add(generation)
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
                self.turn()
                if self.table.stopping and not self.table.live_workers():
                    break
        finally:
            self._shutdown()
        return self.exit_code

    def turn(self, timeout: float | None = None) -> None:
        """One turn of the loop; every step under the guard (guard.py)."""
        guard = self.guard
        ready = guard.run('polling', self.selector.select,
                          self._timeout() if timeout is None else timeout)
        if ready is None:
            time.sleep(0.1)                       # the poll itself failed: do not spin
            ready = ()
        for key, _ in ready:
            guard.run(_step_name(key.data), key.data)
        while self.signals:
            name = signal.Signals(self.signals.pop(0)).name[3:].lower()
            guard.run('handle_' + name, getattr(self, 'handle_' + name))
        if self._watching():
            guard.run('the config watcher', self._poll_watch)
        guard.run('reaping', self.table.reap)
        guard.run('manage_workers', self.manage_workers)
        guard.run('the admin endpoint', self.observer.tick)
        guard.run('the control socket', self.control.tick)

    def manage_workers(self) -> None:
        """Let the table move towards its target, then act on what it reports."""
        if self.upgraded_from is not None and os.getppid() != self.upgraded_from:
            self._old_master_gone()
        self.table.manage(self.config.max_draining_generations)
        for event in self.table.events():
            self.guard.run(f'the {event[0]} event', getattr(self, '_on_' + event[0]), *event[1:])

    def _old_master_gone(self) -> None:
        """The old master of the binary upgrade exited: none of its sessions can come any
        more, and the UDP flows are steered to the count of the workers that serve them (it
        does that at QUIT; killed without QUIT, its program for its own count stays)."""
        self.upgraded_from = None
        for generation in self.table.generations:
            generation.drop_kept_inboxes()
        serving = self.table.active() or next(
            (g for g in self.table.generations if g.inherits), None)
        if serving is not None and serving.udp():
            self.sockets.resteer(serving.bound, serving.config.workers)

    def _poll_watch(self) -> None:
        if self.watch.poll():
            self.handle_hup()                     # the file changed: exactly what HUP does

    def _watching(self) -> bool:
        """watch_config is on, and this master neither stops nor has a new master from USR2
        alive (that one watches the file itself; see watch.py)."""
        return self.config.watch_config and not self._stopping() and self.upgrade_pid is None

    def _stopping(self) -> bool:
        """QUIT or TERM came: draining, stopping, or in QUIT's shutdown_grace."""
        return bool(self.table.stopping) or self.table.grace_until is not None

    def _timeout(self) -> float:
        if self.table.stopping:
            return 0.05
        left = self.table.grace_left()       # wake up when the grace runs out
        return 0.25 if left is None else min(0.25, max(0.01, left))

    def _retire(self, worker) -> None:
        self.observer.retire(worker)

    def _reload_requested(self) -> None:
        """`mpproxy -s reload` asked over the control socket: exactly what HUP does."""
        self.signals.append(signal.SIGHUP)

    # -- signals ----------------------------------------------------------------------------
    def handle_hup(self) -> None:
        if self._stopping():      # a reload started before QUIT may still end in the grace
            log.log(logmod.NOTICE, 'reload refused: the master is stopping')
            self.control.answer(None, False, 'the master is stopping; no reload')
            return
        log.log(logmod.NOTICE, 'reloading configuration from %s', self.config.path)
        self._notify(RELOADING=1, MONOTONIC_USEC=notify.monotonic_usec(),
                     STATUS='reloading configuration')
        self.reload()

    def handle_quit(self) -> None:
        """Graceful stop. With `shutdown_grace`, first the grace: /readyz fails at once while
        everything else serves on (the workers are told nothing), so that load balancers
        and orchestrators stop sending before the listeners close; then the drain, as
        without a grace. A second QUIT cuts the grace short. No grace while the other
        master of a binary upgrade serves on the same sockets, nor before the first
        generation serves."""
        table = self.table
        if table.stopping:
            return
        drain = fmt(self.config.shutdown_timeout)
        if table.grace_until is not None:
            log.log(logmod.NOTICE, 'second QUIT: shutdown_grace cut short, draining for up to '
                    '%ss', drain)
            self._drain_all()
            return
        grace = self.config.shutdown_grace
        partner = self._upgrade_partner()
        if grace and partner is None and self.started:
            log.log(logmod.NOTICE, 'graceful shutdown (QUIT): /readyz fails now; the listeners '
                    'accept for %ss more (shutdown_grace), then drain for up to %ss',
                    fmt(grace), drain)
            self._notify_stopping(f'graceful shutdown (QUIT): not ready, accepting for '
                                  f'{fmt(grace)}s more (shutdown_grace)')
            table.grace(grace)
            return
        log.log(logmod.NOTICE, 'graceful shutdown (QUIT): draining for up to %ss%s', drain,
                f' (no shutdown_grace: master pid {partner} of the binary upgrade serves)'
                if grace and partner is not None else '')
        self._drain_all()

    def _on_grace_over(self) -> None:
        log.log(logmod.NOTICE, 'shutdown_grace over: draining for up to %ss',
                fmt(self.config.shutdown_timeout))
        self._drain_all()

    def _drain_all(self) -> None:
        """QUIT's drain: the listeners close, every generation drains."""
        self._notify_stopping('graceful shutdown (QUIT): draining')
        self.control.abandon('the master is stopping (QUIT); no reload')
        self.table.quit(self._upgrade_handover())
        self._close_channel()     # the old workers hold the inboxes now
        self.sockets.close_all()     # close, not shutdown: an upgraded master may share them
        if self.upgrade_pid is not None:
            self.observer.close()    # the new master answers on the admin socket now
        # else the admin endpoint stays up while draining: /readyz says 503, /healthz 200

    def handle_term(self) -> None:
        if self.table.stopping == 'term':
            return
        log.log(logmod.NOTICE, 'fast shutdown')
        self._notify_stopping('fast shutdown')
        self.control.abandon('the master is stopping; no reload')
        self.table.term()
        self.sockets.close_all()
        self.observer.close()

    handle_int = handle_term

    def handle_usr1(self) -> None:
        log.log(logmod.NOTICE, 'reopening log files')
        logmod.reopen()
        active = self.table.active()
        if active is not None and active.credentials is not None:
            logmod.chown(active.credentials.uid)      # nginx's way: so its workers can reopen it
        for generation in self.table.generations:
            try:                                  # the access log: created, theirs, then reopened
                prepare_access_log(generation.config, generation.credentials)
            except StartupError as exc:
                log.error('%s', exc)
            generation.signal_all(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Binary upgrade: exec a new master from the installed program, sockets inherited."""
        if self._stopping():
            return
        if self.upgrade_pid is not None:
            log.warning('binary upgrade already in progress (new master pid %d); ignoring USR2',
                        self.upgrade_pid)
            return
        env, fds = self.observer.admin.export()
        env = {**env, **self.servers.export()}
        try:
            channel, theirs = upgrade.SessionChannel.pair()
        except OSError as exc:
            log.warning('binary upgrade: no channel for the UDP sessions (%s); they will not be '
                        'handed over', exc.strerror or exc)
            channel = theirs = None
        if theirs is not None:
            env = {**env, upgrade.CHANNEL_ENV: str(theirs.fileno())}
            fds = [*fds, theirs.fileno()]
        try:
            self.upgrade_pid = upgrade.begin(self.pidfile, self.config.path, self.sockets,
                                             env, fds)
        except OSError as exc:
            log.error('binary upgrade failed: %s', exc.strerror or exc)
            if channel is not None:
                channel.close()
            return
        finally:
            if theirs is not None:
                theirs.close()
        if channel is not None:
            self._close_channel()
            self.channel = channel
            channel.watch(self.selector)
        log.log(logmod.NOTICE, 'binary upgrade: new master pid %d started; send QUIT to this '
                'master (pid %d) once it serves', self.upgrade_pid, os.getpid())
        notify.send(STATUS=f'binary upgrade: new master pid {self.upgrade_pid} starting')

    def _upgrade_handover(self):
        """At QUIT after USR2: steer the UDP flows to the new master's worker count, and the
        plan by which the active generation's workers hand their sessions to its workers."""
        channel, active = self.channel, self.table.active()
        if channel is None or not channel.inboxes or active is None or not active.udp():
            return None
        if channel.slots != active.config.workers and self.sockets.steerable(active.bound):
            self.table.pause_udp_now()  # none may read a flow the new count sends it
        steered = self.sockets.steer(active.bound, channel.slots)
        log.log(logmod.NOTICE, 'binary upgrade: handing the UDP sessions to the new master\'s '
                '%d worker(s)', channel.slots)
        return handover_plan(list(channel.inboxes), steered)

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def handle_chld(self) -> None:
        pass                      # the table reaps after every dispatch

    # -- reload -----------------------------------------------------------------------------
    def reload(self) -> None:
        """Load and build a new generation; on any failure keep the running one as it is."""
        self.watch.loading()                  # what is read now counts as tried (watch.py)
        self.reloads += 1
        reload = self.reloads
        self.control.starting(reload)
        try:
            config = load(self.config.path)
            if config.pid_file != self.config.pid_file:
                raise StartupError('pid_file cannot change on reload; restart to change it')
        except ConfigError as exc:
            self._reload_failed(reload, '; '.join(exc.problems))
            return
        except MpproxyError as exc:
            self._reload_failed(reload, str(exc))
            return
        for generation in self.table.starting():       # superseded before it was ready
            self.table.supersede(generation)
            self.builder.discard(generation, self.table.generations, superseded=True)
            self.control.supersede(generation.reload, reload)
        try:
            generation = self.builder.build(config, self.table.generations)
        except (MpproxyError, OSError) as exc:
            self._reload_failed(reload, _cause(exc))
            return
        generation.reload = reload
        self.table.add(generation)

    def _reload_failed(self, reload: int | None, cause: str) -> None:
        log.error('%s%s', RELOAD_FAILED, cause)
        self._reload_done(RELOAD_FAILED + cause)
        self.control.answer(reload, False, RELOAD_FAILED + cause)

    # -- what the worker table reports ------------------------------------------------------
    def _on_ready(self, generation: Generation) -> None:
        """Every worker of `generation` serves: it becomes the running configuration."""
        if generation.pausing is None and self.offering is None and not generation.inherits \
                and self.started and generation.udp() \
                and generation.config.workers != self.config.workers \
                and self.sockets.steerable(generation.bound):
            self.table.pause_udp(generation)    # first the old workers stop reading UDP
            return
        steered = None
        if self.offering is not None:     # upgraded: the old master hands its sessions over
            if generation.inherits:
                self.offering.offer(generation.inboxes())
            self.offering.close()
            self.offering = None
        elif not generation.inherits:     # the UDP flows follow a changed worker count
            workers = generation.config.workers
            steered = self.sockets.steer(generation.bound, workers)
            if steered is None and self.started and workers != self.config.workers \
                    and generation.udp():
                log.warning('workers changed from %d to %d: UDP flows re-hash to other workers '
                            '(not steered); sessions of the slots that change are re-created',
                            self.config.workers, workers)
        self.table.promote(generation, steered)
        self._commit(generation)
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
            self.control.answer(generation.reload, True,
                                f'serving: generation {generation.number} active')

    def _commit(self, generation: Generation) -> None:
        old, config = self.config, generation.config
        self.config = config
        self.observer.commit(generation.admin, config)
        self.servers.commit(config)
        if config.log_level != old.log_level or config.error_log != old.error_log:
            try:
                logmod.setup(config.error_log, config.log_level)
            except OSError as exc:
                log.error('cannot open error log %s: %s; keeping the old one',
                          config.error_log, exc.strerror)
        if generation.number > 1:
            _log_warnings(config)

    def _on_failed(self, generation: Generation, why: str) -> None:
        """`generation` never served: undo it; a reload keeps the old one, a start stops."""
        self.builder.discard(generation, self.table.generations)
        if isinstance(generation.pausing, list):
            self.table.resume_udp()
        if self.started:
            self._reload_failed(generation.reload, f'generation {generation.number}: {why}')
            return
        log.error('cannot start: %s', why)
        daemon.report(self.ready_fd, f'mpproxy: cannot start: {why}\n')
        self.ready_fd = None
        self.exit_code = EXIT_FAILURE
        self.handle_term()

    def _on_finished(self, generation: Generation) -> None:
        self.sockets.release([g.bound for g in self.table.generations])
        log.info('generation %d finished', generation.number)

    def _on_child(self, pid: int, status: int) -> None:
        if pid != self.upgrade_pid:
            return
        self.upgrade_pid = None
        self._close_channel()                     # its inboxes are gone: our sessions stay
        upgrade.restore_pidfile(self.pidfile)     # before the log line: whoever reads it
        code = os.waitstatus_to_exitcode(status)
        if code == 0:             # QUIT or TERM to the new master: the operator backed out
            outcome = 'binary upgrade backed out'
            log.log(logmod.NOTICE, '%s: the new master (pid %d) exited; this master goes on '
                    'serving', outcome, pid)
        else:
            outcome = 'binary upgrade failed'
            log.error('%s: the new master (pid %d) exited with code %d; this master goes on '
                      'serving', outcome, pid, code)
        if not self.table.stopping:   # take the service back, should the new one have had it
            notify.send(READY=1, STATUS=f'{outcome}; serving from this master',
                        MAINPID=os.getpid())

    # -- systemd (sd_notify) ----------------------------------------------------------------
    def _notify(self, **fields) -> None:
        """sd_notify, unless a new master started by USR2 lives: it speaks for the service
        (its MAINPID=), so this one must not tell systemd it reloads or stops."""
        if self.upgrade_pid is None:
            notify.send(**fields)

    def _notify_stopping(self, status: str) -> None:
        """STOPPING=1, unless the service goes on in the other master of a binary upgrade."""
        if self._upgrade_partner() is None:
            notify.send(STOPPING=1, STATUS=status)

    def _upgrade_partner(self) -> int | None:
        """The pid of the other master of a binary upgrade, while it lives: the new one this
        master started (USR2), or the old one that started this master (while it lives it
        is our parent; backing out of an upgrade is QUIT to the new master)."""
        if self.upgrade_pid is not None:
            return self.upgrade_pid
        if self.upgraded_from is not None and os.getppid() == self.upgraded_from:
            return self.upgraded_from
        return None

    def _reload_done(self, status: str) -> None:
        """READY=1 after RELOADING=1, once no new generation is still starting; not once the
        master stops (a reload started before QUIT can end during the shutdown_grace)."""
        if not self.table.starting() and not self._stopping():
            self._notify(READY=1, STATUS=status)

    def _shutdown(self) -> None:
        self._close_channel()
        if self.offering is not None:
            self.offering.close()
        self.control.close()
        self.sockets.close_all()
        self.observer.close()
        self.table.kill_all()
        if self.pidfile:
            self.pidfile.release()
        log.log(logmod.NOTICE, 'mpproxy exited')


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, MpproxyError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _step_name(callback) -> str:
    """How the guard names a ready socket's handler in its log line."""
    callback = getattr(callback, 'func', callback)        # a functools.partial
    owner = getattr(callback, '__self__', None)
    if owner is not None:
        return f'{type(owner).__name__}.{callback.__name__}'
    return getattr(callback, '__qualname__', repr(callback))


def _log_warnings(config: Config) -> None:
    """The warnings `mpproxy -t` prints for `config`, logged when the master applies it."""
    for line in nofile.startup_warnings(config):
        log.warning('%s', line)
