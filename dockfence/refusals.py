"""Refused attempts, in the user's terms: who tried, what they asked for, which policy line said
no. The kernel reports refusals through NFLOG (see backends.nftables.refuse, rate-limited
there); whoever reads the group (`dockfence watch`, or `dockfence log --follow` when no watch
runs) prints them, summarises floods, and keeps a short history for `dockfence log`.

Memory stays bounded whatever arrives: a flood is counted, not stored, and the distinct sources
of one summary window are remembered up to SOURCES_CAP."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import counters, discovery
from .backends import nftables as nft
from .errors import DockfenceError, OperationalError
from .inventory import Inventory
from .model import Ruleset
from .nflog import Packet

WINDOW = 10.0  # seconds per summary window
LINES_PER_WINDOW = 20  # attempts printed one by one per window; the rest are summarised
SOURCES_CAP = 10_000
RECENT_CAP = 4096  # attempts remembered to recognise retries
HISTORY_BYTES = 1 << 20  # per history file; one older file is kept


def _stamp(when: float, stamped: bool) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S ", time.localtime(when)) if stamped else ""


@dataclass(frozen=True)
class Attempt:
    time: float
    source: str  # address
    sport: int | None
    proto: str
    asked: str  # "django 8080/tcp (host port 8081)", "host port 22/tcp", ...
    refused_by: str  # the policy line (or default) that refused it

    def line(self, stamped: bool = True) -> str:
        src = f"[{self.source}]" if ":" in self.source else self.source
        port = f":{self.sport}" if self.sport is not None else ""
        return (_stamp(self.time, stamped)
                + f"refused {src}{port} -> {self.asked}  ({self.refused_by})")


@dataclass(frozen=True)
class Summary:
    time: float
    more: int  # attempts seen but not printed one by one
    sources: int  # distinct sources among them (capped at SOURCES_CAP)
    seconds: float
    counted: int | None = None  # what the kernel's counters refused in the window (all of it)

    def line(self, stamped: bool = True) -> str:
        cap = "at least " if self.sources >= SOURCES_CAP else ""
        total = (f"; the kernel refused {self.counted:,} packets in all" if self.counted
                 else "")
        return (_stamp(self.time, stamped) + f"refused: and {self.more:,} more from "
                f"{cap}{self.sources:,} source(s) in the last {self.seconds:.0f} s (reported "
                f"at most {nft.LOG_RATE.split()[0]}{total})")


Record = Attempt | Summary


class Describer:
    """Maps a refusal (the counter named in its log prefix, and its addresses) to the user's
    terms, from the live rules and Docker's containers."""

    def __init__(self, rules: Ruleset | None, inv: Inventory | None) -> None:
        self.names: dict[str, tuple[str, str]] = {}  # counter -> (asked, refused by)
        self.containers: dict[str, str] = {}  # address -> container name
        self.unknown_by = self.host_by = ""
        self.rules = rules
        if inv is not None:
            self.containers = {a: c.name for c in inv.containers for a in c.addresses}
        if rules is None:
            return
        self.unknown_by = f"{nft.TAG_UNKNOWN} | {rules.unknown_origin}"
        if rules.host is not None:
            self.host_by = f"{nft.TAG_HOST} | {rules.host.origin}"
        for g in rules.container_gates:
            self.names[f"{nft.gate_stem(g)}_refused"] = (f"{g.label} (host port {g.where()})",
                                                         g.origin)
        for g in rules.host.gates if rules.host else ():
            self.names[f"{nft.host_stem(g)}_refused"] = (f"host port {g.ports}/{g.proto}",
                                                         g.origin)
        for d in rules.direct:
            self.names[f"{nft.direct_stem(d)}_refused"] = (
                f"{d.label} on {d.address} (direct routing)", d.origin)

    @staticmethod
    def live() -> Describer:
        """From the live table and Docker; whatever is unavailable is described by address."""
        from .engine import trusted_live  # engine imports much; only the readers need it

        try:
            rules = trusted_live()
        except DockfenceError:
            rules = None
        try:
            inv = discovery.inventory()
        except DockfenceError:
            inv = None
        return Describer(rules, inv)

    def knows(self, counter: str) -> bool:
        return counter in self.names or counter in (nft.COUNTER_UNKNOWN, nft.COUNTER_HOST,
                                                    nft.COUNTER_DIRECT)

    def describe(self, p: Packet) -> Attempt:
        counter, _, why = p.prefix.removeprefix(nft.LOG_PREFIX).partition(" ")
        port = f"{p.dport}/{p.proto}" if p.dport is not None else p.proto
        who = self.containers.get(p.dst)
        if counter in self.names:
            asked, by = self.names[counter]
        elif counter == nft.COUNTER_UNKNOWN:  # after DNAT: the container's own address
            asked = f"{who or p.dst} {port} (published after the last apply)"
            by = self.unknown_by or nft.TAG_UNKNOWN
        elif counter == nft.COUNTER_HOST:
            asked = f"host port {port}"
            by = self.host_by or nft.TAG_HOST
        elif counter == nft.COUNTER_DIRECT:
            asked = f"{who or 'container'} {port} on {p.dst} (direct routing)"
            by = f"{nft.TAG_DIRECT}: no published port or policy rule allows it"
        else:
            asked, by = f"{who or p.dst} {port}", counter or "unknown rule"
        if why == nft.TAG_BANNED or counter == nft.COUNTER_BANNED:
            by = "banned (dockfence ban)"  # refused before any allow-list was asked
        return Attempt(p.time, p.src, p.sport, p.proto, asked, by)


