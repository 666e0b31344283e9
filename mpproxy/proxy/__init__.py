"""The data path: what happens to client bytes and datagrams inside a worker.

Owns: the TCP relay (`tcp.py`), UDP sessions (`udp.py`: the service, session life and
replies; `udp_admit.py`: the listener's readers and who gets a session, PROXY protocol per
datagram; `udp_session.py`: session, table, counters, the per-IP limit seam) and their
helpers, and the connection limits shared by all workers (`limits.py`; the master allocates
its table).
`proxy_header.py` reads and writes PROXY protocol v1/v2 headers (pure, no I/O).
`stream.py` owns the worker's `Poller` (an epoll of its own that uvloop watches) and the
`Stream`s (relay sockets with the transport API); UDP session sockets are watched there too.
`wheel.py`: the relays' coarse timeouts.
Each listener becomes one service object with the same small interface:
`start()`, `drain()` (stop taking new clients), `busy()` and `close()`.
May import: config, upstream, observe. Never imports master/ or worker/.
"""
