"""Upstream server pools: which server a new connection or UDP session goes to.

Owns: resolving server addresses into socket addresses (in the worker, never in the
master), the balancers (one module each), passive health, backup and max_conns.
May import: config, errors.
(It takes a logger from its caller.)
"""
