"""The life of a worker process, from the fork to `os._exit`.

A worker's states::

    BOOTING --services started, 'r' sent--> SERVING --QUIT--> DRAINING --idle or deadline--> EXIT
       |                                       |                                              ^
       +-- boot error: exit 3 ------------------+-- TERM / INT / master gone ------------------+

BOOTING is, in order: reset what the fork inherited, set the open-files limit
and switch to `user` (both still as root; a failed switch is a boot error),
arm the parent-death signal, then make the loop and start the services.

The master learns that the worker is ready from one byte `r` on the control
socket, and that its loop still turns from a `h` byte sent once a second by a
timer inside that loop (so a stuck loop stops the heartbeat). EOF on the
control socket, or a new parent pid, means the master is gone: stop at once.
The same timer publishes the worker's metrics (observe/metrics.py), and they are
published once more when the loop has stopped, before the exit.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import mmap
import os
import signal
import socket
from dataclasses import dataclass, field

import setproctitle
import uvloop

from mpproxy.config.accounts import Credentials
from mpproxy.config.schema import Config, Listener
from mpproxy.errors import EXIT_OK, EXIT_WORKER_BOOT, WorkerBootError
from mpproxy.observe import access
from mpproxy.observe import log as logmod
from mpproxy.observe import metrics
from mpproxy.proxy.edge.sni import SniRouter
from mpproxy.proxy.io.ratelog import RateLimitedLog
from mpproxy.proxy.io.poller import Poller, prime_allocator
from mpproxy.proxy.tcp.service import TcpService
from mpproxy.proxy.udp import handoff
from mpproxy.proxy.udp.service import UdpService
from mpproxy.proxy.udp.session import GateLimit
from mpproxy.shared.limits import LimitTable
from mpproxy.upstream import discovery, health
from mpproxy.upstream.pool import UpstreamPool
from mpproxy.worker import privileges
from mpproxy.worker.handover import Handover
from mpproxy.worker.peers import Peers
from mpproxy.worker.servers import ServerWatch

log = logmod.log

HEARTBEAT_INTERVAL = 1.0
DRAIN_POLL = 0.1
CLOSE_GRACE = 1.0         # at the drain deadline, how long closing connections may flush
HANDOFF_WAIT = 20.0       # a safety net: the master closes the handoff socket when it gives up
_PR_SET_PDEATHSIG = 1
WORKER_SIGNALS = (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, built by the master before the fork."""
    slot: int
    generation: int
    config: Config
    master_pid: int
    control: socket.socket                                # the worker's end
    sockets: tuple[tuple[Listener, socket.socket], ...]   # this slot's listening sockets
    handoff: socket.socket | None = None                  # UDP sessions arrive here on reload
    handoff_wait: float | None = HANDOFF_WAIT             # ... until then at most (None: EOF)
    health: mmap.mmap | None = None                       # active health state, shared
    servers: mmap.mmap | None = None                      # run-time server states, shared
    credentials: Credentials | None = None                # switch to this user before serving
    limits: LimitTable | None = None                      # shared connection counts, or None
    limit_slot: int | None = None                         # own area in `limits`; None: private
    limit_index: dict = field(default_factory=dict)       # listener key -> limit index
    metrics: metrics.Area | None = None                   # where to publish its metrics
    peers: tuple | None = None            # (own inbox, every slot's sending end): worker/peers.py


def run(spec: WorkerSpec) -> None:
    """Entry point in the child right after fork(); never returns."""
    code = EXIT_WORKER_BOOT
    worker = None
    try:
        worker = Worker(spec)
        code = worker.run()
    except BaseException:     # noqa: BLE001 - a worker must never unwind into the master's code
        try:
            log.exception('worker %d crashed', spec.slot)
        except BaseException:
            pass
    finally:
        if worker is not None and worker.access is not None:
            try:
                worker.access.close()     # what is still pending (run() closes it normally)
            except BaseException:
                pass
        for handler in log.handlers:
            try:
                handler.flush()
            except BaseException:
                pass
        os._exit(code)


