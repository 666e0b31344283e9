"""One worker process: everything that happens in a child after the master forks it.

Owns: resetting what the fork inherited (signals, wake-up fd, foreign fds), the
open-files limit and the switch to `user` (`privileges.py`), the worker's own
uvloop loop, its services (one per listener), the UDP sessions handed over on a
reload (`handover.py`), the channel to the other workers of its generation (QUIC
sessions whose client moved: `peers.py`), the heartbeat, drain and exit.
May import: config, errors, proxy, upstream, shared, observe.
(Never master/.)
"""
