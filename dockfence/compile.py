"""Policy + inventory -> ruleset. Pure: the same inputs always give the same ruleset."""

from __future__ import annotations

import ipaddress
import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import OperationalError
from .inventory import Binding, Container, Inventory, bridge_names, covered_by_patterns
from .labels import label_rules
from .model import (
    PROTOS,
    DirectGate,
    Gate,
    HostRules,
    IPAddress,
    PortRange,
    Proto,
    Ruleset,
    Sources,
    find_gate,
)

if TYPE_CHECKING:  # the validator is not needed to compile
    from .policy import ContainerRule, Policy


@dataclass(frozen=True)
class _Claim:
    """One reason a port range has a gate: a rule (explicit) or a default."""

    proto: Proto
    ports: PortRange
    sources: Sources
    label: str
    origin: str
    explicit: bool
    bare: bool = False  # a host-port rule without a container: applies to the port itself
    host: IPAddress | None = None  # the binding's own host address, None: every address


def _claim(b: Binding, sources: Sources, label: str, origin: str, explicit: bool) -> _Claim:
    """A binding's claim: keyed on its host address when Docker published it on one."""
    return _Claim(b.proto, PortRange(b.host_port, b.host_port), sources,  # type: ignore[arg-type]
                  label, origin, explicit, host=b.host_address)


def _bindings(inventory: Inventory) -> list[tuple[Container, Binding]]:
    """Bindings reachable from outside that dockfence gates (tcp and udp, not loopback-only)."""
    return [(c, b) for c in inventory.containers for b in c.bindings
            if b.proto in PROTOS and not b.loopback_only]


def _selects(rule: ContainerRule, c: Container, b: Binding) -> bool:
    """Does a rule name this binding (by container port, or by host port)?"""
    spec = rule.port or rule.host_port
    assert spec is not None
    if (rule.container is not None and not c.matches(rule.container)) or b.proto != spec.proto:
        return False
    port = b.container_port if rule.port else b.host_port
    return port in spec.ports


def binding_label(c: Container, b: Binding) -> str:
    return f"{c.name} {b.container_port}/{b.proto}"


def _rule_claims(policy: Policy, rule: ContainerRule, bindings: list[tuple[Container, Binding]],
                 warnings: list[str]) -> list[_Claim]:
    origin = policy.where(rule.line)
    spec = rule.port or rule.host_port
    assert spec is not None
    selected = [(c, b) for c, b in bindings if _selects(rule, c, b)]
    claims = [_claim(b, rule.sources, binding_label(c, b), origin, True)
              for c, b in selected if b.host_port is not None]
    if rule.host_port is not None and rule.container is None:
        # A bare host-port rule gates the port itself, whether or not a container publishes it
        # yet: it keeps working when containers come and go.
        claims.append(_Claim(spec.proto, spec.ports, rule.sources, f"host port {spec}", origin,
                             True, bare=True))
    elif not selected:
        warnings.append(f"{origin}: rule for {rule.describe()} selects no running container "
                        "(it takes effect once one is running and dockfence is applied again)")
    return claims


def _label_claims(policy: Policy, published: list[tuple[Container, Binding]],
                  warnings: list[str]) -> list[_Claim]:
    """Rules that containers carry as labels, as far as `containers.labels.may_allow` lets
    them go; they add up with the policy's rules like any other rule."""
    claims: list[_Claim] = []
    seen: set[str] = set()
    for c, _ in published:
        if c.name in seen:
            continue
        seen.add(c.name)
        rules, problems = label_rules(policy, c)
        warnings.extend(problems)
        for rule in rules:
            selected = [b for cc, b in published if cc is c and b.proto == rule.port.proto
                        and b.container_port in rule.port.ports]
            if not selected:
                warnings.append(f"{rule.origin}: the container does not publish "
                                f"{rule.port}; the label grants nothing")
            claims += [_claim(b, rule.sources, binding_label(c, b), rule.origin, True)
                       for b in selected]
    return claims


