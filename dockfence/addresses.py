"""IP networks as plain integers: parse, collapse, compare and print a million without building
a million `ipaddress` objects. Pure.

A network is a *block*: `start << 8 | prefixlen`, one Python int. Blocks of one family sort by
start address (then prefix length), so a sorted tuple of blocks is a canonical, cheaply compared
and hashed list. `ipaddress` is used only to phrase errors and for the rare spelling the fast
path does not take (a netmask, a scope id), so validation says exactly what it always said.
"""

from __future__ import annotations

import gc
import ipaddress
import operator
import socket
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import compress, repeat

BITS = {4: 32, 6: 128}
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def span(version: int, b: int) -> tuple[int, int]:
    """First and last address of a block."""
    start = b >> 8
    return start, start + (1 << (BITS[version] - (b & 0xFF))) - 1


def parse_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4/IPv6 address or CIDR; host bits must be clear so a typo is not silently widened."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or CIDR: {exc}") from None
        raise ValueError(f"host bits set; did you mean {loose}?") from None


def parse(text: str) -> tuple[int, int]:
    """(version, block) of an address or CIDR, validated as strictly as `parse_network`
    (ValueError with its words). inet_pton takes the common spellings at C speed; anything it
    refuses goes through `ipaddress`, which either accepts it the same way or says why not."""
    addr, slash, plen = text.partition("/")
    version = 6 if ":" in addr else 4
    bits = BITS[version]
    try:
        start = int.from_bytes(socket.inet_pton(_AF[version], addr), "big")
    except (OSError, ValueError):
        start = -1
    if start >= 0 and (not slash or (plen.isascii() and plen.isdigit()
                                     and (plen == "0" or plen[0] != "0") and int(plen) <= bits)):
        p = int(plen) if slash else bits
        if not start & ((1 << (bits - p)) - 1):
            return version, start << 8 | p
    if "%" in addr:  # ipaddress keeps a scope id; nft knows none: refuse, do not drop it
        raise ValueError("an address with a scope id (%...) cannot be in an allow-list")
    net = parse_network(text)  # raises with the message users know, or accepts another spelling
    return net.version, int(net.network_address) << 8 | net.prefixlen


@contextmanager
def no_gc() -> Iterator[None]:
    """Bulk work makes a million short-lived tuples, no cycles: without the cyclic collector
    scanning them again and again it runs several times faster."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class BadEntry(ValueError):
    """Entry `index` of a parse_many() batch is not an address or CIDR (str: why)."""

    def __init__(self, index: int, text: str, message: str) -> None:
        self.index, self.text = index, text
        super().__init__(message)


class _Slow(Exception):
    """Something in the batch needs parse()'s care (an error to phrase, an odd spelling)."""


def parse_many(texts: list[str]) -> tuple[list[int], list[int]]:
    """The (IPv4, IPv6) blocks of many entries, as parse() would make them one by one, but with
    the per-entry work done by C loops (map): a million entries in about a second. BadEntry
    says which entry is wrong, in parse()'s words."""
    try:
        with no_gc():
            return _parse_many_fast(texts)
    except _Slow:
        pass
    out: tuple[list[int], list[int]] = ([], [])
    for i, text in enumerate(texts):
        try:
            version, b = parse(text)
        except ValueError as exc:
            raise BadEntry(i, text, str(exc)) from None
        out[version == 6].append(b)
    return out


def _parse_many_fast(texts: list[str]) -> tuple[list[int], list[int]]:
    six = list(map(operator.contains, texts, repeat(":")))
    out = []
    for version, family in ((4, compress(texts, map(operator.not_, six))),
                            (6, compress(texts, six))):
        bits = BITS[version]
        parts = list(map(str.partition, family, repeat("/")))
        tails = list(map(operator.itemgetter(1, 2), parts))  # ("", "") or ("/", length)
        lengths = {}
        for tail in set(tails):  # a handful of distinct prefix lengths, checked once each
            slash, p = tail
            if not slash:
                lengths[tail] = bits
            elif p.isascii() and p.isdigit() and (p == "0" or p[0] != "0") and int(p) <= bits:
                lengths[tail] = int(p)
            else:
                raise _Slow
        try:
            packed = list(map(socket.inet_pton, repeat(_AF[version]),
                              map(operator.itemgetter(0), parts)))
        except (OSError, ValueError):
            raise _Slow from None
        starts = list(map(int.from_bytes, packed, repeat("big")))
        lens = list(map(lengths.__getitem__, tails))
        hostmask = {n: (1 << (bits - n)) - 1 for n in lengths.values()}
        if any(map(operator.and_, starts, map(hostmask.__getitem__, lens))):
            raise _Slow  # host bits set: parse() says which entry and what it meant
        out.append(list(map(operator.or_, map(operator.lshift, starts, repeat(8)), lens)))
    return out[0], out[1]


