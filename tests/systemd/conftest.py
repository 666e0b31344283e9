"""One booted container for the whole run (scripts/check-systemd): systemd as PID 1,
mpproxy installed as the README says, and the backends the tests use, started as
transient services inside it. The tests skip only where the container cannot boot here
(not root, no systemd-nspawn, a boot that does not come up), saying why."""

from __future__ import annotations

import pytest

from helpers import nspawn
from helpers.systemd import Installed, prepare, requirements


@pytest.fixture(scope='session')
def machine(request, tmp_path_factory):
    reason = nspawn.why_not()
    if reason:
        pytest.skip(f'cannot boot a container here: {reason}')
    plugins = request.config.pluginmanager
    terminal, capture = plugins.getplugin('terminalreporter'), plugins.getplugin('capturemanager')

    def say(text: str) -> None:        # on the terminal now, not with the captured output
        if terminal is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                terminal.write_line(f'check-systemd: {text}')

    root = nspawn.rootfs(say)
    wheels = nspawn.wheels(requirements(), say)
    run = tmp_path_factory.mktemp('systemd')
    run.chmod(0o755)                  # the workers' user reads inside.py from it
    prepare(run)
    container = nspawn.Container(root, [(str(run), '/srv/mpproxy-check', False),
                                        (str(wheels), '/srv/wheels', True)],
                                 run / 'console.log')
    try:
        try:
            state = container.boot()
        except nspawn.CannotBoot as exc:
            pytest.skip(f'systemd-nspawn cannot boot a container here: {exc}')
        service = Installed(container)
        version = service.install()
        say(f'booted ({state}): {service.run("systemctl", "--version").stdout.splitlines()[0]}'
            f'; {version} installed')
        service.start_backends()
        yield service
    finally:
        container.stop()
