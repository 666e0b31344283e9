"""etc/mpproxy.service under a real systemd (PID 1 of a booted Debian container), with
mpproxy installed as the README says: what `systemctl` and `journalctl` show an operator.

Run by scripts/check-systemd (and so by .ci/run), not by scripts/test: it needs root, and
the first run makes the Debian rootfs (about a minute, then cached). The tests share one
container; each starts from a stopped unit with a config of its own. The backends live in
the container: echo servers on 127.0.0.1:9001 ('a:' + data) and :9002 ('b:' + data), and a
DNS server on :5300 that answers after DNS_DELAY seconds.
"""

from __future__ import annotations

import time

import pytest

from helpers.proc import wait_for
from helpers.systemd import (CONFIG, DNS, DNS_DELAY, ECHO_A, ECHO_B, PID_FILE, UNIT,
                             capability_mask, unit_value)

pytestmark = pytest.mark.timeout(600)     # the first test waits for the rootfs (debootstrap)

PORT = 8000
NEW_PORT = 8001
NOBODY = '65534'


def config(*listeners: tuple[int, str], shutdown_timeout: str = '5s', extra: str = '') -> str:
    """The YAML an operator would write: the workers as nobody, as the unit expects."""
    lines = ['workers: 2', f'pid_file: {PID_FILE}', 'user: nobody',
             f'shutdown_timeout: {shutdown_timeout}', *extra.splitlines(), 'listeners:']
    for port, upstream in listeners:
        lines += [f'  - listen: 127.0.0.1:{port}', f'    upstream: [{upstream}]']
    return '\n'.join(lines) + '\n'


SERVING_A = config((PORT, f'127.0.0.1:{ECHO_A}'))


@pytest.fixture
def service(machine):
    """The installed service, stopped, with its failed state reset; stopped again after."""
    machine.systemctl('stop', UNIT, check=True)
    machine.systemctl('reset-failed', UNIT)
    machine.start_cursor = machine.cursor()
    yield machine
    machine.systemctl('stop', UNIT)


def start(service, text: str = SERVING_A) -> int:
    service.write_config(text)
    done = service.systemctl('start', UNIT)
    assert done.returncode == 0, done.stderr + service.journal(service.start_cursor)
    return service.main_pid()


def workers(service, master: int) -> list[int]:
    return [pid for pid in service.children(master)
            if 'worker' in service.read(f'/proc/{pid}/cmdline')]


def state(service) -> dict[str, str]:
    return service.show('ActiveState', 'SubState', 'MainPID', 'StatusText', 'Result',
                        'NRestarts')


# -- start ------------------------------------------------------------------------------------

def test_start_is_active_only_once_the_workers_serve(service):
    """The upstream is a DNS name the workers resolve before they serve, and the DNS server
    answers after DNS_DELAY: the master has bound the port long before the unit is active."""
    service.write_config(config((PORT, f'backend.check:{ECHO_A}'),
                                extra=f'resolver: [127.0.0.1:{DNS}]'))
    watch = service.inside_json('start-watch', UNIT, PORT)
    samples = watch['samples']
    assert samples[-1][1:3] == ['active', 'running'], samples
    listening = [t for t, active, sub, bound in samples if bound]
    assert listening, f'port {PORT} never listened: {samples}'
    active_at = samples[-1][0]
    assert all(active == 'activating' for _, active, _, _ in samples[:-1]), samples
    # The master's socket listened this long while systemd still said activating: READY=1
    # came once the workers had their upstream, not when the master had bound.
    assert active_at - listening[0] >= DNS_DELAY - 0.3, samples
    assert watch['first'] == 'a:at once'               # the moment it is active, it serves
    master = service.main_pid()
    assert service.read(f'/proc/{master}/cmdline').startswith('mpproxy: master')
    assert len(workers(service, master)) == 2
    log = service.wait_journal('Started mpproxy.service', service.start_cursor)
    assert 'configuration ok' in log                   # ExecStartPre's mpproxy -t
    assert 'mpproxy started: 2 worker(s), 1 listener(s), generation 1' in log
    assert state(service)['StatusText'] == 'serving: generation 1'


# -- reload -----------------------------------------------------------------------------------

