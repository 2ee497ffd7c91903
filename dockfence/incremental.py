"""Element-level updates: what changes in the table when only Docker's inventory changed. Pure.

When containers come and go, the policy's shape stays: the same chains, the same allow-list
sets. What moves is which host ports (and routed container addresses) jump to which allow-list,
and which bridges exist. `element_update()` turns two rulesets into the few element additions
and deletions between them, for the kernel (netlink ops), and for the record the new content
of each set or map they touch (nft commands that `restore` runs after loading the table). It
answers None when the change needs a full table: the shape differs (an allow-list no chain
holds yet, a setting, the host rules, the first port published on a specific host address or
the last one gone, which add or remove the maps keyed on address and port).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from . import addresses
from .backends import netlink as nl
from .backends.nftables import (
    ALLOW_ANY,
    BRIDGE_SET,
    FAMILY,
    STAMP_SET,
    TABLE,
    addr_map,
    address_sets,
    chain_order,
    comment,
    direct_map,
    direct_map_key,
    gate_map_key,
    gate_name,
    has_addressed,
    same_list,
    stamp_ops,
)
from .model import PROTOS, DirectGate, Gate, Ruleset, Sources, find_gate
from .stamp import Stamp

Chains = list[tuple[Sources, str]]


@dataclass(frozen=True)
class ElementUpdate:
    ops: list[nl.Op]  # for the kernel, in order: deletions first
    text: str  # for the record: nft commands giving each changed set or map its new content

    def __bool__(self) -> bool:
        return bool(self.ops)


def verdict_of(sources: Sources, chains: Chains) -> str | None:
    """The verdict render() gives an allow-list, or None when no chain holds it."""
    if sources.any and not sources.denies:  # `any except ...` has a chain of its own
        return f"jump {ALLOW_ANY}"  # refuses bans first
    if sources.nobody:
        return "drop"
    return next((f"jump {name}" for known, name in chains if same_list(known, sources)), None)


# key text (as nft writes it), key bytes (start, last), comment, sources
_Entry = tuple[str, bytes, bytes, str, Sources]


def _gate_entries(gates: Iterable[Gate], proto: str) -> dict[str, _Entry]:
    out = {}
    for g in gates:
        if g.proto == proto and g.host is None:
            key = str(g.ports)
            out[key] = (key, nl.port_key(g.ports.first), nl.port_key(g.ports.last),
                        comment(g.label, g.origin)[1:-1], g.sources)
    return out


def _addr_entries(gates: Iterable[Gate], version: int, proto: str) -> dict[str, _Entry]:
    out = {}
    for g in gates:
        if g.proto == proto and g.host is not None and g.host.version == version:
            key = gate_map_key(g)[1]
            raw = nl.addr_port_key(g.host, g.ports.first)
            out[key] = (key, raw, raw, comment(g.label, g.origin)[1:-1], g.sources)
    return out


def _direct_entries(gates: Iterable[DirectGate], version: int, proto: str) -> dict[str, _Entry]:
    out = {}
    for d in gates:
        if d.proto == proto and d.address.version == version:
            key = direct_map_key(d)[1]
            raw = nl.addr_port_key(d.address, d.port)
            out[key] = (key, raw, raw, comment(d.label, d.origin)[1:-1], d.sources)
    return out


class _Builder:
    def __init__(self, chains: Chains, rendered: dict[str, dict[str, _Entry]]) -> None:
        self.chains = chains
        # what the last full render wrote, map by map: its elements go to chains of their own
        self.rendered = rendered
        self.deletes: list[nl.Op] = []
        self.adds: list[nl.Op] = []
        # name -> nft commands that give the set or map its whole new content. The record keeps
        # these rather than the element deltas: nft 1.0.6 silently ignores `delete element` of
        # an interval element created earlier in the same transaction (as restore's would be),
        # while flush + add works there.
        self.snapshots: dict[str, str] = {}

    def _elements(self, interval: bool, first: bytes, last: bytes, verdict: str | None,
                  text: str | None) -> tuple[nl.Element, ...]:
        if interval:
            return nl.interval(first, last, verdict, text)
        return (nl.Element(first, verdict, text),)

    def _snapshot(self, kind: str, name: str, elements: list[str]) -> None:
        text = f"flush {kind} {FAMILY} {TABLE} {name}\n"
        if elements:
            text += f"add element {FAMILY} {TABLE} {name} {{ {', '.join(elements)} }}\n"
        self.snapshots[name] = text

    def map_diff(self, name: str, interval: bool, old: dict[str, _Entry],
                 new: dict[str, _Entry]) -> bool:
        """Queue the changes of one verdict map; False when one needs a chain that is missing."""
        changed = False
        content = []
        for key in sorted(old.keys() | new.keys()):
            before, after = old.get(key), new.get(key)
            v_before = verdict_of(before[4], self.chains) if before else None
            v_after = verdict_of(after[4], self.chains) if after else None
            if after is not None and v_after is None:
                return False
            if before is not None and after is not None and \
                    (before[3], v_before) == (after[3], v_after):
                # unchanged: the record keeps the verdict the kernel holds for it, the port's
                # own chain when the last full render wrote the element
                full = self.rendered.get(name, {}).get(key)
                kept = f"goto {gate_name(name, key)}" if full is not None and full[3] == \
                    after[3] and same_list(full[4], after[4]) else v_after
                content.append(f'{key} comment "{after[3]}" : {kept}')
                continue
            if after is not None:
                content.append(f'{key} comment "{after[3]}" : {v_after}')
            changed = True
            if before is not None:
                self.deletes.append(nl.Op(False, name, self._elements(
                    interval, before[1], before[2], None, None)))
            if after is not None:
                self.adds.append(nl.Op(True, name, self._elements(
                    interval, after[1], after[2], v_after, after[3])))
        if changed:
            self._snapshot("map", name, content)
        return True

    def bridges(self, old: tuple[str, ...], new: tuple[str, ...]) -> bool:
        gone, came = set(old) - set(new), set(new) - set(old)
        if any(n.endswith("*") for n in gone | came):
            return False  # the patterns are part of the table's shape
        for names, add in ((sorted(gone), False), (sorted(came), True)):
            for n in names:
                key = nl.ifname_key(n)
                (self.adds if add else self.deletes).append(
                    nl.Op(add, BRIDGE_SET, nl.interval(key, key)))
        if gone or came:
            self._snapshot("set", BRIDGE_SET, [f'"{n}"' for n in new])
        return True

    def set_diff(self, name: str, version: int, old: tuple[int, ...],
                 new: tuple[int, ...]) -> None:
        """Queue the changes of one address set: each block is an interval element of its own
        (render() writes collapsed blocks and nft keeps them apart)."""
        for blocks, add in ((sorted(set(old).difference(new)), False),
                            (sorted(set(new).difference(old)), True)):
            (self.adds if add else self.deletes).extend(
                nl.block_ops(add, name, addresses.BITS[version], blocks))
        self._snapshot("set", name, addresses.show_all(version, new))

    def update(self, stamp: Stamp | None) -> ElementUpdate:
        ops = self.deletes + self.adds
        if ops and stamp is not None:
            # the stamp describes the table it sits in: replaced in the same transaction
            ops += stamp_ops(stamp)
            self._snapshot("set", STAMP_SET, [f"1 comment {comment(stamp.text())}"])
        return ElementUpdate(ops, "".join(self.snapshots.values()) if ops else "")


def _shape(rs: Ruleset) -> tuple[object, ...]:
    return (rs.unknown_published, rs.unknown_origin, rs.outside, rs.host, has_addressed(rs))


def _rendered(rs: Ruleset | None) -> dict[str, dict[str, _Entry]]:
    if rs is None:
        return {}
    out = {f"{proto}_ports": _gate_entries(rs.container_gates, proto) for proto in PROTOS}
    for version in (4, 6):
        for proto in PROTOS:
            out[direct_map(version, proto)] = _direct_entries(rs.direct, version, proto)
            out[addr_map(version, proto)] = _addr_entries(rs.container_gates, version, proto)
    return out


def element_update(old: Ruleset, new: Ruleset, chains: Chains,
                   stamp: Stamp | None = None, rendered: Ruleset | None = None
                   ) -> ElementUpdate | None:
    """The element changes that turn the table rendered from `old` into one that decides
    what `new` decides (with `stamp`, when the table carries one), or None when only a full
    table will do. Elements it adds jump to their allow-list's shared chain; `rendered` is the
    ruleset of the last full render, whose elements keep their ports' own chains."""
    if _shape(old) != _shape(new):
        return None
    order = chain_order(new)  # the chains a full render of `new` would have, in name order
    if len(order) != len(chains) or not all(
            same_list(a, b) for a, (b, _) in zip(order, chains, strict=True)):
        return None
    b = _Builder(chains, _rendered(rendered))
    try:
        for proto in PROTOS:
            if not b.map_diff(f"{proto}_ports", True, _gate_entries(old.container_gates, proto),
                              _gate_entries(new.container_gates, proto)):
                return None
        for version in (4, 6) if has_addressed(new) else ():  # the maps exist (same shape)
            for proto in PROTOS:
                if not b.map_diff(addr_map(version, proto), False,
                                  _addr_entries(old.container_gates, version, proto),
                                  _addr_entries(new.container_gates, version, proto)):
                    return None
        for version in (4, 6):
            for proto in PROTOS:
                if not b.map_diff(direct_map(version, proto), False,
                                  _direct_entries(old.direct, version, proto),
                                  _direct_entries(new.direct, version, proto)):
                    return None
        if not b.bridges(old.docker_bridges, new.docker_bridges):
            return None
    except ValueError:
        return None  # e.g. a range up to port 65535: not expressible element by element
    return b.update(stamp)


