"""Which socket of a UDP SO_REUSEPORT group a client flow reaches, decided by the proxy.

The master binds one SO_REUSEPORT UDP socket per worker slot, in slot order, and worker i
reads socket i. Left alone, the kernel picks the socket of a datagram from a hash of the
4-tuple with a secret seed, so when the number of slots changes from N to M nobody can
tell in advance where a client's next datagram will go, and its session cannot be handed
to that worker. Here a classic BPF program, attached to the group with
SO_ATTACH_REUSEPORT_CBPF, picks the socket instead, and `slot_of` computes the same
choice in Python:

    ip32  = the last 32 bits of the source address (IPv4: the address; IPv6: bytes 12..15,
            so an IPv4 client of a dual-stack socket and its ::ffff:a.b.c.d form agree)
    h     = ((ip32 + source port) * 0x9E3779B1) mod 2**32
    slot  = (h >> 16) % slots

The program's return value is an index into the group's socket array, which is the order
the sockets were bound; the kernel falls back to its own hash when the index is not below
the number of sockets. Closing a socket moves the last one of the array into its place,
so: to grow, bind the new sockets (they get nothing yet), then attach program(M); to
shrink, attach program(M), then close sockets M..N-1 (in any order: indexes below M do
not move); a slot with no socket yet falls to the kernel's hash. There is one group per
bound address and port, and the program belongs to the group: attaching on any member
replaces it for all. A socket stays in the group for as long as any process holds it open.

In the program the packet data starts at the UDP payload (the kernel has pulled the UDP
header), so it reads the IP header at negative offsets from SKF_NET_OFF. For IPv6 the
source port is read at offset 40, right after the fixed header: a datagram with extension
headers still lands on one socket consistently, but not necessarily on slot_of's.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct

# asm-generic/socket.h (x86, arm64; alpha, mips, parisc and sparc number them otherwise)
SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68             # since Linux 5.3; not 52, SO_ATTACH_REUSEPORT_EBPF
SKF_NET_OFF = -0x100000 & 0xFFFFFFFF     # k is a u32 in struct sock_filter
MULTIPLIER = 0x9E3779B1
FALLBACK = 0xFFFFFFFF                    # not a socket index: the kernel's own hash decides

# classic BPF opcodes (linux/bpf_common.h, linux/filter.h)
LDB_ABS = 0x30      # A = u8 at k
LDH_ABS = 0x28      # A = u16 at k
LDW_ABS = 0x20      # A = u32 at k
LDH_IND = 0x48      # A = u16 at X + k
LDXB_MSH = 0xB1     # X = 4 * (u8 at k & 0xf)
RSH_K = 0x74        # A >>= k
ADD_X = 0x0C        # A += X
MUL_K = 0x24        # A *= k
MOD_K = 0x94        # A %= k
JEQ_K = 0x15        # pc += (A == k) ? jt : jf
JA = 0x05           # pc += k
TAX = 0x07          # X = A
RET_A = 0x16
RET_K = 0x06

_FILTER = struct.Struct('HBBI')          # struct sock_filter
_FPROG = struct.Struct('HP')             # struct sock_fprog: len, then the filter pointer
_U32 = struct.Struct('!I')


def program(slots: int) -> list[tuple[int, int, int, int]]:
    """The (code, jt, jf, k) instructions that steer a flow to slot_of(its source, slots)."""
    if not 1 <= slots <= 0xFFFF:
        raise ValueError(f'slots must be 1..65535, not {slots}')
    net = SKF_NET_OFF
    return [
        (LDB_ABS, 0, 0, net),            # 0   A = first byte of the IP header
        (RSH_K, 0, 0, 4),                # 1   A = IP version
        (JEQ_K, 0, 6, 4),                # 2   4 ? -> 3 : -> 9
        (LDXB_MSH, 0, 0, net),           # 3   X = 4 * IHL: where the UDP header starts
        (LDH_IND, 0, 0, net),            # 4   A = source port
        (TAX, 0, 0, 0),                  # 5   X = port
        (LDW_ABS, 0, 0, net + 12),       # 6   A = source address
        (ADD_X, 0, 0, 0),                # 7   A = ip32 + port (mod 2**32: A is 32 bits)
        (JA, 0, 0, 5),                   # 8   -> 14
        (JEQ_K, 0, 8, 6),                # 9   6 ? -> 10 : -> 18
        (LDH_ABS, 0, 0, net + 40),       # 10  A = source port
        (TAX, 0, 0, 0),                  # 11  X = port
        (LDW_ABS, 0, 0, net + 20),       # 12  A = bytes 12..15 of the source address
        (ADD_X, 0, 0, 0),                # 13  A = ip32 + port
        (MUL_K, 0, 0, MULTIPLIER),       # 14  A = h (mod 2**32)
        (RSH_K, 0, 0, 16),               # 15
        (MOD_K, 0, 0, slots),            # 16
        (RET_A, 0, 0, 0),                # 17  the socket index
        (RET_K, 0, 0, FALLBACK),         # 18  neither IPv4 nor IPv6
    ]


def attach(sock: socket.socket, slots: int) -> None:
    """Attach program(slots) to the reuseport group of `sock` (bound, or SO_REUSEPORT set);
    it replaces the group's program. OSError when the kernel refuses."""
    code = program(slots)
    filters = ctypes.create_string_buffer(b''.join(_FILTER.pack(*i) for i in code))
    fprog = _FPROG.pack(len(code), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach(sock: socket.socket) -> None:
    """Give the choice back to the kernel's hash; no program attached is fine."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def slot_of(addr: tuple, slots: int) -> int:
    """The slot the program sends the flow from `addr` to: ('127.0.0.1', 5000),
    ('::ffff:127.0.0.1', 5000, 0, 0), ('::1', 5000, 0, 0) or ('fe80::1%eth0', ...)."""
    host = addr[0]
    if ':' in host:
        ip32 = _U32.unpack_from(socket.inet_pton(socket.AF_INET6, host.partition('%')[0]), 12)[0]
    else:
        ip32 = _U32.unpack(socket.inet_pton(socket.AF_INET, host))[0]
    return (((ip32 + addr[1]) * MULTIPLIER & 0xFFFFFFFF) >> 16) % slots