def test_reload_serves_the_new_config_when_systemctl_returns(service):
    master = start(service)
    assert service.roundtrip(PORT, 'old') == 'a:old'
    service.write_config(config((PORT, f'127.0.0.1:{ECHO_B}'), (NEW_PORT, f'127.0.0.1:{ECHO_B}')))
    code, answer = service.inside('then', NEW_PORT, 'new', 'systemctl', 'reload',
                                  UNIT).splitlines()
    assert code == '0', service.journal(service.start_cursor)
    assert answer == 'b:new'                            # the new listener, at once
    assert service.roundtrip(PORT, 'changed') == 'b:changed'
    now = state(service)
    assert (now['ActiveState'], now['MainPID']) == ('active', str(master))
    assert now['StatusText'] == 'serving: generation 2 active'
    assert service.wait_journal('generation 2 active', service.start_cursor)


@pytest.mark.parametrize('broken', ['invalid', 'unbindable'])
def test_reload_of_a_broken_config_fails_and_the_old_one_serves(service, broken):
    """`invalid`: the file does not load (mpproxy -s reload says so before asking the
    master); `unbindable`: it loads, but its new listener's port is taken (the echo
    backend's), so the master's reload transaction fails: only the master can tell."""
    master = start(service)
    cursor = service.cursor()
    if broken == 'invalid':
        service.write_config(config((99999, f'127.0.0.1:{ECHO_B}')))
        expect = f'{CONFIG}:'
        cause = 'port must be 1-65535'
    else:
        service.write_config(config((PORT, f'127.0.0.1:{ECHO_B}'), (ECHO_B, f'127.0.0.1:{ECHO_A}')))
        expect = 'reload failed, keeping the running configuration: '
        cause = f'cannot bind tcp 127.0.0.1:{ECHO_B}: Address already in use'
    done = service.systemctl('reload', UNIT)
    assert done.returncode == 1, done.stderr
    assert 'failed' in done.stderr
    now = state(service)
    assert (now['ActiveState'], now['SubState'], now['MainPID']) == ('active', 'running',
                                                                    str(master))
    assert service.roundtrip(PORT, 'still') == 'a:still'   # the old config, old workers
    log = service.wait_journal(cause, cursor)
    assert expect in log and 'Reload failed for mpproxy.service' in log
    if broken == 'unbindable':       # the master's READY=1 STATUS=, read by systemctl status
        assert now['StatusText'] == f'reload failed, keeping the running configuration: {cause}'
    else:                            # the master was not asked
        assert now['StatusText'] == 'serving: generation 1'
    assert service.systemctl('is-active', UNIT).stdout.strip() == 'active'
    # The unit is not left broken: a fixed file reloads.
    service.write_config(config((PORT, f'127.0.0.1:{ECHO_B}')))
    assert service.systemctl('reload', UNIT).returncode == 0
    assert service.roundtrip(PORT, 'fixed') == 'b:fixed'


# -- binary upgrade ---------------------------------------------------------------------------

def usr2(service) -> tuple[int, int]:
    """README, "Binary upgrade": USR2 to MainPID, then wait until MainPID is the new master."""
    old = service.main_pid()
    service.kill('USR2', old)
    new = wait_for(lambda: (lambda pid: pid if pid not in (0, old) else None)(service.main_pid()),
                   15, interval=0.1, what='MainPID to follow the new master')
    return old, new


def test_usr2_upgrade_as_the_readme_says_mainpid_follows_the_new_master(service):
    start(service)
    cursor = service.cursor()
    old, new = usr2(service)
    assert service.ppid(new) == old                     # exec'd by the old master
    assert int(service.read(PID_FILE)) == new
    assert int(service.read(f'{PID_FILE}.oldbin')) == old
    assert state(service)['ActiveState'] == 'active'
    service.kill('QUIT', old)                           # the README's last step
    wait_for(lambda: not service.alive(old), 15, interval=0.1, what='the old master to exit')
    now = state(service)
    assert (now['ActiveState'], now['MainPID'], now['NRestarts']) == ('active', str(new), '0')
    assert service.roundtrip(PORT, 'upgraded') == 'a:upgraded'
    assert len(workers(service, new)) == 2
    log = service.wait_journal(f'binary upgrade: listening sockets inherited from pid {old}',
                               cursor)
    assert f'{new}#master: mpproxy started' in log
    # systemd speaks to the new master now: reload reaches it ($MAINPID), stop stops it.
    service.write_config(config((PORT, f'127.0.0.1:{ECHO_B}')))
    done = service.systemctl('reload', UNIT)
    assert done.returncode == 0, done.stderr
    assert service.roundtrip(PORT, 'reloaded') == 'b:reloaded'
    assert state(service)['StatusText'] == 'serving: generation 2 active'
    assert service.systemctl('stop', UNIT).returncode == 0
    assert not service.alive(new)
    now = state(service)
    assert (now['ActiveState'], now['Result']) == ('inactive', 'success'), \
        (now, service.journal(cursor))


