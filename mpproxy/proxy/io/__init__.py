"""The data path's I/O machinery, with no protocol knowledge.

Owns: the worker's `Poller` (an epoll of its own that uvloop watches, `poller.py`) on which
the relays' and UDP sessions' sockets are served; the coarse timer wheel of the relays'
timeouts (`wheel.py`); log lines rate-limited per cause (`ratelog.py`).
May import: nothing.
"""
