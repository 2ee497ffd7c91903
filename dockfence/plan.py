"""Diff a live ruleset against a desired one, in words a person reads. Pure."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import filterfalse
from typing import Literal

from . import addresses
from .model import Gate, Ruleset, Sources

ChangeKind = Literal["add", "remove", "change", "keep"]


@dataclass(frozen=True)
class Change:
    """One line of a plan: what is added, removed, changed or kept."""

    kind: ChangeKind
    subject: str  # "published port tcp 8081 (django 8080/tcp)"
    before: str | None
    after: str | None
    origin: str = ""
    added: list[str] = field(default_factory=list)  # sources the change lets in
    removed: list[str] = field(default_factory=list)  # sources it shuts out

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# key -> (label, what is decided, origin); a decision is Sources or a setting's words
Facts = dict[tuple[str, str], tuple[str, Sources | str, str]]


def _gate_facts(prefix: str, gates: tuple[Gate, ...]) -> Facts:
    return {(prefix, f"{g.proto} {g.where()}"): (g.label, g.sources, g.origin) for g in gates}


def facts(rs: Ruleset | None) -> Facts:
    """Everything a ruleset decides, keyed so that the same decision compares equal."""
    if rs is None:
        return {}
    out = _gate_facts("published port", rs.container_gates)
    for d in rs.direct:
        where = f"[{d.address}]" if d.address.version == 6 else str(d.address)
        out[("direct route to", f"{where}:{d.port}/{d.proto}")] = (d.label, d.sources, d.origin)
    out[("setting", "published ports no rule names")] = (
        "new or unlisted published ports", str(Sources.for_verdict(rs.unknown_published)),
        rs.unknown_origin)
    out[("setting", "outside interfaces")] = (
        "filtered interfaces", ", ".join(rs.outside) if rs.outside else
        "all but loopback and Docker bridges", "")
    out[("setting", "loopback addresses from outside")] = (
        "packets from outside to 127.0.0.0/8 and ::1",
        "dropped" if rs.loopback_guard else "not dropped", "")
    out[("setting", "docker bridges")] = ("Docker bridges", ", ".join(sorted(rs.docker_bridges))
                                          or "none", "")
    if rs.host is not None:
        out.update(_gate_facts("host port", rs.host.gates))
        out[("setting", "other host ports")] = (
            "host ports no rule names", str(Sources.for_verdict(rs.host.default)),
            rs.host.origin)
    else:
        out[("setting", "host ports")] = ("host's own ports", "not managed by dockfence", "")
    return out


def _delta(before: Sources | str, after: Sources | str,
           memo: dict[tuple[int, ...], tuple[list[str], list[str]]]) -> tuple[list[str],
                                                                              list[str]]:
    if not isinstance(before, Sources) or not isinstance(after, Sources) \
            or before.any or after.any:
        return [], []
    # one list behind many ports is compared once
    key = (id(before.v4), id(before.v6), id(after.v4), id(after.v6), id(before.deny_v4),
           id(before.deny_v6), id(after.deny_v4), id(after.deny_v6))
    if key not in memo:
        if before.denies or after.denies:  # address by address: the blocks are cut anew
            b, a = _admitted(before), _admitted(after)
            memo[key] = ([t for v, x, y in ((4, a.v4, b.v4), (6, a.v6, b.v6))
                          for t in addresses.show_all(v, addresses.subtract(v, x, y))],
                         [t for v, x, y in ((4, b.v4, a.v4), (6, b.v6, a.v6))
                          for t in addresses.show_all(v, addresses.subtract(v, x, y))])
        else:
            memo[key] = _compare(before, after)
    return memo[key]


def _admitted(s: Sources) -> Sources:
    """What a (not `any`) allow-list admits, its `except` taken out."""
    if not s.denies:
        return s
    return Sources(v4=addresses.subtract(4, s.v4, s.deny_v4),
                   v6=addresses.subtract(6, s.v6, s.deny_v6))


def _compare(before: Sources, after: Sources) -> tuple[list[str], list[str]]:
    """As sets of integer blocks: a million-entry list diffs in C loops, the results stay in
    order, and only the differences are ever turned into text."""
    added: list[str] = []
    removed: list[str] = []
    for version, b, a in ((4, before.v4, after.v4), (6, before.v6, after.v6)):
        if a != b:
            added += addresses.show_all(version, list(filterfalse(set(b).__contains__, a)))
            removed += addresses.show_all(version, list(filterfalse(set(a).__contains__, b)))
    return added, removed


def diff(live: Ruleset | None, desired: Ruleset | None) -> list[Change]:
    before, after = facts(live), facts(desired)
    changes: list[Change] = []
    memo: dict[tuple[int, ...], tuple[list[str], list[str]]] = {}
    for key in sorted(before.keys() | after.keys()):
        subject = f"{key[0]} {key[1]}" if key[0] != "setting" else key[1]
        b, a = before.get(key), after.get(key)
        label = (a or b or ("",))[0]
        if key[0] != "setting":
            subject += f" ({label})"
        if b is not None and a is not None:
            kind: ChangeKind = "keep" if b[:2] == a[:2] else "change"
            added, removed = _delta(b[1], a[1], memo) if kind == "change" else ([], [])
            changes.append(Change(kind, subject, str(b[1]), str(a[1]), a[2], added, removed))
        elif a is not None:
            changes.append(Change("add", subject, None, str(a[1]), a[2]))
        elif b is not None:
            changes.append(Change("remove", subject, str(b[1]), None, b[2]))
    return changes
