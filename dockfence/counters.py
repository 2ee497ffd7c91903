"""What the firewall did since the last apply: new connections let in and refused, per port and
for the defaults, from the live table's named counters (see backends.nftables.gate_name).

Pure: the counter values come in as a dict (nftables.live_counters), so this is tested without
a kernel. A counter counts packets that reached the decision, i.e. the first packet of each new
connection (retransmitted SYNs and every packet of a refused UDP flow count again)."""

from __future__ import annotations

from dataclasses import dataclass

from .backends import nftables as nft
from .model import DirectGate, Gate, Ruleset, Verdict


@dataclass(frozen=True)
class Count:
    """New connections allowed and refused since the last apply."""

    allowed: int
    refused: int


def _gate(counts: dict[str, int], stem: str) -> Count:
    return Count(counts.get(f"{stem}_allowed", 0), counts.get(f"{stem}_refused", 0))


def container_gate(counts: dict[str, int], g: Gate) -> Count:
    return _gate(counts, nft.gate_stem(g))


def host_gate(counts: dict[str, int], g: Gate) -> Count:
    return _gate(counts, nft.host_stem(g))


def direct_gate(counts: dict[str, int], g: DirectGate) -> Count:
    return _gate(counts, nft.direct_stem(g))


def _default(counts: dict[str, int], name: str, verdict: Verdict) -> Count:
    n = counts.get(name, 0)
    return Count(n, 0) if verdict == "allow" else Count(0, n)


def defaults(counts: dict[str, int], rs: Ruleset) -> dict[str, Count]:
    """The totals of what no port rule decided: keyed by the names status and the policy use."""
    out = {"containers.default": _default(counts, nft.COUNTER_UNKNOWN, rs.unknown_published),
           "direct routing": Count(0, counts.get(nft.COUNTER_DIRECT, 0)),
           "revoked": Count(0, counts.get(nft.COUNTER_REVOKED, 0))}
    if rs.host is not None:
        out["host.default"] = _default(counts, nft.COUNTER_HOST, rs.host.default)
    return out
