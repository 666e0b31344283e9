"""shared/steer.py: the reuseport CBPF program sends every flow to the socket slot_of
names, and slot_of mirrors it. Real SO_REUSEPORT groups on 127.0.0.1, ::1 and a dual-stack
'::'; one datagram per client socket (a flow), and every datagram sent is waited for
(with a deadline), so "socket j got nothing" is exact."""

from __future__ import annotations

import errno
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpproxy.shared import steer
from mpproxy.shared.steer import slot_of

FLOWS = 200
DEADLINE = 5.0
WINDOW = 32
# several sources in 127/8, so ip32 varies too, not only the port
V4_SOURCES = ('127.0.0.1', '127.0.0.2', '127.1.2.3', '127.255.255.254')


def _no_ipv6_loopback() -> str:
    """Why ::1 cannot be used here, or '' when it can."""
    if not socket.has_ipv6:
        return 'Python has no IPv6'
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(('::1', 0))
    except OSError as e:
        return f'cannot bind ::1: {e}'
    return ''


NO_V6 = _no_ipv6_loopback()
needs_v6 = pytest.mark.skipif(bool(NO_V6), reason=NO_V6)


@pytest.fixture
def sock():
    """Factory: sock(family) -> a UDP socket, closed at teardown."""
    made: list[socket.socket] = []

    def make(family: int = socket.AF_INET) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def group(sock, k: int, host: str = '127.0.0.1', port: int = 0) -> list[socket.socket]:
    """k SO_REUSEPORT sockets bound to (host, port) in order: socket i is index i of the
    group's array. Host '::' makes them dual-stack."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    socks = []
    for _ in range(k):
        s = sock(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if host == '::':
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind((host, port))
        port = s.getsockname()[1]
        s.setblocking(False)
        socks.append(s)
    return socks


def clients(sock, sources=V4_SOURCES, n: int = FLOWS, options: bytes = b'') -> list[socket.socket]:
    """n client sockets on ephemeral ports of `sources` (taken in turn)."""
    out = []
    for i in range(n):
        host = sources[i % len(sources)]
        c = sock(socket.AF_INET6 if ':' in host else socket.AF_INET)
        if options:
            c.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, options)
        c.bind((host, 0))
        out.append(c)
    return out


def exchange(cs: list[socket.socket], socks: list[socket.socket], dst: tuple) -> dict:
    """One datagram from each client to dst; {source address as the receiver saw it:
    index of the socket in `socks` that received it}, once all arrived. At most WINDOW
    are in flight, so no receive buffer overflows."""
    poller = select.poll()
    at = {}
    for i, s in enumerate(socks):
        if s.fileno() != -1:           # not closed
            poller.register(s, select.POLLIN)
            at[s.fileno()] = i
    got: dict = {}
    sent = 0
    deadline = time.monotonic() + DEADLINE
    while len(got) < len(cs):
        while sent < len(cs) and sent - len(got) < WINDOW:
            cs[sent].sendto(b'hello', dst)
            sent += 1
        left = deadline - time.monotonic()
        assert left > 0, f'{len(got)} of {len(cs)} datagrams arrived in {DEADLINE} s'
        for fd, _ in poller.poll(left * 1000):
            s = socks[at[fd]]
            while True:
                try:
                    _, addr = s.recvfrom(64)
                except BlockingIOError:
                    break
                assert addr not in got, f'{addr} arrived twice'
                got[addr] = at[fd]
    return got


def misplaced(got: dict, slots: int) -> list:
    return [(addr, i, slot_of(addr, slots)) for addr, i in got.items() if slot_of(addr, slots) != i]


# slot_of on its own


def mirror(ip32: int, port: int, slots: int) -> int:
    """The function written out again, the long way."""
    h = (ip32 + port) * 0x9E3779B1 % 2 ** 32
    return h // 65536 % slots


@pytest.mark.parametrize(('addr', 'slots', 'expected'), [
    (('127.0.0.1', 5000), 4, 0),                      # h = 0x98b842b9
    (('127.0.0.1', 5000), 7, 1),
    (('10.1.2.3', 53), 2, 1),                         # h = 0x6ec700b8
    (('10.1.2.3', 53), 1, 0),
    (('::1', 5000, 0, 0), 4, 0),                      # h = 0xc9b842b9
    (('2001:db8::c0a8:101', 443, 0, 0), 3, 2),        # ip32 = 192.168.1.1; h = 0x3bd8bffc
])
def test_slot_of_known_values(addr, slots, expected):
    assert slot_of(addr, slots) == expected


def test_slot_of_is_the_documented_function():
    assert slot_of(('127.0.0.1', 5000), 1000) == mirror(0x7F000001, 5000, 1000)
    assert slot_of(('::1', 5000, 0, 0), 1000) == mirror(1, 5000, 1000)


def test_a_v4_mapped_address_is_its_ipv4_address():
    for host, port in [('127.0.0.1', 5000), ('192.0.2.200', 65535), ('0.0.0.0', 1)]:
        for slots in (1, 2, 3, 8, 255):
            assert slot_of(('::ffff:' + host, port, 0, 0), slots) == slot_of((host, port), slots)


def test_only_the_last_32_bits_of_an_ipv6_address_count_and_a_scope_is_ignored():
    assert slot_of(('fe80::1%lo', 9, 0, 1), 5) == slot_of(('fe80::1', 9, 0, 1), 5) \
        == slot_of(('2001:db8:1:2::1', 9, 0, 0), 5) == mirror(1, 9, 5)


def test_the_arithmetic_wraps_at_32_bits_like_the_bpf_register():
    # ip32 + port overflows 32 bits: only its low 32 bits are multiplied
    assert slot_of(('255.255.255.255', 65535), 65535) == mirror(0xFFFFFFFF, 65535, 65535) \
        == (65534 * 0x9E3779B1 % 2 ** 32 >> 16) % 65535
    # the product always overflows; without the wrap the answer would differ
    assert slot_of(('127.0.0.1', 5000), 1000) != ((0x7F000001 + 5000) * 0x9E3779B1 >> 16) % 1000


def test_the_program_differs_by_slots_only_in_the_modulus_and_checks_slots():
    two, three = steer.program(2), steer.program(3)
    assert [i for i, (a, b) in enumerate(zip(two, three)) if a != b] == [16]
    assert three[16] == (steer.MOD_K, 0, 0, 3)
    for bad in (0, -1, 65536):
        with pytest.raises(ValueError):
            steer.program(bad)


# the program in the kernel


@pytest.mark.parametrize('k', [2, 3, 4])
def test_ipv4_flows_reach_the_socket_slot_of_names(sock, k):
    socks = group(sock, k)
    steer.attach(socks[0], k)
    got = exchange(clients(sock), socks, socks[0].getsockname())
    assert misplaced(got, k) == []
    assert set(got.values()) == set(range(k))
    assert {addr[0] for addr in got} == set(V4_SOURCES)


def test_ip_options_move_the_udp_header_and_the_program_follows(sock):
    """IHL 6 (a NOP, NOP, NOP, EOL option): the port is found through 4 * IHL."""
    socks = group(sock, 4)
    steer.attach(socks[0], 4)
    got = exchange(clients(sock, options=b'\x01\x01\x01\x00'), socks, socks[0].getsockname())
    assert misplaced(got, 4) == []
    assert set(got.values()) == set(range(4))


@needs_v6
def test_ipv6_flows_reach_the_socket_slot_of_names(sock):
    socks = group(sock, 4, '::1')
    steer.attach(socks[0], 4)
    got = exchange(clients(sock, ('::1',)), socks, socks[0].getsockname())
    assert misplaced(got, 4) == []
    assert set(got.values()) == set(range(4))


@needs_v6
def test_a_dual_stack_group_steers_ipv4_clients_by_their_mapped_address(sock):
    socks = group(sock, 4, '::')
    steer.attach(socks[0], 4)
    port = socks[0].getsockname()[1]
    got = exchange(clients(sock), socks, ('127.0.0.1', port))
    assert {addr[0] for addr in got} == {'::ffff:' + h for h in V4_SOURCES}
    assert misplaced(got, 4) == []
    assert set(got.values()) == set(range(4))
    got = exchange(clients(sock, ('::1',), n=50), socks, ('::1', port))  # and IPv6 ones
    assert misplaced(got, 4) == []


def test_growing_a_group_the_new_socket_waits_for_the_new_program(sock):
    socks = group(sock, 2)
    steer.attach(socks[0], 2)
    dst = socks[0].getsockname()
    cs = clients(sock)
    socks += group(sock, 1, *dst)
    got = exchange(cs, socks, dst)
    assert misplaced(got, 2) == []
    assert 2 not in got.values()
    steer.attach(socks[2], 3)          # any member: the program belongs to the group
    got = exchange(cs, socks, dst)
    assert misplaced(got, 3) == []
    assert set(got.values()) == {0, 1, 2}


@pytest.mark.parametrize('order', [(2, 1), (1, 2)])
def test_shrinking_a_group_to_one_after_attaching_program_1(sock, order):
    socks = group(sock, 3)
    dst = socks[0].getsockname()
    steer.attach(socks[0], 3)
    cs = clients(sock)
    assert set(exchange(cs, socks, dst).values()) == {0, 1, 2}
    steer.attach(socks[0], 1)
    for i in order:
        socks[i].close()
        assert set(exchange(cs, socks, dst).values()) == {0}


def test_an_index_beyond_the_group_falls_back_to_the_kernel_hash(sock):
    socks = group(sock, 2)
    steer.attach(socks[0], 3)
    got = exchange(clients(sock), socks, socks[0].getsockname())   # nothing is lost
    beyond = [addr for addr in got if slot_of(addr, 3) == 2]
    assert beyond
    assert [a for a in misplaced(got, 3) if a[0] not in beyond] == []


def test_detach_gives_the_choice_back_to_the_kernel(sock):
    socks = group(sock, 3)
    steer.attach(socks[0], 1)
    dst = socks[0].getsockname()
    cs = clients(sock)
    assert set(exchange(cs, socks, dst).values()) == {0}
    steer.detach(socks[1])
    steer.detach(socks[1])             # nothing attached: fine
    assert set(exchange(cs, socks, dst).values()) == {0, 1, 2}


def test_the_kernel_refuses_a_socket_without_so_reuseport(sock):
    s = sock()
    s.bind(('127.0.0.1', 0))
    with pytest.raises(OSError) as refused:
        steer.attach(s, 2)
    assert refused.value.errno == errno.EINVAL


# ip32 + port beyond 32 bits: sources that exist only in a private network namespace


def _no_private_netns() -> str:
    """Why this test cannot make a private network namespace, or ''."""
    if os.geteuid() != 0:
        return 'needs root to make a private network namespace'
    if not (shutil.which('unshare') and shutil.which('ip')):
        return 'needs unshare(1) and ip(8)'
    try:
        subprocess.run(['unshare', '-n', 'true'], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f'unshare -n does not work here: {e}'
    return ''


def test_the_kernel_wraps_ip32_plus_port_at_32_bits_too():
    """ip32 + port overflows only for sources like 255.255.255.x or ...:ffff:ffxx, which
    exist only on a private lo: the test below runs there, in `unshare -n`."""
    reason = _no_private_netns()
    if reason:
        pytest.skip(reason)
    run = subprocess.run(
        ['unshare', '-n', '--', sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         f'{__file__}::test_overflowing_sources_in_a_private_netns'],
        env={**os.environ, 'STEER_OUTER_NETNS': os.readlink('/proc/self/ns/net')},
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and '1 passed' in run.stdout, run.stdout + run.stderr


@pytest.mark.skipif('STEER_OUTER_NETNS' not in os.environ,
                    reason='run inside unshare -n by the test above')
def test_overflowing_sources_in_a_private_netns(sock):
    # it adds addresses to lo: only in a new namespace (not the outer test's; lo still down)
    assert os.readlink('/proc/self/ns/net') != os.environ['STEER_OUTER_NETNS']
    lo = subprocess.run(['ip', '-o', 'link', 'show', 'lo'], check=True, capture_output=True,
                        text=True, timeout=10).stdout
    assert ',UP' not in lo, lo
    v4, v6 = '255.255.255.1', '2001:db8::ffff:ff00'      # ip32 + any port >= 256 overflows
    subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True, timeout=10)
    subprocess.run(['ip', 'addr', 'add', v4 + '/32', 'dev', 'lo'], check=True, timeout=10)
    cases = [('127.0.0.1', (v4,), '127.0.0.1')]
    if not _no_ipv6_loopback():
        subprocess.run(['ip', '-6', 'addr', 'add', v6 + '/128', 'dev', 'lo', 'nodad'],
                       check=True, timeout=10)
        cases += [('::1', (v6,), '::1'), ('::', (v4,), '127.0.0.1')]
    for host, sources, dst in cases:
        socks = group(sock, 5, host)
        steer.attach(socks[0], 5)
        got = exchange(clients(sock, sources), socks, (dst, socks[0].getsockname()[1]))
        assert all(addr[1] >= 256 for addr in got)
        assert misplaced(got, 5) == []
        assert set(got.values()) == set(range(5))