def list_update(old: Ruleset, new: Ruleset, stamp: Stamp | None = None) -> ElementUpdate | None:
    """The element changes that give the address sets of the table rendered from `old` what
    `new` holds, when lists changed their contents and nothing else (a downloaded list was
    refreshed); None when the table's structure changes too (a list gains its first IPv6
    entry, two lists become equal)."""
    shape, before = address_sets(old)
    new_shape, after = address_sets(new)
    if shape != new_shape or before.keys() != after.keys():
        return None
    b = _Builder([], {})
    try:
        for name, (version, blocks) in sorted(after.items()):
            if before[name][1] != blocks:
                b.set_diff(name, version, before[name][1], blocks)
    except ValueError:
        return None  # a block reaching the last address: not expressible element by element
    return b.update(stamp)
def closed_meanwhile(old: Ruleset, new: Ruleset) -> Ruleset | None:
    """What the table should decide while a full apply that element updates cannot replace is
    on its way, or None when `old` is safe meanwhile. A port newly published on one host
    address is decided by the old table's gate for the port on every address (a bare
    host-port rule, a container on every address of the other family) until its own gate
    lands; where that gate admits someone the new one does not, it refuses everyone for the
    moment: the firewall fails closed, for the port on every address, for a second or so.
    Without such a gate, the new address was already the port no gate names
    (containers.default)."""
    keyed = {(g.proto, g.host, g.ports.first) for g in old.container_gates if g.host}
    risky: set[int] = set()
    for g in new.container_gates:
        if g.host is None or (g.proto, g.host, g.ports.first) in keyed:
            continue
        now = find_gate(old.container_gates, g.proto, g.ports.first, g.host)
        if now is None or _admits_no_more(now.sources, g.sources):
            continue
        risky.add(next(i for i, o in enumerate(old.container_gates) if o is now))
    if not risky:
        return None
    return replace(old, container_gates=tuple(
        replace(o, sources=Sources(), origin=f"closed until the new rules are in place "
                f"({o.origin})"[:100]) if i in risky else o
        for i, o in enumerate(old.container_gates)))


def _admits_no_more(a: Sources, b: Sources) -> bool:
    """Does `b` admit everyone `a` admits? (False when unsure: deny lists.)"""
    if a.nobody or (b.any and not b.denies) or same_list(a, b):
        return True
    if a.any or a.denies or b.denies:
        return False
    return not (addresses.subtract(4, a.v4, b.v4) or addresses.subtract(6, a.v6, b.v6))
