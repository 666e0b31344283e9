"""The command line, with nginx's habits; the only place that exits the master process.

    mpproxy [-c CONFIG] [-t] [-T] [-s reload|stop|quit|reopen [--pid PID]] [--daemon] [-V]
    mpproxy [-c CONFIG] status       # a short view of the running proxy, from admin.listen
    mpproxy [-c CONFIG] server drain|maint|ready|weight UPSTREAM SERVER [...]
    mpproxy [-c CONFIG] top          # a live view in the terminal, with keys to drain / ready
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from mpproxy import __version__
from mpproxy.errors import EXIT_FAILURE, EXIT_OK, ConfigError, MpproxyError

DEFAULT_CONFIG = '/etc/mpproxy/mpproxy.yaml'
RELOAD_WAIT = 60.0        # -s reload: how long to wait for the outcome
SIGNAL_NAMES = {'reload': signal.SIGHUP, 'stop': signal.SIGTERM,
                'quit': signal.SIGQUIT, 'reopen': signal.SIGUSR1}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='mpproxy', description='Layer-4 TCP and UDP reverse proxy and load balancer.')
    parser.add_argument('-c', dest='config', metavar='CONFIG',
                        default=os.environ.get('MPPROXY_CONFIG', DEFAULT_CONFIG),
                        help='configuration file (default: $MPPROXY_CONFIG, else %(default)s)')
    parser.add_argument('-t', dest='test', action='store_true',
                        help='check the configuration and exit')
    parser.add_argument('-T', dest='dump', action='store_true',
                        help='check the configuration, print the effective one and exit')
    parser.add_argument('-s', dest='signal', choices=sorted(SIGNAL_NAMES),
                        help='send a signal to the running master (its pid is read from pid_file)')
    parser.add_argument('--pid', type=int, metavar='PID',
                        help='with -s: the master is PID, not the pid in pid_file '
                             '(systemd: --pid $MAINPID)')
    parser.add_argument('--daemon', action='store_true', help='detach from the terminal')
    parser.add_argument('-V', '--version', action='version', version=f'mpproxy {__version__}')
    parser.add_argument('command', nargs='?', choices=('status', 'server', 'top'),
                        help='status: show the running proxy (its /status on admin.listen); '
                             'server: change an upstream server at run time (server -h); '
                             'top: a live view, with keys to drain and ready servers')
    parser.add_argument('rest', nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rest and args.command != 'server':
        parser.error(f'unrecognized arguments: {" ".join(args.rest)}')
    if args.pid is not None and not args.signal:
        parser.error('--pid goes with -s')
    if args.pid is not None and args.pid <= 0:
        parser.error(f'--pid: not a process id: {args.pid}')
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mpproxy.config import dump, load   # after argparse, so -V and -h stay fast

    try:
        config = load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_FAILURE
    missing = _missing_extras(config)
    if missing and (args.test or args.dump or not (args.signal or args.command)):
        print(f'{config.path}: {missing}', file=sys.stderr)
        return EXIT_FAILURE
    if args.test or args.dump:
        problems = _check_names(config)      # -t runs in its own process: DNS is fine here
        if problems:
            for problem in problems:
                print(f'{config.path}: {problem}', file=sys.stderr)
            return EXIT_FAILURE
        from mpproxy.config.nofile import startup_warnings
        for warning in startup_warnings(config):   # worth knowing, not wrong: still exit 0
            print(f'mpproxy: warning: {warning}', file=sys.stderr)
        if args.dump:
            sys.stdout.write(dump(config))
        print('configuration ok', file=sys.stderr if args.dump else sys.stdout)
        return EXIT_OK
    if args.signal:
        return _send_signal(config, args.signal, args.pid)
    if args.command == 'status':
        from mpproxy.observe import status_view
        return status_view.main(config)
    if args.command == 'server':
        from mpproxy.observe import server_cli
        return server_cli.main(config, args.rest)
    if args.command == 'top':
        from mpproxy.observe import top
        return top.main(config)
    return _serve(config, args)


def _missing_extras(config) -> str | None:
    """The one line saying which optional package the config needs and lacks, or None."""
    for i, listener in enumerate(config.listeners):
        if listener.protocol == 'udp' and listener.sni_routes is not None:
            from mpproxy.proxy.edge import quic
            if not quic.available():
                return (f'listeners[{i}].sni_routes: routing QUIC by server name needs the '
                        f'cryptography package: pip install "mpproxy[quic]"')
            return None
    return None


def _check_names(config) -> list[str]:
    import asyncio

    from mpproxy.upstream.discovery import unresolvable
    return asyncio.run(unresolvable(config))


def _send_signal(config, name: str, pid: int | None = None) -> int:
    """-s NAME to `pid` (--pid), else to the pid in pid_file."""
    from mpproxy.master.pidfile import read_pid

    if pid is None and not config.pid_file:
        print(f'mpproxy: -s needs pid_file set in {config.path}, or --pid', file=sys.stderr)
        return EXIT_FAILURE
    source = '--pid' if pid is not None else config.pid_file
    try:
        if pid is None:
            pid = read_pid(config.pid_file)
        if name == 'reload':
            return _reload(pid)
        os.kill(pid, SIGNAL_NAMES[name])
    except MpproxyError as exc:
        print(f'mpproxy: {exc}', file=sys.stderr)
        return EXIT_FAILURE
    except ProcessLookupError:
        print(f'mpproxy: no process with pid {pid} (from {source})', file=sys.stderr)
        return EXIT_FAILURE
    except PermissionError:
        print(f'mpproxy: not allowed to signal pid {pid}', file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _reload(pid: int) -> int:
    """Ask the master for a reload and report its outcome (master/control.py); a master
    that does not answer there gets HUP, as with `kill -HUP`."""
    from mpproxy.master import control

    try:
        answer = control.request_reload(pid, RELOAD_WAIT)
    except TimeoutError:
        print(f'mpproxy: reload asked of pid {pid}; no outcome within {RELOAD_WAIT:g}s '
              f'(see the error log)', file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f'mpproxy: reload of pid {pid}: {exc.strerror or exc}', file=sys.stderr)
        return EXIT_FAILURE
    if answer is None:
        os.kill(pid, signal.SIGHUP)
        print(f'mpproxy: sent HUP to pid {pid}; it has no control socket here, so its outcome '
              f'is only in the error log', file=sys.stderr)
        return EXIT_OK
    ok, text = answer
    print(f'mpproxy: {text}', file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def _serve(config, args) -> int:
    from mpproxy.master import daemon
    from mpproxy.master.arbiter import Arbiter
    from mpproxy.observe import log as logmod

    try:
        logmod.setup(config.error_log, config.log_level)
    except OSError as exc:
        print(f'mpproxy: cannot open error log {config.error_log}: {exc.strerror}', file=sys.stderr)
        return EXIT_FAILURE
    ready_fd = daemon.daemonize(config.error_log == 'stderr') if args.daemon else None
    arbiter = Arbiter(config, args.config, ready_fd)
    try:
        arbiter.start()
    except MpproxyError as exc:
        logmod.log.error('%s', exc)
        daemon.report(ready_fd, f'mpproxy: {exc}\n')
        return EXIT_FAILURE
    except OSError as exc:
        logmod.log.error('cannot start: %s', exc)
        daemon.report(ready_fd, f'mpproxy: cannot start: {exc}\n')
        return EXIT_FAILURE
    return arbiter.run()
