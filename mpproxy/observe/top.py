"""`mpproxy top`: a live view of the running proxy in the terminal, with keys to drain and
ready a server.

Runs in its own process (the command line), never in the master: once a second a GET
/status on the `admin.listen` of the config file (top_view.py turns two snapshots into
lines and rates), drawn with curses. Keys: up/down or k/j select a server, `d` drains it,
`r` readies it (the authorized PUT of `mpproxy server`, with the token of
`admin.token_file`; its answer or error shows in the status line), `q` quits.

A master that does not answer leaves "cannot reach ..." on the screen and is asked again
every second; a resize redraws; lines are cut at the terminal's width and the body
scrolls to keep the selected server in view.
"""

from __future__ import annotations

import curses
import http.client
import json
import signal
import sys
import time

from mpproxy.config.schema import Config
from mpproxy.errors import EXIT_FAILURE, EXIT_OK
from mpproxy.observe import server_cli, status_view, top_view

INTERVAL = 1.0            # seconds between two GET /status
WINDOW = 3.0              # rates are over the snapshots of this many seconds: workers publish
                          # once a second, so over one second a rate would jump between 0 and 2x
TIMEOUT = 2.0             # a GET or PUT that takes longer is an error shown on the screen
KEYS = 'up/down j/k select   d drain   r ready   q quit'
_UP = (curses.KEY_UP, ord('k'))
_DOWN = (curses.KEY_DOWN, ord('j'))


