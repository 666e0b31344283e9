"""Shared-memory blocks that the master allocates and the workers use.

Owns: the connection-limit table (`limits.py`): per-listener and per-IP connection counts
of all workers together, one area per worker slot; the master allocates it once and hands
out and frees the slots, the workers count in it. Lives outside proxy/ so that the master
imports no data-path code.
May import: config.
"""
