"""Observability: the error log (and, later, the access log, metrics and admin endpoint).

Owns: logging set-up for the master and the workers, log levels, reopening log files.
May import: config (for the level names); nothing from master/, worker/ or proxy/.
"""