def main(config: Config) -> int:
    if config.admin is None:
        print(f'mpproxy: top needs the admin endpoint: set admin: {{listen: 127.0.0.1:9901}} '
              f'in {config.path} and reload', file=sys.stderr)
        return EXIT_FAILURE
    if not sys.stdout.isatty() or not sys.stdin.isatty():
        print('mpproxy: top needs a terminal (for a one-off view: mpproxy status)',
              file=sys.stderr)
        return EXIT_FAILURE
    signal.signal(signal.SIGTERM, _interrupt)       # leave through curses.wrapper: the
    try:                                            # terminal is restored
        curses.wrapper(lambda screen: Top(config, screen).run())
    except KeyboardInterrupt:
        pass
    except curses.error as exc:
        print(f'mpproxy: top cannot use this terminal: {exc}', file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


class Top:
    """The screen's state: the snapshots of the last seconds and the lines they make, the
    selected server, the status line."""

    def __init__(self, config: Config, screen):
        self.config = config
        self.screen = screen
        address = config.admin.listen
        self.address = address
        self.host = status_view._LOOPBACK.get(address.host, address.host)
        self.history: list[dict] = []          # the snapshots of the last WINDOW seconds
        self.lines: list = [('mpproxy top', top_view.TITLE, None)]
        self.servers: list[tuple[str, str]] = []
        self.selected: tuple[str, str] | None = None
        self.message = ''                     # the status line: the last action's outcome

    def run(self) -> None:
        _quietly(curses.curs_set, 0)
        self.screen.keypad(True)
        due = 0.0
        while True:
            now = time.monotonic()
            if now >= due:
                due = now + INTERVAL
                self.refresh()
                self.draw()
            self.screen.timeout(max(1, int((due - time.monotonic()) * 1000)))
            key = self.screen.getch()
            if key == -1:
                continue
            if key in (ord('q'), ord('Q')):
                return
            if self.key(key):
                due = 0.0                     # an action: show its effect now
            self.draw()

    # -- data --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """GET /status and render it: the lines, or the problem."""
        source = f'{self.address}  {time.strftime("%H:%M:%S")}'
        try:
            status = status_view.fetch(self.host, self.address.port, TIMEOUT)
            keys = top_view.servers(status)
            master = status['master']
            oldest = master['uptime'] - WINDOW - INTERVAL / 2
            history = [s for s in self.history if s['master']['pid'] == master['pid']
                       and s['master']['uptime'] > oldest]
            self.lines = top_view.lines(history[0] if history else None, status, source)
        except (OSError, http.client.HTTPException) as exc:
            why = getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__
            self._lost(f'cannot reach {self.address}: {why}', source)
            return
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            self._lost(f'GET /status from {self.address}: {type(exc).__name__}: {exc}', source)
            return                                  # an HTTP error, or not our /status
        self.history = history + [status]
        self.servers = keys
        if self.selected not in keys:
            self.selected = keys[0] if keys else None

    def _lost(self, why: str, source: str) -> None:
        """No view: the problem in its place (the selection is kept for when it is back)."""
        self.history, self.servers = [], []
        self.lines = [(f'mpproxy top  {source}', top_view.TITLE, None), ('', top_view.ROW, None),
                      (f'{why}; retrying every {INTERVAL:g}s', top_view.HEAD, None)]

    # -- keys --------------------------------------------------------------------------------
    def key(self, key: int) -> bool:
        """Handle one key; True when it changed a server (refresh now)."""
        if key in _UP or key in _DOWN:
            keys = self.servers
            if keys:
                at = keys.index(self.selected) if self.selected in keys else 0
                at += -1 if key in _UP else 1
                self.selected = keys[max(0, min(len(keys) - 1, at))]
            return False
        if key in (ord('d'), ord('r')):
            self.change('drain' if key == ord('d') else 'ready')
            return True
        return False

    def change(self, state: str) -> None:
        if self.selected not in self.servers:        # none, or not in view (proxy away)
            self.message = f'{state}: no server selected'
            return
        upstream, server = self.selected
        what = f'{time.strftime("%H:%M:%S")} {state} {upstream} {server}'
        try:
            token = server_cli.read_token(self.config)
            status, text = server_cli.put_server(self.host, self.address.port, upstream, server,
                                                 {'state': state}, token, TIMEOUT,
                                                 unix=server_cli.unix_socket(self.config))
        except (OSError, http.client.HTTPException) as exc:
            self.message = f'{what}: {getattr(exc, "strerror", None) or exc}'
            return
        if status != 200:
            self.message = f'{what}: {status} {" ".join(text.split())}'
            return
        try:
            now = json.loads(text)
            self.message = (f"{time.strftime('%H:%M:%S')} {now['upstream']} {now['server']}: "
                            f"{now['state']}, weight {now['weight']}")
        except (ValueError, KeyError, TypeError):
            self.message = f'{what}: done'

    # -- screen ------------------------------------------------------------------------------
    def draw(self) -> None:
        screen = self.screen
        height, width = screen.getmaxyx()
        screen.erase()
        body = self.lines
        room = max(0, height - 2)             # the last two lines: status line, keys
        if len(body) > room:
            body = _scroll(body, room, self.selected)
        for y, (text, style, key) in enumerate(body[:room]):
            attr = curses.A_BOLD if style in (top_view.TITLE, top_view.HEAD) else 0
            if key is not None and key == self.selected:
                text = '>' + text[1:]
                attr = curses.A_REVERSE
            _put(screen, y, text, width, attr)
        if height >= 2:
            _put(screen, height - 2, self.message, width, curses.A_BOLD)
        _put(screen, height - 1, KEYS, width, curses.A_DIM)
        _quietly(screen.refresh)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _scroll(body: list, room: int, selected) -> list:
    """The title, then `room - 1` lines of the rest that include the selected server's."""
    if room <= 1:
        return body[:room]
    rest = body[1:]
    at = next((i for i, line in enumerate(rest) if line[2] is not None and line[2] == selected), 0)
    start = max(0, min(at - (room - 2), len(rest) - (room - 1)))
    return [body[0]] + rest[start:start + room - 1]


def _put(screen, y: int, text: str, width: int, attr: int) -> None:
    """One line, cut to the width (the last cell is left alone: writing it moves the cursor
    past the screen's end, an error in curses)."""
    if width > 1:
        _quietly(screen.addnstr, y, 0, text, width - 1, attr)


def _quietly(call, *args) -> None:
    """A curses call that may fail on a terminal that is too small or lacks a capability."""
    try:
        call(*args)
    except curses.error:
        pass