def test_backing_out_of_an_upgrade_gives_the_service_back_to_the_old_master(service):
    """README: QUIT to the new master backs out. systemd did not start the new master (the
    old one did), so it does not see it exit (systemd 252); the old master's MAINPID= gives
    the service back to it."""
    start(service)
    cursor = service.cursor()
    old, new = usr2(service)
    service.kill('QUIT', new)
    wait_for(lambda: service.main_pid() == old, 15, interval=0.1,
             what='MainPID back to the old master')
    wait_for(lambda: not service.alive(new), 15, interval=0.1, what='the new master to exit')
    for _ in range(10):                                  # and it stays so
        now = state(service)
        assert (now['ActiveState'], now['MainPID']) == ('active', str(old)), now
        time.sleep(0.2)
    assert now['StatusText'] == 'binary upgrade backed out; serving from this master'
    assert int(service.read(PID_FILE)) == old
    assert service.roundtrip(PORT, 'backed out') == 'a:backed out'
    assert service.wait_journal(f'binary upgrade backed out: the new master (pid {new}) exited',
                                cursor)
    assert service.systemctl('stop', UNIT).returncode == 0
    assert state(service)['Result'] == 'success'


# -- stop -------------------------------------------------------------------------------------

@pytest.mark.parametrize('upgraded', [False, True], ids=['started', 'upgraded'])
def test_stop_drains_a_connection_open_at_stop(service, upgraded):
    """`upgraded`: the main process is a master that a USR2 started (systemd did not)."""
    start(service, config((PORT, f'127.0.0.1:{ECHO_A}'), shutdown_timeout='5s'))
    if upgraded:
        old, new = usr2(service)
        service.kill('QUIT', old)
        wait_for(lambda: not service.alive(old), 15, interval=0.1, what='the old master to exit')
    master = service.main_pid()
    cursor = service.cursor()
    held = service.hold(PORT)
    stopping = None
    try:
        assert held.send('before') == 'a:before'
        began = time.monotonic()
        stopping = service.container.popen('systemctl', 'stop', UNIT)
        wait_for(lambda: state(service)['ActiveState'] == 'deactivating', 5,
                 what='the unit to be deactivating')
        # Not served by the draining workers. (Nor refused: the listening socket stays
        # open in them, so a new client waits in its backlog until they exit.)
        assert service.roundtrip(PORT, 'late', timeout=0.5).startswith('error ')
        time.sleep(1.0)
        assert held.send('during') == 'a:during'        # a second into the stop: still relayed
        assert stopping.poll() is None                  # systemctl stop waits for it
        assert state(service)['ActiveState'] == 'deactivating'
        closed = time.monotonic()
        held.close()
        assert stopping.wait(10) == 0
        ended = time.monotonic()
    finally:
        held.close()
        if stopping is not None and stopping.poll() is None:
            stopping.wait(15)
    assert ended - closed < 2.0                         # it ended with the connection,
    assert ended - began < 5.0                          # before shutdown_timeout
    now = state(service)
    assert (now['ActiveState'], now['Result']) == ('inactive', 'success'), \
        (now, service.journal(cursor))
    log = service.wait_journal(f'{master}#master: mpproxy exited', cursor)
    assert f'{master}#master: graceful shutdown (QUIT): draining for up to 5s' in log
    assert 'SIGKILL' not in log


