"""`dockfence status`: what the kernel enforces now, for every published port Docker reports,
in the policy's words, with each gate's counters."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import counters, discovery, statedir
from .backends import nftables as nft
from .engine import trusted_live
from .inventory import Binding, Container, Inventory, covered_by_patterns
from .model import Ruleset, Sources, find_gate


@dataclass(frozen=True)
class PortStatus:
    """One published port in `status`: who may reach it and what was counted."""

    container: str
    host: str  # host address:port
    container_port: str  # "8080/tcp"
    who: str  # who may reach it now, in the policy's words
    decided_by: str
    warning: str | None = None
    sources: list[str] | None = None  # every network that may, ["any"], or None: unfiltered
    allowed: int | None = None  # new connections let in since the last apply (None: no gate)
    refused: int | None = None


def _networks(sources: Sources, memo: dict[tuple[int, ...], list[str]] | None,
              ) -> list[str] | None:
    """Every network, as text; one list behind many ports is written out once. None when
    not asked for (memo None): a table of counts needs no million strings."""
    if memo is None:
        return None
    key = (id(sources.v4), id(sources.v6), id(sources.deny_v4), id(sources.deny_v6))
    if key not in memo:
        denied = Sources(v4=sources.deny_v4, v6=sources.deny_v6).texts()
        memo[key] = (["any"] if sources.any else sources.texts()) + [f"except {t}"
                                                                      for t in denied]
    return memo[key]


@dataclass
class Status:
    """What `status` shows: the kernel's rules for what Docker publishes."""

    installed: bool
    ports: list[PortStatus]
    host_rules: list[tuple[str, str, str]]  # (port, who, decided_by)
    host_default: str | None
    warnings: list[str]
    firewall_backend: str
    host_counts: list[counters.Count] = field(default_factory=list)  # one per host_rules row
    defaults: dict[str, counters.Count] = field(default_factory=dict)  # see counters.defaults


LOOPBACK_ONLY = "this host only (loopback)"


def _loopback_status(row: dict[str, str], b: Binding, live: Ruleset | None,
                     inv: Inventory) -> PortStatus:
    """Who reaches a port published on a loopback address, and who sees to it."""
    if b.family == 6:  # the kernel drops packets to ::1 arriving on any other interface
        return PortStatus(**row, who=LOOPBACK_ONLY, decided_by="the kernel", sources=[])
    if live is not None and live.loopback_guard:
        return PortStatus(**row, who=LOOPBACK_ONLY, sources=[],
                          decided_by="dockfence: loopback addresses from outside")
    if inv.docker_guards_loopback:
        return PortStatus(**row, who=LOOPBACK_ONLY, decided_by="Docker", sources=[])
    return PortStatus(**row, who="this host, and neighbours that send to 127.0.0.1 through it",
                      decided_by=f"Docker {inv.docker_version or '(version unknown)'}",
                      warning="Docker before 28.0 forwards packets from outside addressed to "
                      "127.0.0.1 to this port (moby#45610): run `dockfence apply`")


def _port_status(c: Container, b: Binding, live: Ruleset | None, inv: Inventory,
                 counts: dict[str, int] | None = None,
                 memo: dict[tuple[int, ...], list[str]] | None = None) -> PortStatus:
    row = {"container": c.name, "host": b.host_endpoint(),
           "container_port": f"{b.container_port}/{b.proto}"}
    if b.loopback_only:
        return _loopback_status(row, b, live, inv)
    if live is None:
        return PortStatus(**row, who="anyone", decided_by="dockfence not applied",
                          warning="not protected: dockfence is not applied")
    if b.host_port is None:  # routed mode: reached on the container's own address
        mine = [d for d in live.direct if str(d.address) in c.routed_addresses
                and d.address.version == b.family and (d.proto, d.port) == (b.proto,
                                                                            b.container_port)]
        if not mine:
            return PortStatus(**row, who="nobody (direct routing dropped)",
                              decided_by="no allowance in the live rules", sources=[])
        return PortStatus(**row, who=str(mine[0].sources), decided_by=mine[0].origin,
                          sources=_networks(mine[0].sources, memo),
                          **asdict(counters.direct_gate(counts or {}, mine[0])))
    gate = find_gate(live.container_gates, b.proto, b.host_port, b.host_address)
    if gate is None:
        fallback = Sources.for_verdict(live.unknown_published)
        return PortStatus(**row, who=f"{fallback} through NAT; unfiltered through docker-proxy",
                          decided_by=live.unknown_origin,
                          warning="published after the last apply: run `dockfence apply`")
    default = "containers.default" in gate.origin
    return PortStatus(**row, who=str(gate.sources), decided_by=gate.origin,
                      warning="no policy rule names this port; the default decides"
                      if default else None, sources=_networks(gate.sources, memo),
                      **asdict(counters.container_gate(counts or {}, gate)))


def _stale_direct(live: Ruleset, inv: Inventory) -> list[str]:
    """Direct-routing allowances whose address no longer belongs to the container port they
    were made for: the address may have been handed to another container."""
    current = {(a, b.proto, b.container_port) for c in inv.containers
               for b in c.bindings for a in c.routed_addresses}
    return [f"direct-routing allowance to {d.address} port {d.port}/{d.proto} ({d.label}) no "
            "longer matches a running container: run `dockfence apply` (or `dockfence watch`)"
            for d in live.direct if (str(d.address), d.proto, d.port) not in current]


def status(networks: bool = True) -> Status:
    """What the kernel enforces now, for every published port Docker reports; with every
    allowed network written out (PortStatus.sources) only if `networks`."""
    inv = discovery.inventory()
    live = trusted_live()
    counts = (nft.live_counters() or {}) if live else {}
    memo: dict[tuple[int, ...], list[str]] | None = {} if networks else None
    ports = [_port_status(c, b, live, inv, counts, memo) for c in inv.containers
             for b in c.bindings]
    warnings: list[str] = _stale_direct(live, inv) if live else []
    record = statedir.applied_record() if live is None else None
    if record:
        warnings.append(f"table inet dockfence is missing (flushed?): it was applied before "
                        f"({record}); nothing is filtered until `dockfence apply` (a running "
                        "`dockfence watch` puts it back)")
    for p in ports:
        if p.warning:
            warnings.append(f"{p.container} {p.container_port} on {p.host}: {p.warning}")
    if live is not None:
        missing = sorted(b for b in inv.bridges
                         if b not in live.docker_bridges and not covered_by_patterns(b))
        if missing:
            warnings.append(f"Docker network bridge(s) {', '.join(missing)} appeared after the "
                            "last apply: ports first published there are not filtered until "
                            "`dockfence apply`")
    host_rules = [(f"{g.ports}/{g.proto}", str(g.sources), g.origin)
                  for g in (live.host.gates if live and live.host else ())]
    host_default = None
    if live and live.host:
        host_default = str(Sources.for_verdict(live.host.default))
    return Status(live is not None, ports, host_rules, host_default, warnings,
                  inv.firewall_backend,
                  [counters.host_gate(counts, g) for g in (live.host.gates if live and live.host
                                                           else ())],
                  counters.defaults(counts, live) if live else {})
