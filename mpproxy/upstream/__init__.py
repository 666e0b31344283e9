"""Upstream server pools: which server a new connection or UDP session goes to.

Owns: resolving server addresses into socket addresses with their TTLs (in the worker,
never in the master: dnspython's stub resolver, the hosts file) and re-resolving them on
time, the balancers (one module each), passive health, backup and max_conns.
May import: config, errors.
(It takes a logger from its caller.)
"""
