"""Banned addresses: refused by every allow-list (`from: any` too) until they expire.

The kernel's timeout sets (`bans_v4`, `bans_v6` in dockfence's table) enforce and expire them;
a small record in the state directory keeps them across re-applies (which rebuild the table)
and reboots (`dockfence restore`). Parsing and bookkeeping here are pure; `ban`, `unban` and
`current` act on the kernel through the nftables backend.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import itertools
import json
import math
import operator
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import addresses
from .errors import OperationalError, UsageError
from .model import IPNetwork
from .statedir import state_dir

_DURATION_RE = re.compile(r"^(\d{1,9})([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_BANS = 100_000
RECORD = "bans.json"


def parse_duration(text: str) -> int | None:
    """Seconds from `90`, `90s`, `10m`, `1h`, `2d`, `1w`; None (for ever) from `-1` (fail2ban's
    permanent bantime) or `forever`."""
    value = text.strip().lower()
    if value in ("-1", "forever", "permanent"):
        return None
    m = _DURATION_RE.match(value)
    if not m or int(m[1]) == 0:
        raise UsageError(f"not a duration: {text!r} (write 90, 90s, 10m, 1h, 2d, 1w or forever)")
    return int(m[1]) * _UNITS[m[2]]


def parse_target(text: str) -> IPNetwork:
    """An address or CIDR to ban; host bits must be clear, and never loopback or `any`."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise UsageError(f"not an IP address or CIDR: {text!r} ({exc})") from None
    if net.is_loopback or net.network_address.is_unspecified or net.is_multicast:
        raise UsageError(f"refusing to ban {net}: loopback, unspecified or multicast")
    return net


@dataclass(frozen=True)
class Ban:
    """One recorded ban."""

    network: str  # as shown: 203.0.113.5 or 203.0.113.0/24
    expires: float | None  # epoch seconds; None: until unbanned
    reason: str = ""

    def remaining(self, now: float) -> int | None:
        return None if self.expires is None else max(0, int(self.expires - now))


def load(path: Path | None = None, now: float | None = None) -> list[Ban]:
    """The recorded bans that have not expired. A damaged record is an error, never an empty
    list: forgetting bans silently would let the banned back in."""
    path = path or state_dir() / RECORD
    now = time.time() if now is None else now
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OperationalError(f"{path}: cannot read the ban record: {exc}") from None
    try:
        listed = raw["bans"]
        shown = [addresses.show(version, block)
                 for version, block in _blocks([str(b["network"]) for b in listed])]
        bans = [Ban(network, None if b.get("expires") is None else float(b["expires"]),
                    str(b.get("reason", ""))[:200]) for network, b in zip(shown, listed,
                                                                          strict=True)]
    except (KeyError, TypeError, ValueError) as exc:
        raise OperationalError(f"{path}: damaged ban record ({exc})") from None
    return [b for b in bans if b.expires is None or b.expires > now]


def save(bans: Iterable[Ban], path: Path | None = None) -> None:
    """Write the record atomically (a crash leaves the old one or the new one)."""
    path = path or state_dir() / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # one line: json's indent= takes its pure-Python encoder (seconds at 100,000 bans)
    data = json.dumps({"bans": [{"network": b.network, "expires": b.expires, "reason": b.reason}
                                for b in bans]})
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OperationalError(f"cannot write the ban record {path}: {exc.strerror}") from None


def with_ban(bans: list[Ban], ban: Ban) -> list[Ban]:
    out = [b for b in bans if b.network != ban.network] + [ban]
    if len(out) > MAX_BANS:
        raise OperationalError(f"more than {MAX_BANS:,} bans: ban a network instead")
    return out


def without(bans: list[Ban], network: str) -> list[Ban]:
    return [b for b in bans if b.network != network]


