"""The data path: what happens to client bytes and datagrams inside a worker.

One sub-package per concern, so that one walk of one connection stays in one folder:
  io/     the worker's own epoll (`poller.Poller`), the relays' coarse timeouts
          (`wheel.py`), rate-limited log lines (`ratelog.py`): no protocol knowledge
  edge/   pure rules and parsers over bytes and addresses: allow/deny (`acl.py`), the PROXY
          protocol header (`proxy_header.py`), the TLS ClientHello's SNI and the routes
          (`sni.py`): no I/O
  tcp/    the TCP listener service, its own accept path, the relay (one object per
          connection) and its two sockets (`end.End`), the preamble (PROXY header, SNI peek)
  udp/    the UDP listener service, its readers and admission, sessions and their table,
          IP_PKTINFO, the session hand-over on reload
Each listener becomes one service object with the same small interface:
`start()`, `drain()` (stop taking new clients), `busy()` and `close()`.
tcp/ and udp/ never import each other; nothing here imports master/ or worker/.
May import: nothing.
"""
