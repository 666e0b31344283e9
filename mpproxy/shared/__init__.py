"""What the master and the workers share: shared-memory blocks and kernel-side rules.

Owns: the connection-limit table (`limits.py`): per-listener and per-IP connection counts
of all workers together, one area per worker slot; the master allocates it once and hands
out and frees the slots, the workers count in it. The UDP flow steering (`steer.py`): the
reuseport BPF program the master attaches, and the same choice computed in Python, by
which workers hand sessions to the slot a client reaches. Lives outside proxy/ so that the
master imports no data-path code.
May import: config.
"""
