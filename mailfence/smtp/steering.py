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
whichever socket it came from. If the kernel refuses a program, the group keeps the one it
had (at start, none: connections are spread over both sockets by hash), which costs the
priority and nothing else.
"""

from __future__ import annotations

import ctypes
import errno
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
_JA = 0x05 | 0x00  # BPF_JMP | BPF_JA
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_SOURCE_OFFSET = {4: 12, 6: 8}  # where the source address is in the IP header, by version
_FULL = 0xFFFFFFFF
_CHAIN = 250  # compares per chain: a jump reaches at most 255 instructions ahead

# BPF_MAXINSNS. Networks that fit in one 32-bit word (every IPv4 one) cost about one
# instruction each, so ~4,000 fit; an IPv6 /64 costs 5. The kernel may refuse a smaller
# program for memory (net.core.optmem_max, 20 KiB on kernels before 6.9): `install` then
# tries again with fewer networks. Those left out wait in the common queue, and are let in
# all the same.
MAX_INSTRUCTIONS = 4096

Instruction = tuple[int, int, int, int]  # (code, jump if true, jump if false, k)


def _words(network: IPNetwork) -> list[tuple[int, int]]:
    """(mask, value) per 32-bit word of the address that the network constrains."""
    bits = network.max_prefixlen
    address = int(network.network_address)
    words: list[tuple[int, int]] = []
    for index in range(network.prefixlen // 32 + (1 if network.prefixlen % 32 else 0)):
        covered = min(32, network.prefixlen - 32 * index)
        mask = (_FULL << (32 - covered)) & _FULL
        words.append((mask, (address >> (bits - 32 * (index + 1))) & mask))
    return words


def _one_word(offset: int, mask: int, values: list[int]) -> list[Instruction]:
    """Networks that differ only in the first word's `mask` bits: load and mask once, then
    chains of compares, each match jumping to the return after its chain."""
    code: list[Instruction] = [(_LD_W_ABS, 0, 0, offset)]
    if mask != _FULL:
        code.append((_AND_K, 0, 0, mask))
    for start in range(0, len(values), _CHAIN):
        chain = values[start : start + _CHAIN]
        for position, value in enumerate(chain):
            code.append((_JEQ_K, len(chain) - position, 0, value))
        code += [(_JA, 0, 0, 1), (_RET_K, 0, 0, CUSTOMERS)]
    return code


def _several_words(offset: int, words: list[tuple[int, int]]) -> list[Instruction]:
    """One network: each word loaded, masked and compared; a mismatch jumps past the rest
    of the block (a jump counts the instructions it skips), a full match returns."""
    steps: list[tuple[int, int, bool]] = []
    for index, (mask, value) in enumerate(words):
        steps.append((_LD_W_ABS, offset + 4 * index, False))
        if mask != _FULL:
            steps.append((_AND_K, mask, False))
        steps.append((_JEQ_K, value, True))
    steps.append((_RET_K, CUSTOMERS, False))
    return [
        (code, 0, len(steps) - position - 1 if compare else 0, k)
        for position, (code, k, compare) in enumerate(steps)
    ]


def _build(version: int, networks: list[IPNetwork]) -> list[Instruction]:
    offset = _SKF_NET_OFF + _SOURCE_OFFSET[version]
    by_mask: dict[int, list[int]] = {}
    code: list[Instruction] = []
    for network in networks:
        words = _words(network)
        if not words:  # /0: everyone
            return [(_RET_K, 0, 0, CUSTOMERS)]
        if len(words) == 1:
            by_mask.setdefault(words[0][0], []).append(words[0][1])
        else:
            code += _several_words(offset, words)
    for mask, values in by_mask.items():
        code += _one_word(offset, mask, values)
    return [*code, (_RET_K, 0, 0, COMMON)]


def program(
    family: int, networks: Iterable[IPNetwork], limit: int | None = None
) -> tuple[bytes, int]:
    """The program for a group of `family` sockets: CUSTOMERS for a source in one of
    `networks` (the other family's are skipped), COMMON otherwise. Returns (the program, how
    many networks it holds): the first ones given, as many as `limit` and MAX_INSTRUCTIONS
    allow."""
    version = 4 if family == socket.AF_INET else 6
    chosen = [n for n in dict.fromkeys(networks) if n.version == version][:limit]
    code = _build(version, chosen)
    while len(code) > MAX_INSTRUCTIONS:
        chosen = chosen[: len(chosen) * MAX_INSTRUCTIONS // len(code) - 1]
        code = _build(version, chosen)
    packed = b"".join(struct.pack("HBBI", op, jt, jf, k & _FULL) for op, jt, jf, k in code)
    return packed, len(chosen)


def attach(sock: socket.socket, code: bytes) -> None:
    """Attaches `code` to the SO_REUSEPORT group of `sock` (it replaces any earlier one).
    Raises OSError when the kernel refuses it."""
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HP", len(code) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def install(sock: socket.socket, networks: list[IPNetwork]) -> int:
    """Attaches the program for `networks` to `sock`'s group, with fewer networks each time
    the kernel has no memory for it. Returns how many it holds; raises OSError otherwise."""
    limit: int | None = None
    while True:
        code, held = program(sock.family, networks, limit)
        try:
            attach(sock, code)
        except OSError as error:
            if error.errno != errno.ENOMEM or held == 0:
                raise
            limit = held // 2
            continue
        return held
