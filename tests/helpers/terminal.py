"""A real terminal for full-screen commands: a tmux server of its own (`tmux -L <name>`, a
private socket, no user config) with one detached session running the command. Keys go in
with send-keys, the screen comes out with capture-pane; every wait has a deadline.

The command runs under `sh -c`, which prints `[exited N]` when it ends, and the pane
stays (remain-on-exit), so a test reads the exit status and the last screen there (tmux's
own #{pane_dead_status} is not reliable: tmux 3.3 can see the pane's end before it reaps
the process, and then never shows a status). `close()` kills that tmux server by its
socket, then anything of the pane still alive, by pid.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

from helpers.proc import alive, children, wait_for

TMUX = shutil.which('tmux')


class Terminal:
    def __init__(self, command: list[str], tmp_path, width: int = 120, height: int = 40,
                 env: dict | None = None):
        self.name = f'mpproxy-test-{os.getpid()}-{uuid.uuid4().hex[:8]}'
        conf = tmp_path / f'{self.name}.conf'
        conf.write_text('set -g remain-on-exit on\nset -g status off\n'
                        'set -g default-terminal screen\n')
        self.env = {**os.environ, **(env or {})}
        self.socket = Path(os.environ.get('TMUX_TMPDIR', '/tmp'), f'tmux-{os.getuid()}',
                           self.name)
        self.pid = None
        try:
            self._tmux('-f', str(conf), 'new-session', '-d', '-s', 'main', '-x', str(width),
                       '-y', str(height), 'sh', '-c', f'{shlex.join(command)}; '
                       f'echo "[exited $?]"')
            self.pid = int(self._tmux('display-message', '-p', '-t', 'main', '#{pane_pid}'))
        except BaseException:
            self.close()
            raise

    def _tmux(self, *args: str) -> str:
        out = subprocess.run([TMUX, '-L', self.name, *args], capture_output=True, text=True,
                             timeout=10, env=self.env, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise AssertionError(f'tmux {" ".join(args)}: {out.stderr.strip()}')
        return out.stdout.strip()

    def keys(self, *keys: str) -> None:
        """tmux key names: 'd', 'Down', 'Up', 'q', ..."""
        self._tmux('send-keys', '-t', 'main', *keys)

    def screen(self) -> str:
        return self._tmux('capture-pane', '-p', '-t', 'main')

    def wait_screen(self, predicate, timeout: float = 10.0, what: str = 'the screen') -> str:
        """The screen once `predicate(screen)` holds (a str: once it is on the screen)."""
        test = (lambda s: predicate in s) if isinstance(predicate, str) else predicate
        last = ['']

        def check():
            last[0] = self.screen()
            return test(last[0])
        try:
            wait_for(check, timeout, interval=0.1, what=what)
        except AssertionError as exc:
            raise AssertionError(f'{exc}; the screen was:\n{last[0]}') from None
        return last[0]

    def resize(self, width: int, height: int) -> None:
        self._tmux('resize-window', '-t', 'main', '-x', str(width), '-y', str(height))

    def size(self) -> tuple[int, int]:
        w, h = self._tmux('display-message', '-p', '-t', 'main',
                          '#{pane_width} #{pane_height}').split()
        return int(w), int(h)

    def exit_status(self) -> int | None:
        """The command's exit status once it ended, else None."""
        # with the scrollback: tmux scrolls a dead pane's screen up a line for its notice
        everything = self._tmux('capture-pane', '-p', '-S', '-', '-t', 'main')
        found = re.search(r'^\[exited (\d+)\]$', everything, re.M)
        return int(found[1]) if found else None

    def close(self) -> None:
        pids = [self.pid, *children(self.pid)] if self.pid is not None else []
        subprocess.run([TMUX, '-L', self.name, 'kill-server'], capture_output=True, timeout=10,
                       env=self.env, stdin=subprocess.DEVNULL)
        self.socket.unlink(missing_ok=True)     # tmux 3.3 leaves the file behind
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