class Summariser:
    """Lets the first LINES_PER_WINDOW attempts of each window through one by one and counts
    the rest; bounded memory whatever the flood."""

    def __init__(self, now: float | None = None) -> None:
        self.start = time.time() if now is None else now
        self.shown = 0
        self.more = 0
        self.sources: set[str] = set()
        # attempts already reported: a client's retransmitted SYNs are the same attempt
        self.recent: OrderedDict[tuple[str, int | None, str, str], float] = OrderedDict()

    def offer(self, a: Attempt) -> bool:
        """True if the attempt should be printed on its own."""
        key = (a.source, a.sport, a.proto, a.asked)
        seen = self.recent.pop(key, None)
        self.recent[key] = a.time
        if len(self.recent) > RECENT_CAP:
            self.recent.popitem(last=False)
        if seen is not None and a.time - seen < WINDOW:
            return False  # a retry of an attempt already reported (the counters count it)
        if self.shown < LINES_PER_WINDOW:
            self.shown += 1
            return True
        self.more += 1
        if len(self.sources) < SOURCES_CAP:
            self.sources.add(a.source)
        return False

    def tick(self, now: float | None = None) -> Summary | None:
        """At the end of a window: its summary (if anything was held back), and a new window."""
        now = time.time() if now is None else now
        if now - self.start < WINDOW:
            return None
        out = Summary(now, self.more, len(self.sources), now - self.start) if self.more else None
        self.start, self.shown, self.more = now, 0, 0
        self.sources = set()
        return out


# --- history: what `dockfence log` shows ---------------------------------------------------

def history_path() -> Path:
    netns = os.stat("/proc/self/ns/net").st_ino  # one history per network namespace
    return Path(f"/run/dockfence/refused.{netns}.jsonl")


def as_json(r: Record) -> dict[str, object]:
    return {"kind": "attempt" if isinstance(r, Attempt) else "summary", **asdict(r)}


def from_json(d: dict[str, object]) -> Record | None:
    kind = d.pop("kind", None)
    try:
        return Attempt(**d) if kind == "attempt" else Summary(**d)  # type: ignore[arg-type]
    except TypeError:
        return None


