"""The customers' queue: known networks get an accept queue of their own, in the kernel.

During a flood the bots' connections fill the listening socket's accept queue, a few hundred
deep, and a customer's connection waited its turn behind all of them before the relay saw it
(18 ms at p99 in `benchmarks/flood.py`, distributed mode, against 1.6 ms without the bots).
So each listening address has two sockets in one SO_REUSEPORT group: the common queue,
listened first (index 0 of the group), and the customers' queue (index 1). A classic BPF
program attached to the group picks the socket for each incoming SYN: 1 when the source
address is in a known network (a prefix some customer has logged in from, or the allowlist),
0 otherwise. Each queue has its own door, so a customer's connection is accepted in the
next turn of the event loop however many bots wait in the common queue.

The queue decides only the order of accepting: every connection goes through the same gate
whichever socket it came from. If the kernel refuses the program, it spreads connections over
both sockets by hash, which costs the priority and nothing else.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Iterable

from mailfence.defense.net import IPNetwork

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>; not exported by the socket module
COMMON, CUSTOMERS = 0, 1  # the sockets' indexes in the group: the order of their listen()

# Classic BPF (<linux/filter.h>). A reuseport program sees the packet from the end of the
# TCP header; SKF_NET_OFF makes a load relative to the IP header instead.
_SKF_NET_OFF = -0x100000
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_AND_K = 0x04 | 0x50 | 0x00  # BPF_ALU | BPF_AND | BPF_K
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_SOURCE_OFFSET = {4: 12, 6: 8}  # where the source address is in the IP header, by version
# The kernel takes up to 4,096 classic instructions (BPF_MAXINSNS), but refused (ENOMEM) a
# program of 4,087 matching IPv6 /128s once translated, so half that. A network costs 4
# instructions (an IPv4 /24) to 9 (an IPv6 /128): 511 IPv4 /24s or 409 IPv6 /64s fit, more
# than a small host's customers use. Those past it wait in the common queue, and are let in
# all the same.
MAX_INSTRUCTIONS = 2048


def _instruction(code: int, jump_true: int, jump_false: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jump_true, jump_false, k & 0xFFFFFFFF)


def _match(network: IPNetwork) -> list[tuple[int, int]]:
    """(mask, value) per 32-bit word of the address that the network constrains."""
    bits = network.max_prefixlen
    address = int(network.network_address)
    words: list[tuple[int, int]] = []
    for index in range(bits // 32):
        covered = min(32, max(0, network.prefixlen - 32 * index))
        if covered == 0:
            break
        mask = (0xFFFFFFFF << (32 - covered)) & 0xFFFFFFFF
        shift = bits - 32 * (index + 1)
        words.append((mask, (address >> shift) & mask))
    return words


def _block(offset: int, words: list[tuple[int, int]]) -> list[bytes]:
    """One network: for each word, load, mask, compare; a mismatch jumps past the rest of
    the block (a jump counts the instructions it skips), a match of every word falls
    through to the return."""
    steps: list[tuple[int, int, int]] = []  # (code, k, 0) or, for a compare, (code, k, 1)
    for index, (mask, value) in enumerate(words):
        steps.append((_LD_W_ABS, offset + 4 * index, 0))
        if mask != 0xFFFFFFFF:
            steps.append((_AND_K, mask, 0))
        steps.append((_JEQ_K, value, 1))
    steps.append((_RET_K, CUSTOMERS, 0))
    return [
        _instruction(code, 0, len(steps) - position - 1 if compare else 0, k)
        for position, (code, k, compare) in enumerate(steps)
    ]


def program(family: int, networks: Iterable[IPNetwork]) -> tuple[bytes, int]:
    """The program for a group of `family` sockets: CUSTOMERS for a source in one of
    `networks` (the other family's are skipped), COMMON otherwise. Returns (the program, how
    many networks it holds): the first ones given, as many as MAX_INSTRUCTIONS allows."""
    version = 4 if family == socket.AF_INET else 6
    offset = _SKF_NET_OFF + _SOURCE_OFFSET[version]
    code: list[bytes] = []
    held = 0
    for network in dict.fromkeys(networks):
        if network.version != version:
            continue
        block = _block(offset, _match(network))
        if len(code) + len(block) + 1 > MAX_INSTRUCTIONS:
            break
        code += block
        held += 1
    code.append(_instruction(_RET_K, 0, 0, COMMON))
    return b"".join(code), held


def attach(sock: socket.socket, code: bytes) -> None:
    """Attaches `code` to the SO_REUSEPORT group of `sock` (it replaces any earlier one).
    Raises OSError when the kernel refuses it."""
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
