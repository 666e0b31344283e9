"""Upstream server pools: which server a new connection or UDP session goes to.

Owns: resolving server addresses into socket addresses (in the worker, never in the
master) and the balancing order. May import: config.
"""