def pieces(bans: Iterable[Ban], now: float) -> dict[int, list[tuple[int, int | None]]]:
    """What the kernel's ban sets hold for these bans, by IP version: disjoint blocks (see
    dockfence.addresses), each with the seconds left of the longest ban covering it (None:
    for ever). Bans may overlap (a /24 banned by hand, one of its hosts by fail2ban), but an
    interval set refuses overlapping elements, and that host must stay banned if the /24
    expires first. A ban that does not overlap another is one block, its network."""
    spans: dict[int, list[tuple[int, int, float]]] = {4: [], 6: []}
    live = [b for b in bans if b.expires is None or b.expires > now]
    for b, (version, block) in zip(live, _blocks([b.network for b in live]), strict=True):
        expires = math.inf if b.expires is None else b.expires
        start, last = addresses.span(version, block)
        # the very last address cannot be an interval's start (it has no end element)
        # nor a packet's source: 255.255.255.255 is the limited broadcast
        end = min(last + 1, (1 << addresses.BITS[version]) - 1)
        if start < end:
            spans[version].append((start, end, expires))
    out: dict[int, list[tuple[int, int | None]]] = {4: [], 6: []}
    for version, items in spans.items():
        items.sort()
        # fail2ban's bans are hosts that rarely overlap: then no sweep is needed
        disjoint = all(map(operator.le, map(operator.itemgetter(1), items),
                           map(operator.itemgetter(0), items[1:])))
        for start, end, expires in _joined(items) if disjoint else _swept(items):
            left = None if expires == math.inf else max(1, int(expires - now))
            out[version] += [(block, left) for block in addresses.of_range(version, start, end - 1)]
    return out


def _blocks(networks: list[str]) -> list[tuple[int, int]]:
    """(version, block) of each network, in order; ValueError for one that is not a network.
    The parsing in C loops (addresses.parse_many): a ban record may hold 100,000."""
    six = [":" in n for n in networks]
    try:
        v4, v6 = addresses.parse_many(networks)
    except addresses.BadEntry as exc:
        raise ValueError(f"{exc.text!r}: {exc}") from None
    fours, sixes = iter(v4), iter(v6)
    return [(6, next(sixes)) if is6 else (4, next(fours)) for is6 in six]


def _joined(items: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Sorted disjoint spans, with neighbours that touch and expire together joined."""
    merged: list[tuple[int, int, float]] = []
    for start, end, expires in items:
        if merged and merged[-1][1] == start and merged[-1][2] == expires:
            merged[-1] = (merged[-1][0], end, expires)
        else:
            merged.append((start, end, expires))
    return merged


def _swept(items: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """Sorted spans that may overlap, cut into disjoint ones that each expire with the longest
    span covering them; neighbours that touch and expire together joined."""
    points = sorted({p for s, e, _ in items for p in (s, e)})
    cut: list[tuple[int, int, float]] = []
    active: list[tuple[float, int]] = []  # (-expires, end): the longest on top
    i = 0
    for a, b in itertools.pairwise(points):
        while i < len(items) and items[i][0] <= a:
            heapq.heappush(active, (-items[i][2], items[i][1]))
            i += 1
        while active and active[0][1] <= a:
            heapq.heappop(active)  # ended; others that ended go when they reach the top
        if active:
            cut.append((a, b, -active[0][0]))
    return _joined(cut)


Held = dict[int, tuple[list[int], list[tuple[int, int]]]]


def held(live: Iterable[str]) -> Held:
    """The kernel's ban set elements as listed, by IP version: merged [start, end) intervals
    and their starts (for covered()). Parsed once, however many bans are checked."""
    blocks: dict[int, list[int]] = {4: [], 6: []}
    for text in live:
        try:
            version, block = addresses.parse(text)
        except ValueError:
            continue
        blocks[version].append(block)
    out: Held = {}
    for version, found in blocks.items():
        merged = addresses.intervals(version, addresses.collapse(version, found)) if found else []
        out[version] = ([start for start, _ in merged], merged)
    return out


def covered(network: str, live: Held) -> bool:
    """Is every address of `network` in the kernel's ban sets (held())?"""
    net = ipaddress.ip_network(network)
    start = int(net.network_address)
    starts, merged = live[net.version]
    i = bisect.bisect_right(starts, start) - 1
    return i >= 0 and merged[i][1] >= start + net.num_addresses
