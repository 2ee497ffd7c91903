"""Cutting flows that new rules deny: conntrack already accepted them, so a new rule alone would
not stop them. The entries are kept and marked (REVOKED_MARK), and the table drops marked
packets both ways."""

from __future__ import annotations

import ipaddress
import json
import threading
from dataclasses import dataclass

from .backends import nftables as nft
from .errors import OperationalError
from .inventory import Inventory
from .model import Ruleset, find_gate
from .run import run


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, as far as revocation needs it."""

    proto: str
    src: str
    dst: str
    sport: int
    dport: int
    live: bool = True  # carries traffic: TCP ESTABLISHED (or opening), or any UDP flow


_TCP_LIVE = {"SYN_SENT", "SYN_RECV", "ESTABLISHED"}


def parse_conntrack(text: str) -> list[Flow]:
    """`conntrack -L` lines; the first src/dst/sport/dport are the original direction."""
    flows = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("tcp", "udp"):
            continue
        kv: dict[str, str] = {}
        for w in words:
            k, sep, v = w.partition("=")
            if sep and k not in kv:
                kv[k] = v
        live = words[0] == "udp" or (len(words) > 3 and words[3] in _TCP_LIVE)
        try:
            flows.append(Flow(words[0], kv["src"], kv["dst"], int(kv["sport"]),
                              int(kv["dport"]), live))
        except (KeyError, ValueError):
            continue
    return flows


def flows_to_cut(flows: list[Flow], old: Ruleset | None, new: Ruleset, inv: Inventory,
                 local: set[str]) -> list[Flow]:
    """Flows from outside to containers (through a published port or routed straight to a
    container address) that the old rules, or no rules, let in and the new ones deny. Flows to
    the host's own ports are never cut: that could be the operator's own session."""
    from .explain import explain

    containers = {a for c in inv.containers for a in c.addresses}
    inside = local | containers
    decided: dict[tuple[str, str, str, int], bool] = {}

    def revoked(proto: str, src: str, dst: str, dport: int) -> bool:
        if src in inside:
            return False  # opened by the host or a container
        # from outside, a loopback address leads only through Docker's NAT (Docker < 28)
        loopback = ipaddress.ip_address(dst).is_loopback
        if dst in local and not loopback:
            if find_gate(new.container_gates, proto, dport, ipaddress.ip_address(dst)) is None:
                return False
        elif dst not in containers and not loopback:
            return False  # routed elsewhere: not dockfence's business
        p = "udp" if proto == "udp" else "tcp"
        a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        now = explain(new, inv, a, dport, p, b).verdict
        before = explain(old, inv, a, dport, p, b).verdict if old else None
        return now == "deny" and before != "deny"

    cut = []
    for f in flows:
        # the verdict depends on nothing else: one client's thousand flows cost one decision
        key = (f.proto, f.src, f.dst, f.dport)
        if key not in decided:
            decided[key] = revoked(*key)
        if decided[key]:
            cut.append(f)
    return cut


def local_addresses() -> set[str]:
    out = run(["ip", "-j", "addr", "show"]).stdout
    return {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}


def conntrack_flows() -> list[Flow]:
    """Every flow conntrack tracks in this network namespace, both families (listed side by
    side: each listing is a process of its own)."""
    out: dict[str, str | OperationalError] = {}

    def listing(family: str) -> None:
        try:
            out[family] = run(["conntrack", "-L", "-f", family], check=False).stdout
        except OperationalError as exc:  # conntrack missing: the caller decides
            out[family] = exc

    workers = [threading.Thread(target=listing, args=(f,)) for f in ("ipv4", "ipv6")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    flows = []
    for family in ("ipv4", "ipv6"):
        text = out[family]
        if isinstance(text, OperationalError):
            raise text
        flows += parse_conntrack(text)
    return flows


def mark_revoked(keys: set[tuple[str, str, str, int]]) -> None:
    """Mark the flows of each (proto, src, dst, dport) so that the table drops their packets
    both ways. One update per key: a client that opened thousands of connections costs one
    call, not thousands."""
    for proto, src, dst, dport in sorted(keys):
        run(["conntrack", "-U", "-p", proto, "-s", src, "-d", dst, "--dport", str(dport),
             "--mark", str(nft.REVOKED_MARK)], check=False)


def revoke(old: Ruleset | None, new: Ruleset, inv: Inventory) -> int:
    """Stop flows the new rules deny. Deleting their conntrack entries is not enough: the
    container's next packet (a push, a keepalive) would recreate the entry in the other
    direction and pass as a container's own traffic. So the entries are kept and marked, and
    the table drops marked packets both ways. Returns how many live flows were cut."""
    try:
        flows = conntrack_flows()
        if not flows:
            return 0
        cut = flows_to_cut(flows, old, new, inv, local_addresses())
    except OperationalError:
        return 0  # no conntrack tool: new connections are still filtered
    mark_revoked({(f.proto, f.src, f.dst, f.dport) for f in cut})
    return sum(f.live for f in cut)
