"""What a relay reads from its client before it chooses a server: the preamble.

Two optional stages, in this order, each with its own deadline::

    accepted --proxy_protocol.accept--> PROXY (header within PROXY_TIMEOUT)
             --sni_routes-------------> SNI (ClientHello within SNI_TIMEOUT) --> routing

A PROXY protocol header (v1 or v2) is consumed: the real client address it
carries replaces the peer's for allow/deny, the limits, hashing, logs and
`proxy_protocol.send`; the bytes after it stay queued for the upstream. A
malformed or late header closes the connection with one rate-limited log
line. A ClientHello is only peeked: it is forwarded unaltered.

`Preamble` is a mixin of `relay.Relay` (it owns no state of its own); while a
stage runs, `relay.peeking` names it and the relay calls `peek()` with every
chunk the client sends (`hold`), and with `eof=True` when it half-closes.
"""

from __future__ import annotations

from mpproxy.config.values import format_sockaddr
from mpproxy.proxy.edge import proxy_header, sni
from mpproxy.proxy.tcp.states import CLOSED

PROXY_TIMEOUT = 3.0       # a client must send its whole PROXY header within this
MAX_PROXY_HEADER = 8192   # bytes; v2 allows 64 KiB of TLVs, no real proxy sends that many
SNI_TIMEOUT = 5.0         # ... and its whole ClientHello within this


class Preamble:
    __slots__ = ()

    def begin(self) -> None:
        """The client is accepted: read its preamble, or route it at once."""
        if self.ctx.trusted is not None:
            self._await('proxy', PROXY_TIMEOUT)
            return
        self._after_proxy()

    def _await(self, stage: str, timeout: float) -> None:
        self.peeking = stage
        self.timer = self.ctx.wheel.call_later(timeout, self._peek_timed_out)
        if self.early or self.client.eof:   # bytes left over from the stage before
            self.peek(eof=self.client.eof)
            if self.peeking != stage or self.state is CLOSED:
                return            # that was enough: the stage is over
        self.client.resume_reading()      # (may peek() before it returns)

    def _after_proxy(self) -> None:
        svc = self.ctx
        if svc.sni is None:
            self.peeking = None
            self._route(svc.pool)
        else:
            self._await('sni', SNI_TIMEOUT)

    def peek(self, eof: bool = False) -> None:
        """Client bytes (or its FIN) arrived during a stage."""
        if self.peeking == 'proxy':
            self._peek_proxy(eof)
        else:
            self._peek_sni(eof)

    def _end_stage(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.client.pause_reading()

    # -- PROXY protocol -------------------------------------------------------------------
    def _peek_proxy(self, eof: bool) -> None:
        data = b''.join(self.early)
        state, header, used, reason = proxy_header.parse(data)
        if state == proxy_header.MORE and len(data) > MAX_PROXY_HEADER:
            state, reason = proxy_header.INVALID, f'PROXY protocol header over {MAX_PROXY_HEADER} bytes'
        if state == proxy_header.MORE and not eof:
            return
        self._end_stage()
        svc = self.ctx
        if state != proxy_header.DONE:
            self.status = 'bad_header'
            svc.counts.bad_headers += 1
            svc.ratelog.warning(('proxy header', reason or 'eof'),
                                'tcp %s: client %s: %s; closing', svc.listener.name,
                                format_sockaddr(self.client_addr),
                                reason or 'closed before its PROXY protocol header ended')
            self.abort()
            return
        self.early = [data[used:]] if used < len(data) else []
        if not header.local:      # LOCAL (the proxy's own health check): the peer is the client
            self.client_addr = header.source
            self.local_addr = header.destination
        key, refused = svc.admit(self.client_addr)
        if refused is not None:
            self.status = refused
            self.abort()
            return
        self.limit_key = key
        self._after_proxy()

    # -- SNI ------------------------------------------------------------------------------
    def _peek_sni(self, eof: bool) -> None:
        state, name, alpn = sni.parse_hello(b''.join(self.early))
        if state == sni.MORE and not eof:
            return
        self._end_stage()
        router = self.ctx.sni
        pool = router.route(name, alpn) if state == sni.FOUND else router.fallback()
        if pool is None:
            self.ctx.log.info('client %s: %s, and no default route; closing',
                                  format_sockaddr(self.client_addr),
                                  f'no route for server name {name!r}' if state == sni.FOUND
                                  else 'not a TLS ClientHello')
            self.status = 'no_route'
            self.close()
            return
        self.peeking = None
        self._route(pool)

    def _peek_timed_out(self) -> None:
        self.timer = None
        if self.state is CLOSED or not self.peeking:
            return
        if self.peeking == 'proxy':
            svc = self.ctx
            self.status = 'bad_header'
            svc.counts.bad_headers += 1
            svc.ratelog.warning(('proxy header', 'timeout'),
                                'tcp %s: client %s sent no complete PROXY protocol header in '
                                '%gs; closing', svc.listener.name, format_sockaddr(self.client_addr),
                                PROXY_TIMEOUT)
            self.abort()
        else:
            self.ctx.log.info('client %s sent no complete ClientHello in %gs; closing',
                                  format_sockaddr(self.client_addr), SNI_TIMEOUT)
            self.status = 'no_route'
            self.close()