class History:
    """Append-only JSON lines, rotated at HISTORY_BYTES (one older file kept)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or history_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, r: Record) -> None:
        try:
            if self.path.stat().st_size > HISTORY_BYTES:
                self.path.replace(self.path.with_suffix(".jsonl.1"))
        except FileNotFoundError:
            pass
        # who knocked is nobody else's business: readable by root only, like the records
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "a") as fh:
            fh.write(json.dumps(as_json(r)) + "\n")


def read_history(path: Path | None = None) -> list[Record]:
    path = path or history_path()
    out = []
    for p in (path.with_suffix(".jsonl.1"), path):
        try:
            text = p.read_text()
        except FileNotFoundError:
            continue
        out += _records(text)
    return out


def _records(text: str) -> Iterator[Record]:
    """The records of complete JSON lines; a torn or foreign line is skipped."""
    for line in text.splitlines():
        try:
            r = from_json(json.loads(line))
        except ValueError:
            continue
        if r is not None:
            yield r


def tail_history(stop: Callable[[], bool], path: Path | None = None) -> Iterator[Record]:
    """New records as the listener appends them (follows rotation)."""
    path = path or history_path()
    pos = path.stat().st_size if path.exists() else 0
    while not stop():
        size = path.stat().st_size if path.exists() else 0
        if size < pos:  # rotated
            pos = 0
        if size > pos:
            with path.open() as fh:
                fh.seek(pos)
                chunk = fh.read()
            complete = chunk[:chunk.rfind("\n") + 1]
            pos += len(complete.encode())
            yield from _records(complete)
        else:
            time.sleep(0.2)


# --- the listener ----------------------------------------------------------------------------

def _refused_total(rules: Ruleset | None) -> int | None:
    """Every new connection the kernel refused since the last apply (one small listing)."""
    counts = nft.live_counters()
    if counts is None or rules is None:
        return None
    return (sum(v for k, v in counts.items() if k.endswith("_refused"))
            + sum(c.refused for name, c in counters.defaults(counts, rules).items()
                  if name != "revoked"))


def recorded() -> bool:
    """Whether someone (watch, log --follow) reads the refusals now: the group is taken."""
    from .nflog import GroupBusy, Subscriber

    try:
        Subscriber(nft.LOG_GROUP).close()
    except GroupBusy:
        return True
    except (OperationalError, OSError):
        return True  # cannot tell (not root): do not claim nobody does
    return False


def listen(emit: Callable[[Record], None], stop: Callable[[], bool],
           history: History | None = None,
           on_attempt: Callable[[Attempt], None] | None = None) -> None:
    """Read refusals from the kernel until stop(): each attempt or window summary goes to
    emit() and the history. Raises nflog.GroupBusy if another process reads them already."""
    from .nflog import Subscriber

    history = history or History()
    generation = nft.live_generation()
    describer = Describer.live()
    refused_before, counted_in = _refused_total(describer.rules), generation
    checked = built = time.monotonic()
    window = Summariser()
    with Subscriber(nft.LOG_GROUP) as sub:
        while not stop():
            packets = sub.read(timeout=0.5)
            unknown = any(not describer.knows(p.prefix.removeprefix(nft.LOG_PREFIX))
                          for p in packets)
            now = time.monotonic()
            if packets and (now - checked > 5 or (unknown and now - checked > 0.5)):
                # Re-read the rules only when an apply replaced the table (or, for containers
                # that moved, once a minute), however many refusals arrive.
                checked = now
                current = nft.live_generation()
                if current != generation or now - built > 60:
                    generation, describer, built = current, Describer.live(), now
            for p in packets:
                if not p.prefix.startswith(nft.LOG_PREFIX):
                    continue
                a = describer.describe(p)
                if on_attempt is not None:
                    on_attempt(a)
                if window.offer(a):
                    emit(a)
                    history.append(a)
            start = window.start
            summary = window.tick()
            if window.start == start:
                continue
            # A new window. Beyond the kernel's log limit only the counters saw the flood: the
            # window's count is what they gained (all they hold if an apply replaced the table).
            current = nft.live_generation()
            if current != generation:
                generation, describer, built = current, Describer.live(), time.monotonic()
            total = _refused_total(describer.rules)
            if summary is not None:
                if total is not None:
                    base = refused_before if counted_in == current and refused_before else 0
                    summary = replace(summary, counted=total - base if total >= base else total)
                emit(summary)
                history.append(summary)
            refused_before, counted_in = total, current
