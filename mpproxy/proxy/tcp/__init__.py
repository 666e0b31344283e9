"""TCP: the listener service and the relay of each connection.

Owns: `service.TcpService` (one per TCP listener: accepting, admission, limits, counters),
the own accept path (`accept.py`), the relay between a client and an upstream
(`relay.py`: one object per connection, its states in `states.py`) and its two sockets
(`end.py`), the preamble read before a relay connects (`preamble.py`: PROXY header, SNI
peek).
May import: config, errors, upstream, shared, observe, proxy.io, proxy.edge.
"""
