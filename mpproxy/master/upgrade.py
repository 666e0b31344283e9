"""USR2, nginx's binary upgrade: start a new master from the installed program.

The old master renames its pid file to `<pid_file>.oldbin`, forks, and the
child execs `python -m mpproxy -c <config>` with every listening socket
inherited (their fds named in MPPROXY_INHERIT). The new master adopts them
instead of binding, starts its workers and writes the pid file; both
generations of workers then accept until the operator sends QUIT to the old
master. If the new master exits, the old one restores its pid file and goes on.

The new master gets this master's environment as it is: NOTIFY_SOCKET stays, so
under systemd the new master announces MAINPID=<its pid> and READY=1 (see notify.py).
"""

from __future__ import annotations

import os
import signal
import sys

from mpproxy.master.pidfile import PidFile
from mpproxy.master.sockets import INHERIT_ENV, SocketSet
from mpproxy.observe import log as logmod

log = logmod.log


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