def of_network(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return int(net.network_address) << 8 | net.prefixlen


def to_network(version: int, b: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    return cls((b >> 8, b & 0xFF))


def show(version: int, b: int) -> str:
    """The network as people and nft write it: a bare address for a single host."""
    start, p = b >> 8, b & 0xFF
    if version == 6 and start >> 32 in (0, 0xFFFF):
        text = str(ipaddress.IPv6Address(start))  # inet_ntop would write these dotted
    else:
        text = socket.inet_ntop(_AF[version], start.to_bytes(BITS[version] // 8, "big"))
    return text if p == BITS[version] else f"{text}/{p}"


def show_all(version: int, blocks: Sequence[int]) -> list[str]:
    """show() of many blocks, the per-block work in C loops (map)."""
    if not blocks:
        return []
    bits = BITS[version]
    starts = list(map(operator.rshift, blocks, repeat(8)))
    if version == 6 and min(starts) < 1 << 48:  # the rare spellings show() writes specially
        return [show(version, b) for b in blocks]
    texts = map(socket.inet_ntop, repeat(_AF[version]),
                map(int.to_bytes, starts, repeat(bits // 8), repeat("big")))
    suffix = {p: "" if p == bits else f"/{p}" for p in range(bits + 1)}
    return list(map(operator.add, texts,
                    map(suffix.__getitem__, map(operator.and_, blocks, repeat(0xFF)))))


def collapse(version: int, blocks: Iterable[int]) -> tuple[int, ...]:
    """Merge overlapping and adjacent blocks into the fewest CIDRs, sorted (nftables interval
    sets reject overlaps); the same networks `ipaddress.collapse_addresses` gives. Large lists
    are usually disjoint already: one sort and one C-speed comparison find that, and the merge
    runs only when something touches."""
    bits = BITS[version]
    ordered = sorted(blocks)
    starts = list(map(operator.rshift, ordered, repeat(8)))
    size = {p: 1 << (bits - p) for p in range(bits + 1)}
    ends = list(map(operator.add, starts,
                    map(size.__getitem__, map(operator.and_, ordered, repeat(0xFF)))))
    if all(map(operator.gt, starts[1:], ends)):  # every block starts past the previous one's end
        return tuple(ordered)
    out: list[int] = []
    cur_start, cur_end = starts[0], ends[0]
    for s, e in zip(starts, ends, strict=True):
        if s <= cur_end:
            cur_end = max(cur_end, e)
        else:
            out += _cidrs(cur_start, cur_end, bits)
            cur_start, cur_end = s, e
    out += _cidrs(cur_start, cur_end, bits)
    return tuple(out)


def _cidrs(start: int, end: int, bits: int) -> list[int]:
    """The fewest blocks covering [start, end) (end exclusive)."""
    out = []
    while start < end:
        size = start & -start if start else 1 << bits
        while size > end - start:
            size >>= 1
        out.append(start << 8 | (bits - size.bit_length() + 1))
        start += size
    return out


def of_range(version: int, first: int, last: int) -> list[int]:
    return _cidrs(first, last + 1, BITS[version])


def contains(version: int, blocks: Sequence[int], address: int) -> bool:
    """Is the address inside one of these sorted, disjoint blocks?"""
    i = bisect_right(blocks, address << 8 | 0xFF) - 1
    return i >= 0 and span(version, blocks[i])[1] >= address


# --- exact set algebra on collapsed blocks (deny lists: `from` minus `except`) ----------------

def intervals(version: int, blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted, disjoint blocks as merged half-open [start, end) intervals."""
    bits = BITS[version]
    out: list[tuple[int, int]] = []
    for b in blocks:
        start = b >> 8
        end = start + (1 << (bits - (b & 0xFF)))
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _blocks(version: int, intervals: Iterable[tuple[int, int]]) -> tuple[int, ...]:
    bits = BITS[version]
    return tuple(b for s, e in intervals for b in _cidrs(s, e, bits))


def intersect(version: int, a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The addresses in both collapsed block lists, as collapsed blocks."""
    x, y = intervals(version, a), intervals(version, b)
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if lo < hi:
            out.append((lo, hi))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return _blocks(version, out)


def subtract(version: int, a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    """The addresses in `a` but not in `b` (both collapsed), as collapsed blocks."""
    if not a or not b:
        return tuple(a)
    y = intervals(version, b)
    out, j = [], 0
    for start, end in intervals(version, a):
        cur = start
        while j < len(y) and y[j][1] <= cur:
            j += 1
        k = j
        while k < len(y) and y[k][0] < end:
            if y[k][0] > cur:
                out.append((cur, y[k][0]))
            cur = max(cur, y[k][1])
            if y[k][1] > end:
                break
            k += 1
        if cur < end:
            out.append((cur, end))
    return _blocks(version, out)