def _segment_sources(seg: PortRange, covering: list[_Claim],
                     where: str | None = None) -> tuple[Sources, list[_Claim]]:
    """Rules add up; a published port no rule names gets the default; bare host-port rules apply
    to whatever is behind the port. Containers that publish one host port on every address
    (of either family) share its gate, so they must end up with one allow-list; containers on
    specific host addresses have gates of their own (see _addressed)."""
    bare = [c for c in covering if c.bare]
    per_label: dict[str, list[_Claim]] = defaultdict(list)
    for c in covering:
        if not c.bare:
            per_label[c.label].append(c)
    if not per_label:
        return Sources.union_of(c.sources for c in bare), bare
    effective: dict[str, tuple[Sources, list[_Claim]]] = {}
    for label, claims in per_label.items():
        chosen = [c for c in claims if c.explicit] + bare or claims
        effective[label] = (Sources.union_of(c.sources for c in chosen), chosen)
    # equality, not a set: hashing a 100k-entry list on every compile would cost watch 0.3 s
    first = next(iter(effective.values()))[0]
    if any(s != first for s, _ in effective.values()):
        raise OperationalError(
            f"host port {where or seg}/{covering[0].proto} is published by "
            f"{'; '.join(effective)} with different allow-lists; a port published on every "
            "host address (0.0.0.0, ::) has one allow-list, so give them one, or publish "
            "each on its own host address (-p ADDRESS:PORT:PORT)")
    sources = next(iter(effective.values()))[0]
    return sources, [c for _, chosen in effective.values() for c in chosen]


def _segments(claims: list[_Claim]) -> list[Gate]:
    """Cut overlapping claims into disjoint port ranges and merge equal neighbours; then the
    gates of ports published on specific host addresses."""
    gates: list[Gate] = []
    for proto in PROTOS:
        mine = [c for c in claims if c.proto == proto and c.host is None]
        cuts = sorted({c.ports.first for c in mine} | {c.ports.last + 1 for c in mine})
        # A sweep over the cuts: the claims covering a segment are those begun and not yet
        # ended (every claim starts and ends on a cut), kept in the policy's order. Watch
        # compiles on every event: a thousand ports under one range rule stay linear.
        starts = sorted(range(len(mine)), key=lambda i: mine[i].ports.first)
        active: dict[int, _Claim] = {}
        nxt = 0
        for lo, hi in itertools.pairwise(cuts):
            while nxt < len(starts) and mine[starts[nxt]].ports.first <= lo:
                active[starts[nxt]] = mine[starts[nxt]]
                nxt += 1
            for i in [i for i, c in active.items() if c.ports.last < lo]:
                del active[i]
            if not active:
                continue
            seg = PortRange(lo, hi - 1)
            covering = [active[i] for i in sorted(active)]
            sources, chosen = _segment_sources(seg, covering)
            label = "; ".join(dict.fromkeys(c.label for c in covering if not c.bare)) \
                or chosen[0].label
            origin = ", ".join(dict.fromkeys(c.origin for c in chosen))
            prev = gates[-1] if gates else None
            if (prev and prev.proto == proto and prev.ports.last + 1 == seg.first
                    and (prev.sources, prev.label, prev.origin) == (sources, label, origin)):
                seg = PortRange(prev.ports.first, seg.last)
                gates.pop()
            gates.append(Gate(proto, seg, sources, label, origin))
    return gates + _addressed(claims)


def _addressed(claims: list[_Claim]) -> list[Gate]:
    """One gate per host address and port that Docker published on that address alone: the
    rules that name what is behind it, and the bare host-port rules (a port on every address)
    covering the port. Single ports, never merged: the kernel keys them on address . port."""
    per_key: dict[tuple[Proto, IPAddress, int], list[_Claim]] = defaultdict(list)
    for c in claims:
        if c.host is not None:
            per_key[(c.proto, c.host, c.ports.first)].append(c)
    bare_rules = [c for c in claims if c.bare]  # a few: scanned once per addressed port
    gates = []
    for (proto, host, port), mine in sorted(per_key.items(), key=lambda kv: (
            kv[0][0], kv[0][1].version, kv[0][1], kv[0][2])):
        seg = PortRange(port, port)
        bare = [c for c in bare_rules if c.proto == proto and port in c.ports]
        where = f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"
        sources, chosen = _segment_sources(seg, mine + bare, where)
        label = "; ".join(dict.fromkeys(c.label for c in mine))
        origin = ", ".join(dict.fromkeys(c.origin for c in chosen))
        gates.append(Gate(proto, seg, sources, label, origin, host))
    return gates


