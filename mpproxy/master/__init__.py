"""The master process: the arbiter and the objects that own its state.

Owns: the main loop (a selectors poll, no asyncio, no threads) and signal dispatch
(`handle_<sig>`) in `arbiter.py`, with the guard every step runs under (`guard.py`);
the reload transaction: building a generation all or nothing (`build.py`), forking,
reaping and reconciling its workers (`table.py`, the worker table; `workers.py`, the
records and the fork), committing it (`arbiter.py`); the listening sockets (bind,
reuse, diff), the pid file, daemonising, sd_notify (systemd), the binary upgrade, the
`-s reload` control socket (`control.py`), the config watcher, and (`status.py`) the
metrics totals of exited workers and the admin endpoint's pages.
May import: config, errors, worker, upstream, shared, observe.
(worker: to run a child after fork; upstream: the health block it allocates per
generation; shared: the connection-limit table it allocates once and whose slots it
hands out and frees. Never proxy/: the master touches no data-path code.)
"""
