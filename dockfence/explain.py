"""Why a source may or may not reach a port: the verdict and the rule that decided it. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Literal

from .inventory import Binding, Container, Inventory
from .model import Gate, PortRange, Proto, Ruleset, Sources, Verdict, addressed_gates, find_gate

# "depends": the port is published on several host addresses with different verdicts and no
# `to` said which one
Answer = Verdict | Literal["depends"] | None


@dataclass(frozen=True)
class Explanation:
    """Would a source get through to a port, and which policy line decided."""

    source: str
    port: int
    proto: str
    verdict: Answer  # None: dockfence does not filter this traffic
    target: str  # what sits behind the port
    decided_by: str  # the policy line (or default) that decided
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def explain(rs: Ruleset, inventory: Inventory, source: ipaddress.IPv4Address |
            ipaddress.IPv6Address, port: int, proto: Proto = "tcp",
            to: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None) -> Explanation:
    """Verdict for a new connection from an outside `source` to `port` on the host (or, with
    `to`, on that address: a container's own address means direct routing, a loopback address
    a packet a neighbour sent to 127.0.0.1 or ::1 through the host)."""

    def result(verdict: Answer, target: str, decided_by: str, reason: str) -> Explanation:
        return Explanation(str(source), port, proto, verdict, target, decided_by, reason)

    if to is not None and to.is_loopback and rs.loopback_guard:
        # Docker's DNAT takes 127.0.0.1 (or ::1) for a host address: the ports behind it are
        # those published on it and those published on every address
        behind = [f"{c.name} {b.container_port}/{b.proto} (published on {b.host_endpoint()})"
                  for c in inventory.containers for b in c.bindings
                  if b.proto == proto and b.host_port == port
                  and b.host_ip in (str(to), "0.0.0.0" if to.version == 4 else "::")]
        return result("deny", "; ".join(behind) or f"port {port}/{proto} on {to}",
                      "dockfence: loopback addresses from outside",
                      f"packets from outside addressed to {to} are dropped before Docker's NAT, "
                      "whatever the policy: Docker would forward them to ports published on "
                      "every address, and before 28.0 to those published on 127.0.0.1 "
                      "(moby#45610); only this host reaches them, over lo")

    if to is not None:
        direct = next((d for d in rs.direct if d.address == to and d.proto == proto
                       and d.port == port), None)
        if direct is not None:
            ok = direct.sources.admits(source)
            return result("allow" if ok else "deny",
                          f"{direct.label} (direct route to container address {to})",
                          direct.origin, f"{_why(direct.sources, source)} of the published "
                          "port")
        for c in inventory.containers:
            if str(to) in c.addresses:
                return result("deny", f"{c.name} port {port}/{proto} (container address {to})",
                              "dockfence: direct routing",
                              "new connections routed straight to a container address are "
                              "dropped, except to ports Docker publishes on that address "
                              "(routed mode) for sources their allow-list admits")

    # A loopback-only binding is reached from outside only through a loopback destination,
    # which a table made before the loopback guard let through Docker's NAT.
    published = [(c, b) for c in inventory.containers for b in c.bindings
                 if b.proto == proto and b.host_port == port
                 and (to is None or b.host_ip == str(to)
                      or (b.host_address is None and b.family == to.version))
                 and (not b.loopback_only or b.host_ip == str(to))]
    # a source reaches host addresses of its own family only
    addressed = [g for g in addressed_gates(rs.container_gates, proto, port)
                 if g.host is not None and g.host.version == source.version]
    if to is None and addressed:
        return _per_address(rs, published, addressed, source, port, proto)
    gate = find_gate(rs.container_gates, proto, port, to)
    if gate is not None:
        mine = [(c, b) for c, b in published if gate.host is not None or b.host_address is None
                or find_gate(rs.container_gates, proto, port, b.host_address) is gate]
        ok = gate.sources.admits(source)
        return result("allow" if ok else "deny", _target(mine) or gate.label, gate.origin,
                      _why(gate.sources, source) + _keyed(gate))
    if published:
        c, b = published[0]
        return result(rs.unknown_published, f"{c.name} {b.container_port}/{b.proto}",
                      rs.unknown_origin, "published port that no rule names")
    local = [f"{c.name} {b.container_port}/{b.proto}" for c in inventory.containers
             for b in c.bindings if b.proto == proto and b.host_port == port and b.loopback_only]
    port_desc = f"host port {port}/{proto}"
    if local:  # say why the container published on this port is not what answers
        port_desc += (f" ({', '.join(local)} is published on loopback only" +
                      (": packets from outside to loopback addresses are dropped)"
                       if rs.loopback_guard else ")"))
    if rs.host is None:
        return result(None, port_desc, "no `host:` section",
                      "not a published container port; dockfence leaves the host's own ports "
                      "alone")
    hgate = find_gate(rs.host.gates, proto, port)
    if hgate is not None:
        ok = hgate.sources.admits(source)
        return result("allow" if ok else "deny", port_desc, hgate.origin,
                      _why(hgate.sources, source))
    return result(rs.host.default, port_desc, rs.host.origin,
                  "a host port no rule names")


def _target(published: list[tuple[Container, Binding]]) -> str:
    endpoints: dict[str, list[str]] = {}
    for c, b in published:
        endpoints.setdefault(f"{c.name} {b.container_port}/{b.proto}", []).append(
            b.host_endpoint())
    return "; ".join(f"{k} (published on {', '.join(v)})" for k, v in endpoints.items())


def _keyed(gate: Gate) -> str:
    if gate.host is None:
        return ""
    return f" (the gate of {gate.label} on host address {gate.host})"


def _per_address(rs: Ruleset, published: list[tuple[Container, Binding]],
                 addressed: list[Gate], source: ipaddress.IPv4Address | ipaddress.IPv6Address,
                 port: int, proto: Proto) -> Explanation:
    """No `to`, and the port has gates keyed on host addresses: the verdict on each address
    (the port's own gate, if any, for every other one); "depends" when they differ."""
    gates = [*addressed, *filter(None, [find_gate(rs.container_gates, proto, port)])]
    verdicts = {g.sources.admits(source) for g in gates}
    verdict: Answer = "depends" if len(verdicts) > 1 else "allow" if verdicts.pop() else "deny"
    parts = [f"on {g.host or 'any other address'}: {_why(g.sources, source)}" for g in gates]
    hint = "; pass --to ADDRESS for one host address" if verdict == "depends" else ""
    return Explanation(str(source), port, proto, verdict, _target(published) or
                       "; ".join(g.label for g in gates),
                       "; ".join(f"{g.host or 'other addresses'}: {g.origin}" for g in gates),
                       "; ".join(parts) + hint)


def _why(sources: Sources, source: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if sources.denied(source):
        return f"refused by an except: {sources.detail()}"
    ok = sources.admits(source)
    return f"{'allowed' if ok else 'not in the allow-list'}: {sources.detail()}"


def parse_port_arg(text: str) -> tuple[int, Proto]:
    port, _, proto = text.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp") or not port.isdigit():
        raise ValueError(f"expected PORT or PORT/tcp or PORT/udp, got {text!r}")
    PortRange(int(port), int(port))  # raises on 0 or > 65535
    return int(port), proto  # type: ignore[return-value]