class Worker(Handover):
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.config = spec.config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.services: list = []
        self.by_listener: dict = {}           # Listener.key -> its service (metrics)
        self.pools: dict[str, UpstreamPool] = {}
        self.checker: health.Checker | None = None
        self.server_watch: ServerWatch | None = None
        self.exit_code = EXIT_OK
        self.draining = False
        self.receiver: handoff.Receiver | None = None
        self.handoff_timer = None
        self.handoff_adopted = self.handoff_lost = 0
        self.carried: list = []               # (service, datagrams) handed over, served at EOF
        self.udp_paused = False               # the master asked it to stop reading UDP ('S')
        self.limit_area = None
        self.access: access.AccessLog | None = None
        self.publisher: metrics.Publisher | None = None
        self.poller: Poller | None = None     # the relays' sockets (proxy/io/poller.py)
        self.peers: Peers | None = None       # the other workers (QUIC sessions that move)

    # -- boot -----------------------------------------------------------------------------
    def run(self) -> int:
        spec = self.spec
        self._reset_inherited()
        setproctitle.setproctitle(f'mpproxy: worker {spec.slot} (generation {spec.generation})')
        logmod.set_role(f'w{spec.slot}')
        try:
            self._drop_privileges()
        except WorkerBootError as exc:
            log.error('worker %d could not start: %s', spec.slot, exc)
            return EXIT_WORKER_BOOT
        self._watch_master()
        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_log_loop_exception)
        if self.config.access_log is not None:   # after the user switch: opened as that user
            try:
                self.access = access.AccessLog(self.config.access_log.path,
                                               self.config.access_log.format, loop,
                                               RateLimitedLog(log))
            except OSError as exc:
                log.error('worker %d could not start: cannot open access log %s: %s', spec.slot,
                          self.config.access_log.path, exc.strerror or exc)
                return EXIT_WORKER_BOOT
        try:
            loop.run_until_complete(self._start_services())
        except Exception as exc:  # noqa: BLE001 - any boot failure is reported, then exit 3
            log.error('worker %d could not start: %s', spec.slot, exc)
            return EXIT_WORKER_BOOT
        for sig, handler in ((signal.SIGQUIT, self.drain), (signal.SIGTERM, self.stop),
                             (signal.SIGINT, self.stop), (signal.SIGUSR1, self.reopen_logs)):
            loop.add_signal_handler(sig, handler)
        # Blocked since the fork; uvloop sees a pending signal only once its loop runs.
        loop.call_soon(signal.pthread_sigmask, signal.SIG_UNBLOCK, WORKER_SIGNALS)
        self._start_metrics()
        gc.freeze()               # what booting made lives as long as the worker: never rescan it
        prime_allocator()         # reads of READ_SIZE from the heap, not from mmap()
        spec.control.setblocking(False)
        loop.add_reader(spec.control.fileno(), self._on_control)
        self._send(b'r')
        self._heartbeat()
        if spec.handoff is None:
            self._start_udp()
        else:                     # serve UDP once the previous worker of this slot handed over
            self.receiver = handoff.Receiver(spec.handoff)
            loop.add_reader(spec.handoff.fileno(), self._on_handoff)
            if spec.handoff_wait is not None:
                self.handoff_timer = loop.call_later(spec.handoff_wait, self._handoff_done)
        loop.run_forever()
        if self.access is not None:
            access_log, self.access = self.access, None
            access_log.close()    # every line, also those of the connections stop() ended
        self._publish()           # the counts up to the exit, for the master's totals
        return self.exit_code

    def _reset_inherited(self) -> None:
        """Undo what fork() copied from the master: its signal set-up and its fds."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        keep = {0, 1, 2, self.spec.control.fileno()}
        if self.spec.handoff is not None:
            keep.add(self.spec.handoff.fileno())
        if self.spec.peers is not None:
            keep.add(self.spec.peers[0].fileno())
            keep.update(tx.fileno() for tx in self.spec.peers[1])
        keep.update(sock.fileno() for _, sock in self.spec.sockets)
        keep.update(logmod.fds())
        for name in os.listdir('/proc/self/fd'):
            fd = int(name)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass          # the fd of the listdir itself, already gone

    def _drop_privileges(self) -> None:
        """While still root: raise the open-files limit, then become the configured user."""
        warning = privileges.set_nofile(self.config.worker_rlimit_nofile)
        if warning and self.spec.slot == 0:       # the same for every worker: say it once
            log.warning('%s', warning)
        if self.spec.credentials is not None:
            privileges.switch_user(self.spec.credentials)

    def _watch_master(self) -> None:
        """Get SIGTERM when the master dies. Armed after the user switch, which clears it."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
        if os.getppid() != self.spec.master_pid:
            os._exit(EXIT_OK)     # the master died before we got here

    def _pool(self, name: str) -> UpstreamPool:
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = UpstreamPool(self.config.upstreams[name], log)
            if not pool.targets:
                log.warning('upstream %s has no usable server address', pool.name)
        return pool

    async def _start_services(self) -> None:
        self.pools.update(await discovery.open_pools(   # DNS: resolve, start re-resolution
            self.config, [listener for listener, _ in self.spec.sockets], log))
        if self.spec.peers is not None:
            rx, txs = self.spec.peers
            self.peers = Peers(self.loop, self.spec.slot, rx, txs, self.by_listener, log)
        for listener, sock in self.spec.sockets:
            pool = self._pool(listener.upstream)
            router = None             # sni_routes: by server name and ALPN (TLS, QUIC)
            if listener.sni_routes is not None:
                router = SniRouter([(pattern, self._pool(name))
                                    for pattern, name in listener.sni_routes])
            if listener.protocol == 'tcp':
                shared = self.config.workers > 1 and not listener.reuseport
                if self.poller is None:
                    self.poller = Poller(self.loop, log)
                service = TcpService(self.loop, listener, sock, pool, log, router,
                                     self._gate(listener), self.access, shared, self.poller)
                await service.start()
            else:
                gate = self._gate(listener)     # refuses with 'max_sessions_per_ip'
                if self.poller is None:
                    self.poller = Poller(self.loop, log)
                service = UdpService(self.loop, listener, sock, pool, log,
                                     None if gate is None else GateLimit(gate), self.access,
                                     self.poller, router=router,
                                     peers=self.peers if router is not None else None)
            self.services.append(service)
            self.by_listener[listener.key] = service
        if self.peers is not None:
            self.peers.start()
        if self.spec.health is not None:
            offsets, _ = health.layout(self.config)
            for name, offset in offsets.items():
                if name in self.pools:
                    self.pools[name].health = (self.spec.health, offset)
            if self.spec.slot == 0:       # one checker per host: worker 0 of the generation
                self.checker = health.Checker(self.loop, self.config, self.spec.health,
                                              self.pools, log)
                self.checker.start()
        if self.spec.servers is not None:
            self.server_watch = ServerWatch(self.loop, self.config, self.spec.servers,
                                            self.pools, self.services, log)
            self.server_watch.start()

    def _gate(self, listener: Listener):
        """The listener's gate into the limits shared by all workers, or None."""
        spec = self.spec
        if spec.limits is None:
            return None
        if self.limit_area is None:
            self.limit_area = spec.limits.area(spec.limit_slot)
        return self.limit_area.gate_for(listener, spec.limit_index)

    def reopen_logs(self) -> None:
        """USR1: the error log and the access log, by path (the master made them ours)."""
        logmod.reopen()
        if self.access is not None:
            self.access.reopen()

    # -- talking to the master --------------------------------------------------------------
    def _send(self, byte: bytes) -> None:
        try:
            self.spec.control.send(byte)
        except BlockingIOError:
            pass                  # the master is behind on reading; the next beat will do
        except OSError:
            self._master_gone()

    def _heartbeat(self) -> None:
        if os.getppid() != self.spec.master_pid:
            self._master_gone()
            return
        self._publish()
        self._send(b'h')
        self.loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    def _start_metrics(self) -> None:
        if self.spec.metrics is None:
            return
        try:
            self.publisher = metrics.Publisher(self.spec.metrics, metrics.Layout(self.config),
                                               self.by_listener, self.pools)
        except ValueError as exc:
            log.error('worker %d: metrics disabled: %s', self.spec.slot, exc)

    def _publish(self) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish()
        except Exception:     # noqa: BLE001 - metrics must never stop the worker
            log.exception('worker %d: cannot publish metrics; metrics disabled', self.spec.slot)
            self.publisher = None

    def _on_control(self) -> None:
        """Messages from the master: `Q` = drain; with fds, hand the UDP sessions over to
        those inboxes, and `Q{"slots": M}`: the flows were steered to M slots, inbox i is
        slot i's."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.spec.control, 4096, 256)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b'', []
        if not data:
            for fd in fds:
                socket.close(fd)
            self._master_gone()
            return
        if b'S' in data or b'R' in data:  # stop / resume reading UDP (a change of workers)
            self.udp_paused = b'S' in data
            if self.udp_paused:
                for service in self._udp_services():
                    service.pause()
                self._send(b's')
            else:
                self._start_udp()
        if b'Q' in data:
            plan = _plan(data)
            self.drain([socket.socket(fileno=fd) for fd in fds] or None, plan.get('slots'))
        else:
            for fd in fds:
                socket.close(fd)

    def _master_gone(self) -> None:
        if self.loop.is_running():
            log.warning('master process is gone, worker exiting')
        self.stop()

    # -- stopping ---------------------------------------------------------------------------
    def drain(self, inboxes: list[socket.socket] | None = None, slots: int | None = None) -> None:
        """QUIT: stop taking new clients, let open ones finish until shutdown_timeout.

        With `inboxes` (a reload, or the end of a binary upgrade), live UDP sessions are
        handed over to the new workers first (`slots`: see `_hand_over`).
        """
        if self.draining:
            for inbox in inboxes or ():
                inbox.close()
            return
        self.draining = True
        if self.checker is not None:      # the new generation's worker 0 checks from now on
            self.checker.stop()
        setproctitle.setproctitle(
            f'mpproxy: worker {self.spec.slot} (generation {self.spec.generation}) draining')
        if self.receiver is not None:     # never got its own sessions: nothing to pass on
            self._handoff_done()
        if inboxes:
            self._hand_over(inboxes, slots)
        for service in self.services:
            service.drain()
        if self.access is not None:
            self.access.flush()
        deadline = self.loop.time() + self.config.shutdown_timeout
        self._check_drained(deadline)

    def _check_drained(self, deadline: float) -> None:
        if not any(service.busy() for service in self.services):
            self.stop()
        elif self.loop.time() >= deadline:
            log.info('shutdown_timeout reached, closing the remaining connections')
            self._close_services(graceful=True)
            self._check_closed(self.loop.time() + CLOSE_GRACE)
        else:
            self.loop.call_later(DRAIN_POLL, self._check_drained, deadline)

    def _check_closed(self, deadline: float) -> None:
        if not any(service.busy() for service in self.services) or self.loop.time() >= deadline:
            self.stop()
        else:
            self.loop.call_later(DRAIN_POLL, self._check_closed, deadline)

    def _close_services(self, graceful: bool) -> None:
        for service in self.services:
            try:
                service.close(graceful)
            except Exception:     # noqa: BLE001 - closing must reach every service
                log.exception('error while closing a service')

    def stop(self) -> None:
        """TERM, INT, or the end of a drain: close everything now and leave the loop.

        The loop stops one turn later: the transports closed here report `connection_lost`
        in the next turn, and their relays write their access log lines then.
        """
        self._close_services(graceful=False)
        self.loop.call_soon(self.loop.stop)


def _plan(data: bytes) -> dict:
    """The JSON object after `Q` in a drain message (empty when there is none)."""
    start, end = data.find(b'{'), data.rfind(b'}')
    if start < 0 or end < start:
        return {}
    try:
        plan = json.loads(data[start:end + 1])
    except ValueError:
        return {}
    if not isinstance(plan, dict):
        return {}
    slots = plan.get('slots')
    return {'slots': slots} if isinstance(slots, int) and slots > 0 else {}


def _log_loop_exception(loop, context) -> None:
    """Errors that escaped a callback go to the error log, never to a silent default."""
    exc = context.get('exception')
    log.error('unexpected error in the event loop: %s', context.get('message'),
              exc_info=(type(exc), exc, exc.__traceback__) if exc else None)