def _direct(policy: Policy, bindings: list[tuple[Container, Binding]], gates: list[Gate],
            default_origin: str) -> list[DirectGate]:
    """Who may route straight to a container's own address and port. Only on networks where
    Docker itself opens published ports there (routed mode) and only as far as the port's
    allow-list goes: the host-port gate's list, or for routed-only ports (no host port) the
    rules that name the container port. Everything else sent to a container address is dropped.
    Keyed on addresses: after a recreate, the next apply (or `watch`) moves it."""
    found: dict[tuple[IPAddress, str, int], DirectGate] = {}
    for c, b in bindings:
        if not c.routed_addresses:
            continue
        if b.host_port is not None:
            gate = find_gate(gates, b.proto, b.host_port, b.host_address)
            if gate is None:
                continue
            sources, origin = gate.sources, gate.origin
        else:
            rules = [r for r in policy.container_rules if r.port and _selects(r, c, b)]
            sources = Sources.for_verdict(policy.container_default)
            origin = default_origin
            if rules:
                sources = Sources.union_of(r.sources for r in rules)
                origin = ", ".join(policy.where(r.line) for r in rules)
        if sources.nobody:
            continue
        for text in c.routed_addresses:
            address = ipaddress.ip_address(text)
            if address.version != b.family:
                continue
            key = (address, b.proto, b.container_port)
            old = found.get(key)
            if old is not None:
                sources = old.sources.union(sources)
                origin = old.origin if old.origin == origin else f"{old.origin}, {origin}"
            found[key] = DirectGate(address, b.proto, b.container_port,  # type: ignore[arg-type]
                                    sources, binding_label(c, b), origin)
    return [found[k] for k in sorted(found, key=lambda k: (k[0].version, k[0], k[1], k[2]))]


def compile_policy(policy: Policy, inventory: Inventory) -> Ruleset:
    warnings: list[str] = []
    bindings = _bindings(inventory)
    published = [(c, b) for c, b in bindings if b.host_port is not None]

    default_origin = f"{policy.where(policy.lines['containers.default'])} " \
                     f"(containers.default: {policy.container_default})"
    claims: list[_Claim] = []
    for rule in policy.container_rules:
        claims.extend(_rule_claims(policy, rule, bindings, warnings))
    claims.extend(_label_claims(policy, published, warnings))
    for c, b in published:
        claims.append(_claim(b, Sources.for_verdict(policy.container_default),
                             binding_label(c, b), default_origin, False))
    container_gates = _segments(claims)

    host: HostRules | None = None
    if policy.host_default is not None:
        host_claims = [_Claim(r.port.proto, r.port.ports, r.sources, f"host port {r.port}",
                              policy.where(r.line), True, bare=True) for r in policy.host_rules]
        host_gates = _segments(host_claims)
        for hg in host_gates:
            for cg in container_gates:
                if cg.proto == hg.proto and cg.ports.overlaps(hg.ports):
                    warnings.append(
                        f"{hg.origin}: host port {hg.ports}/{hg.proto} is also a published "
                        f"container port ({cg.label}); the container rule ({cg.origin}) decides")
        host = HostRules(tuple(host_gates), policy.host_default,
                         f"{policy.where(policy.lines['host.default'])} "
                         f"(host.default: {policy.host_default})")

    bridges = bridge_names(inventory.bridges)
    if policy.interfaces:
        for name in policy.interfaces:
            if name in inventory.bridges or covered_by_patterns(name):
                warnings.append(f"{policy.path}: interface {name} is a Docker bridge; "
                                "traffic from containers on it will be filtered as outside")
    return Ruleset(
        container_gates=tuple(container_gates),
        unknown_published=policy.container_default,
        unknown_origin=default_origin,
        outside=tuple(sorted(policy.interfaces)) if policy.interfaces else None,
        docker_bridges=bridges,
        direct=tuple(_direct(policy, bindings, container_gates, default_origin)),
        host=host,
        warnings=tuple(warnings),
        allow_lists=tuple(r.sources for r in policy.container_rules),
    )
