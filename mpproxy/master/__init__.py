"""The master process: the arbiter that owns sockets, generations and workers.

Owns: the main loop (a selectors poll, no asyncio, no threads), signal dispatch
(`handle_<sig>`), the reload transaction, the listening sockets (bind, reuse,
diff), the worker table, the pid file, daemonising, sd_notify (systemd), and
(`status.py`) the metrics totals of exited workers and the admin endpoint's pages.
May import: config, worker (to run a child after fork), upstream (the health block it
allocates per generation), proxy (the connection-limit table it allocates once and
whose slots it hands out and frees), observe, errors.
"""
