"""Observability: the error log, the metrics shared with the master, the admin endpoint.

Owns: logging set-up for the master and the workers, log levels, reopening log files
(`log.py`); the metrics snapshot format, its shared blocks and the workers' publisher
(`metrics.py`); the master's totals and the Prometheus text format (`prometheus.py`);
the non-blocking HTTP server of `admin.listen` (`admin.py`); the commands that talk to it:
`mpproxy status`'s view (`status_view.py`), `mpproxy server` (`server_cli.py`) and
`mpproxy top` (`top.py`: curses, keys; `top_view.py`: snapshots -> lines and rates).
May import: config, errors, upstream.
(upstream: pool's histogram buckets. metrics.py reads the services' and pools' counters by
their attribute names.)
"""
