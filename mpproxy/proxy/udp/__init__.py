"""UDP: the listener service and its sessions.

Owns: `service.UdpService` (one per UDP listener: session life and replies), the
listener's readers and who gets a session, with PROXY protocol per datagram
(`admit.py`'s `Admission`, an object the service builds, given what they share;
with sni_routes `quicroute.py`'s `RoutedAdmission`, which holds a new flow until its
QUIC ClientHello names the pool, and `cids.py`'s index of their connection IDs, which lets
a session follow a client whose NAT rebinds it: `moves.py`, the service's part that moves it),
the session, its table, counters and the per-IP limit seam (`session.py`), IP_PKTINFO
for wildcard listeners (`pktinfo.py`), and handing sessions (and datagrams not yet read)
to the new workers on a reload, a change of workers or a binary upgrade (`handoff.py`).
May import: config, errors, upstream, shared, observe, proxy.io, proxy.edge.
"""
