"""USR2, nginx's binary upgrade: start a new master from the installed program.

The old master renames its pid file to `<pid_file>.oldbin`, forks, and the
child execs `python -m mpproxy -c <config>` with every listening socket
inherited (their fds named in MPPROXY_INHERIT). The new master adopts them
instead of binding, starts its workers and writes the pid file; both
generations of workers then accept until the operator sends QUIT to the old
master. If the new master exits, the old one restores its pid file and goes on.

The new master gets this master's environment as it is: NOTIFY_SOCKET stays, so
under systemd the new master announces MAINPID=<its pid> and READY=1 (see notify.py).

UDP sessions cross over too (`SessionChannel`): the old master passes one end of
a SOCK_SEQPACKET socketpair (named in MPPROXY_UDP_HANDOVER). The new master's
first generation starts with every worker waiting, its UDP sockets unread, on an
inbox (proxy/udp/handoff.py); once all serve, the new master sends the inboxes'
sending ends over the channel. Until QUIT the old master's workers serve UDP
alone; at QUIT the old master steers the flows to the new worker count and its
workers hand every session over, then exit. If the upgrade is backed out (the
new master exits first), its inboxes die with it and the old master keeps
every session. If the old master dies without QUIT, the inboxes see EOF and the
new workers start reading on their own (sessions are then re-created).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys

from mpproxy.master.pidfile import PidFile
from mpproxy.master.sockets import INHERIT_ENV, SocketSet
from mpproxy.observe import log as logmod

log = logmod.log


CHANNEL_ENV = 'MPPROXY_UDP_HANDOVER'


class SessionChannel:
    """One master's end of the UDP hand-over channel of a binary upgrade."""

    def __init__(self, sock: socket.socket):
        self.sock: socket.socket | None = sock
        self.selector: selectors.BaseSelector | None = None
        self.inboxes: list[socket.socket] = []    # the old master: what the new one sent
        self.slots = 0                            # ... for that many slots

    @classmethod
    def pair(cls) -> tuple['SessionChannel', socket.socket]:
        """The old master's channel, and the end to pass to the new master."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    @classmethod
    def inherited(cls) -> 'SessionChannel | None':
        """The new master's channel, if the old master passed one."""
        value = os.environ.pop(CHANNEL_ENV, None)
        if not value:
            return None
        try:
            sock = socket.socket(fileno=int(value))
        except (ValueError, OSError):
            return None
        os.set_inheritable(sock.fileno(), False)
        return cls(sock)

    def watch(self, selector: selectors.BaseSelector) -> None:
        self.sock.setblocking(False)
        self.selector = selector
        selector.register(self.sock, selectors.EVENT_READ, self.receive)

    def offer(self, inboxes: list) -> bool:
        """The new master: send the inboxes of its serving workers (slot order)."""
        if not inboxes or any(inbox is None for inbox in inboxes):
            log.warning('binary upgrade: a worker of this master has no inbox for the UDP '
                        'sessions; they will not be handed over')
            return False
        try:
            socket.send_fds(self.sock, [json.dumps({'slots': len(inboxes)}).encode()],
                            [inbox.fileno() for inbox in inboxes])
        except OSError as exc:
            log.warning('binary upgrade: cannot offer the UDP inboxes to the old master: %s; '
                        'its sessions will not be handed over', exc.strerror or exc)
            return False
        return True

    def receive(self) -> None:
        """The old master: the new master's inboxes, or EOF."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 256)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b'', []
        boxes = [socket.socket(fileno=fd) for fd in fds]
        if not data:              # the new master sent what it had, or is gone
            for box in boxes:
                box.close()
            self._close_socket()
            return
        try:
            slots = int(json.loads(data)['slots'])
        except (ValueError, KeyError, TypeError):
            slots = 0
        if slots != len(boxes) or not slots:
            for box in boxes:
                box.close()
            return
        self.drop_inboxes()
        self.inboxes, self.slots = boxes, slots
        log.info('binary upgrade: the new master\'s %d worker(s) wait for the UDP sessions; '
                 'they are handed over at QUIT', slots)

    def drop_inboxes(self) -> None:
        for box in self.inboxes:
            box.close()
        self.inboxes, self.slots = [], 0

    def _close_socket(self) -> None:
        if self.sock is None:
            return
        if self.selector is not None:
            try:
                self.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self.sock.close()
        self.sock = None

    def close(self) -> None:
        self._close_socket()
        self.drop_inboxes()


def oldbin(path: str) -> str:
    return path + '.oldbin'


def spawn_new_master(config_path: str, sockets: SocketSet, more_env: dict | None = None,
                     more_fds=()) -> int:
    """Fork and exec the new master; returns its pid (the child never returns).

    `more_env`, `more_fds`: other sockets to pass on (the admin endpoint's) and the
    environment that names them.
    """
    env = dict(os.environ)
    env[INHERIT_ENV] = sockets.export()
    env.update(more_env or {})
    for fd in more_fds:
        os.set_inheritable(fd, True)
    argv = [sys.executable, '-m', 'mpproxy', '-c', config_path]
    try:
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT,
                            signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
    finally:                      # the workers forked later must not inherit them
        for fd in (*sockets.fds(), *more_fds):
            os.set_inheritable(fd, False)
    return pid


def begin(pidfile: PidFile | None, config_path: str, sockets: SocketSet,
          more_env: dict | None = None, more_fds=()) -> int:
    """Rename the pid file to .oldbin and start the new master; its pid.

    Raises OSError (with the pid file put back) when either step fails.
    """
    if pidfile:
        try:
            os.rename(pidfile.path, oldbin(pidfile.path))
        except OSError as exc:
            raise OSError(exc.errno, f'cannot rename {pidfile.path}: {exc.strerror}') from None
        pidfile.path = oldbin(pidfile.path)
    try:
        return spawn_new_master(config_path, sockets, more_env, more_fds)
    except OSError as exc:
        restore_pidfile(pidfile)
        raise OSError(exc.errno, f'cannot start a new master: {exc.strerror or exc}') from None


def restore_pidfile(pidfile: PidFile | None) -> None:
    """The new master is gone: take the pid file back from .oldbin."""
    if pidfile and pidfile.path.endswith('.oldbin'):
        path = pidfile.path[:-len('.oldbin')]
        try:
            os.rename(pidfile.path, path)
        except OSError as exc:
            log.error('cannot restore pid file %s: %s', path, exc.strerror)
            return
        pidfile.path = path
        try:                      # it holds our pid already; the write only makes sure
            pidfile.write(os.getpid())
        except OSError as exc:    # ENOSPC: the file kept its content (the pid)
            log.warning('cannot rewrite pid file %s: %s', path, exc.strerror)
