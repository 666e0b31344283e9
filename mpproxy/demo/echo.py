"""Echo server for trying mpproxy: `python -m mpproxy.demo.echo [HOST:PORT]`.

TCP: echoes every byte and answers FIN with FIN. UDP: echoes every datagram.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class TcpEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        return False              # close after echoing: our FIN follows the client's


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if data:
            self.transport.sendto(data, addr)
        else:                      # transports drop 0-byte datagrams; send on the socket
            self.transport.get_extra_info('socket').sendto(b'', addr)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(TcpEcho, host, port, reuse_address=True)
    await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, port))
    print(f'echo backend on tcp and udp {host}:{port}', flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    host, _, port = (argv[0] if argv else '127.0.0.1:9000').rpartition(':')
    uvloop.run(serve(host.strip('[]') or '127.0.0.1', int(port)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