def test_stop_ends_a_connection_still_open_at_shutdown_timeout(service):
    """systemd's TimeoutStopSec (40s) is not what ends it: the master's shutdown_timeout is."""
    start(service, config((PORT, f'127.0.0.1:{ECHO_A}'), shutdown_timeout='2s'))
    held = service.hold(PORT)
    try:
        assert held.send('before') == 'a:before'
        began = time.monotonic()
        assert service.systemctl('stop', UNIT).returncode == 0
        took = time.monotonic() - began
        after = held.send('after')
    finally:
        held.close()
    assert 2.0 <= took < 2.0 + 3.5 + 1.0, took         # shutdown_timeout + close and kill slack
    assert after == 'eof' or after.startswith('error '), after
    assert int(unit_value('TimeoutStopSec').rstrip('s')) > took
    assert state(service)['Result'] == 'success'       # not 'timeout': systemd killed nothing


# -- hardening --------------------------------------------------------------------------------

READ_ONLY = ('/etc', '/usr/local/bin', '/boot', '/home')               # ProtectSystem, ProtectHome
NOT_WRITABLE = ('/opt/mpproxy', '/var/lib', '/run', '/srv', '/var/log/mpproxy', '/root')


def tried(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines()}


def test_hardening_holds_in_the_running_workers(service):
    master = start(service)
    unit_caps = capability_mask(unit_value('CapabilityBoundingSet'))
    container_caps = int(service.status(1)['CapBnd'], 16)
    caps = unit_caps & container_caps                   # nspawn may withhold some
    assert caps and caps != container_caps
    main = service.status(master)
    assert main['Uid'].split()[0] == '0'
    assert int(main['CapBnd'], 16) == caps and int(main['CapEff'], 16) == caps
    assert main['NoNewPrivs'] == '1' and main['Seccomp'] == '2'
    pids = workers(service, master)
    assert len(pids) == 2
    for pid in pids:
        proc = service.status(pid)
        assert proc['Uid'].split() == [NOBODY] * 4 and proc['Gid'].split() == [NOBODY] * 4
        assert int(proc['CapEff'], 16) == 0 and int(proc['CapPrm'], 16) == 0
        assert int(proc['CapBnd'], 16) == caps
        assert proc['NoNewPrivs'] == '1'                # NoNewPrivileges=yes
        assert proc['Seccomp'] == '2'                   # SystemCallArchitectures=, Restrict*=

    # A file as the worker: its mount namespace, its uid and gid, no capabilities.
    worker = pids[0]
    as_worker = ['nsenter', f'--target={worker}', '--mount', f'--setuid={NOBODY}',
                 f'--setgid={NOBODY}', 'python3', '/srv/mpproxy-check/inside.py', 'try-write']
    got = tried(service.run(*as_worker, *READ_ONLY, *NOT_WRITABLE, '/tmp', '/var/tmp',
                            '/dev/shm').stdout)
    for path in READ_ONLY:
        assert got[path] == ['EROFS'], (path, got)     # mounted read-only for the service
    for path in NOT_WRITABLE:
        assert got[path] == ['EACCES'], (path, got)    # not the workers' user's
    for path, private in (('/tmp', True), ('/var/tmp', True), ('/dev/shm', False)):
        assert got[path][0] == 'ok', (path, got)
        name = got[path][1]
        assert service.run('nsenter', f'--target={worker}', '--mount', 'test', '-e', name,
                           check=False).returncode == 0
        outside = service.run('test', '-e', name, check=False).returncode == 0
        # PrivateTmp: its own /tmp and /var/tmp. /dev/shm, which PrivateDevices= shares
        # and anyone may write, is the host's (as the README says).
        assert outside is not private, (path, outside)
        service.run('rm', '-f', name)
    # Root in the same namespace (the master; workers, were `user` not set): /usr, /boot,
    # /etc, /home, /root read-only; what ProtectSystem=full leaves writable, README says.
    as_root = ['nsenter', f'--target={worker}', '--mount', 'python3',
               '/srv/mpproxy-check/inside.py', 'try-write']
    got = tried(service.run(*as_root, *READ_ONLY, '/root', '/usr/lib', '/opt/mpproxy',
                            '/var/lib', '/run').stdout)
    for path in (*READ_ONLY, '/root', '/usr/lib'):
        assert got[path] == ['EROFS'], (path, got)
    for path in ('/opt/mpproxy', '/var/lib', '/run'):
        assert got[path][0] == 'ok', (path, got)
        service.run('rm', '-f', got[path][1])
