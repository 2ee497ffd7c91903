"""Why a source may or may not reach a port: the verdict and the rule that decided it. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

from .model import Inventory, PortRange, Proto, Ruleset, Verdict, find_gate


@dataclass(frozen=True)
class Explanation:
    source: str
    port: int
    proto: str
    verdict: Verdict | None  # None: dockfence does not filter this traffic
    target: str  # what sits behind the port
    decided_by: str  # the policy line (or default) that decided
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def explain(rs: Ruleset, inventory: Inventory, source: ipaddress.IPv4Address |
            ipaddress.IPv6Address, port: int, proto: Proto = "tcp",
            to: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None) -> Explanation:
    """Verdict for a new connection from an outside `source` to `port` on the host (or, with
    `to`, on that address: a container's own address means direct routing)."""

    def result(verdict: Verdict | None, target: str, decided_by: str, reason: str) -> Explanation:
        return Explanation(str(source), port, proto, verdict, target, decided_by, reason)

    if to is not None:
        direct = next((d for d in rs.direct if d.address == to and d.proto == proto
                       and d.port == port), None)
        if direct is not None:
            ok = direct.sources.admits(source)
            return result("allow" if ok else "deny",
                          f"{direct.label} (direct route to container address {to})",
                          direct.origin, f"{'allowed' if ok else 'not in the allow-list'} of "
                          f"the published port: {direct.sources.detail()}")
        for c in inventory.containers:
            if str(to) in c.addresses:
                return result("deny", f"{c.name} port {port}/{proto} (container address {to})",
                              "dockfence: direct routing",
                              "new connections routed straight to a container address are "
                              "dropped, except to ports Docker publishes on that address "
                              "(routed mode) for sources their allow-list admits")

    published = [(c, b) for c in inventory.containers for b in c.bindings
                 if b.proto == proto and b.host_port == port and not b.loopback_only
                 and (to is None or b.host_ip in ("0.0.0.0", "::", str(to)))]
    gate = find_gate(rs.container_gates, proto, port)
    if gate is not None:
        endpoints: dict[str, list[str]] = {}
        for c, b in published:
            endpoints.setdefault(f"{c.name} {b.container_port}/{b.proto}", []).append(
                b.host_endpoint())
        target = "; ".join(f"{k} (published on {', '.join(v)})" for k, v in endpoints.items()) \
            or gate.label
        ok = gate.sources.admits(source)
        return result("allow" if ok else "deny", target, gate.origin,
                      f"{'allowed' if ok else 'not in the allow-list'}: {gate.sources.detail()}")
    if published:
        c, b = published[0]
        return result(rs.unknown_published, f"{c.name} {b.container_port}/{b.proto}",
                      rs.unknown_origin, "published port that no rule names")
    if rs.host is None:
        return result(None, f"host port {port}/{proto}", "no `host:` section",
                      "not a published container port; dockfence leaves the host's own ports "
                      "alone")
    hgate = find_gate(rs.host.gates, proto, port)
    if hgate is not None:
        ok = hgate.sources.admits(source)
        return result("allow" if ok else "deny", f"host port {port}/{proto}", hgate.origin,
                      f"{'allowed' if ok else 'not in the allow-list'}: {hgate.sources.detail()}")
    return result(rs.host.default, f"host port {port}/{proto}", rs.host.origin,
                  "a host port no rule names")


def parse_port_arg(text: str) -> tuple[int, Proto]:
    port, _, proto = text.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp") or not port.isdigit():
        raise ValueError(f"expected PORT or PORT/tcp or PORT/udp, got {text!r}")
    PortRange(int(port), int(port))  # raises on 0 or > 65535
    return int(port), proto  # type: ignore[return-value]
