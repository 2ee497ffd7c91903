"""Orchestration: lock, discover, compile, plan, apply atomically, verify, roll back, revoke."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import discovery, policy, state
from .backends import nftables as nft
from .compile import compile_policy
from .errors import OperationalError, UsageError
from .explain import explain
from .model import (
    Binding,
    Container,
    Inventory,
    Ruleset,
    Sources,
    covered_by_patterns,
    find_gate,
    show_network,
)
from .plan import Change, diff
from .run import run


class LockoutError(UsageError):
    """Refused: the policy would deny the SSH session that runs the command."""


@contextmanager
def host_lock(wait: float = 0.0) -> Iterator[None]:
    """One dockfence at a time per network namespace (tests run several namespaces at once).
    `wait`: seconds to wait for another dockfence to finish (watch waits; commands do not)."""
    netns = os.stat("/proc/self/ns/net").st_ino
    os.makedirs("/run/dockfence", exist_ok=True)
    deadline = time.monotonic() + wait
    with open(f"/run/dockfence/lock.{netns}", "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OperationalError("another dockfence is changing this host; "
                                           "try again") from None
                time.sleep(0.01)
        yield


@dataclass
class Plan:
    policy: policy.Policy
    inventory: Inventory
    desired: Ruleset
    live: Ruleset | None
    changes: list[Change]
    unchanged: bool  # the live table is byte-for-byte what apply would write
    table: str  # `desired` rendered for nft
    desired_canonical: str  # how the kernel lists `desired`
    warnings: list[str] = field(default_factory=list)


def desired_state(policy_path: str) -> tuple[policy.Policy, Inventory, Ruleset]:
    pol = policy.load(policy_path)
    inv = discovery.inventory()
    return pol, inv, compile_policy(pol, inv)


def live_rules() -> Ruleset | None:
    """What dockfence enforces now, read back from the kernel; None if not applied."""
    doc = nft.live_json()
    return None if doc is None else nft.parse_live(doc)


def enforced(rs: Ruleset) -> tuple[bool, bool]:
    """(dockfence is applied, the live table is exactly `rs`), without reading it back."""
    live = nft.canonical(nft.live_json())
    return live is not None, live is not None and live == nft.canonical_of(nft.render(rs))


def make_plan(policy_path: str) -> Plan:
    pol, inv, desired = desired_state(policy_path)
    table = nft.render(desired)
    desired_canon = nft.canonical_of(table)  # the kernel's own check, before anything changes
    doc = nft.live_json()
    live_canon = nft.canonical(doc)
    unchanged = live_canon == desired_canon
    # reading the live table back costs time on long lists: skip it when it is ours already
    live = desired if unchanged else nft.parse_live(doc) if doc is not None else None
    return Plan(pol, inv, desired, live, diff(live, desired), unchanged, table, desired_canon,
                list(desired.warnings))


class RolledBack(OperationalError):
    """The new rules were not confirmed in time; the previous ones are back."""


def apply(policy_path: str, force: bool = False,
          confirm: Callable[[], bool] | None = None, lock_wait: float = 0.0) -> tuple[Plan, int]:
    """Make the kernel match the policy in one transaction. Returns the plan and how many
    established connections were cut because the new policy denies them.

    With `confirm`, the new rules stay only if it returns True (the operator could still reach
    the host); otherwise the previous table is restored, in one transaction too, and nothing
    was cut."""
    with host_lock(lock_wait):
        plan = make_plan(policy_path)
        risk = None if force else lockout(plan.desired, plan.inventory,
                                          os.environ.get("SSH_CONNECTION"))
        if risk:
            raise LockoutError(risk)
        record = state.Record()
        if plan.unchanged:
            if not record.exists():
                record.save_table(plan.table)
            return plan, 0
        previous = nft.live_text()
        # Recorded first: a stale record would bring back older rules at the next boot.
        forget = record.save_table(plan.table)
        try:
            nft.apply_text(nft.transaction(plan.table))
        except BaseException:
            forget()
            raise
        if nft.canonical(nft.live_json()) != plan.desired_canonical:
            _restore(previous)
            forget()
            raise OperationalError("the kernel does not show the rules just applied; the "
                                   "previous rules were restored")
        if confirm is not None and not confirm():
            _restore(previous)
            forget()
            raise RolledBack("not confirmed: the previous rules were restored")
        return plan, revoke(plan.live, plan.desired, plan.inventory)


def restore() -> bool:
    """Load the last recorded table (and watch's updates since) in one transaction, without
    Docker or the policy. False when nothing was recorded; StateError (nothing changed) when
    the record is damaged."""
    loaded = state.Record().load()
    if loaded is None:
        return False
    with host_lock():
        nft.apply_text(nft.transaction(loaded[1]))
    return True


def _restore(previous: str | None) -> None:
    if previous is None:
        nft.apply_text(nft.removal())
    else:
        nft.apply_text(nft.removal() + previous)


def remove() -> bool:
    with host_lock():
        state.Record().forget()  # nothing to bring back at the next boot
        if nft.live_json() is None:
            return False
        nft.apply_text(nft.removal())
        return True


# --- revoking: new rules do not stop flows that conntrack already accepted ---------------------

@dataclass(frozen=True)
class Flow:
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
    containers = {a for c in inv.containers for a in c.addresses}
    inside = local | containers
    decided: dict[tuple[str, str, str, int], bool] = {}

    def revoked(proto: str, src: str, dst: str, dport: int) -> bool:
        if src in inside:
            return False  # opened by the host or a container
        if dst in local:
            if find_gate(new.container_gates, proto, dport) is None:
                return False
        elif dst not in containers:
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


def _local_addresses() -> set[str]:
    out = run(["ip", "-j", "addr", "show"]).stdout
    return {a["local"] for link in json.loads(out) for a in link.get("addr_info", [])}


def revoke(old: Ruleset | None, new: Ruleset, inv: Inventory) -> int:
    """Stop flows the new rules deny. Deleting their conntrack entries is not enough: the
    container's next packet (a push, a keepalive) would recreate the entry in the other
    direction and pass as a container's own traffic. So the entries are kept and marked, and
    the table drops marked packets both ways. Returns how many live flows were cut."""
    try:
        flows = []
        for family in ("ipv4", "ipv6"):
            proc = run(["conntrack", "-L", "-f", family], check=False)
            flows += parse_conntrack(proc.stdout)
        cut = flows_to_cut(flows, old, new, inv, _local_addresses())
    except OperationalError:
        return 0  # no conntrack tool: new connections are still filtered
    # One update per (proto, src, dst, dport): the verdict depends on nothing else, and a
    # client that opened thousands of connections costs one call, not thousands.
    for proto, src, dst, dport in sorted({(f.proto, f.src, f.dst, f.dport) for f in cut}):
        run(["conntrack", "-U", "-p", proto, "-s", src, "-d", dst, "--dport", str(dport),
             "--mark", str(nft.REVOKED_MARK)], check=False)
    return sum(f.live for f in cut)


def lockout(rs: Ruleset, inv: Inventory, ssh_connection: str | None) -> str | None:
    """If this command runs over SSH, refuse rules that would deny that very session's port:
    established flows survive, but the next login would not."""
    if not ssh_connection:
        return None
    try:
        client, _, server, port = ssh_connection.split()
        verdict = explain(rs, inv, ipaddress.ip_address(client), int(port), "tcp",
                          ipaddress.ip_address(server))
    except ValueError:
        return None
    if verdict.verdict == "deny":
        return (f"this policy would lock you out: your SSH session from {client} to port {port} "
                f"would be denied ({verdict.decided_by}); allow it under host.allow, or pass "
                "--force if that is what you want")
    return None


@dataclass(frozen=True)
class PortStatus:
    container: str
    host: str  # host address:port
    container_port: str  # "8080/tcp"
    who: str  # who may reach it now, in the policy's words
    decided_by: str
    warning: str | None = None
    sources: list[str] | None = None  # every network that may, ["any"], or None: unfiltered


def _networks(sources: Sources) -> list[str]:
    return ["any"] if sources.any else [show_network(n) for n in sources.networks]


@dataclass
class Status:
    installed: bool
    ports: list[PortStatus]
    host_rules: list[tuple[str, str, str]]  # (port, who, decided_by)
    host_default: str | None
    warnings: list[str]
    firewall_backend: str


def _port_status(c: Container, b: Binding, live: Ruleset | None) -> PortStatus:
    row = {"container": c.name, "host": b.host_endpoint(),
           "container_port": f"{b.container_port}/{b.proto}"}
    if b.loopback_only:
        return PortStatus(**row, who="this host only (loopback)", decided_by="Docker")
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
                          sources=_networks(mine[0].sources))
    gate = find_gate(live.container_gates, b.proto, b.host_port)
    if gate is None:
        fallback = Sources.for_verdict(live.unknown_published)
        return PortStatus(**row, who=f"{fallback} through NAT; unfiltered through docker-proxy",
                          decided_by=live.unknown_origin,
                          warning="published after the last apply: run `dockfence apply`")
    default = "containers.default" in gate.origin
    return PortStatus(**row, who=str(gate.sources), decided_by=gate.origin,
                      warning="no policy rule names this port; the default decides"
                      if default else None, sources=_networks(gate.sources))


def _stale_direct(live: Ruleset, inv: Inventory) -> list[str]:
    """Direct-routing allowances whose address no longer belongs to the container port they
    were made for: the address may have been handed to another container."""
    current = {(a, b.proto, b.container_port) for c in inv.containers
               for b in c.bindings for a in c.routed_addresses}
    return [f"direct-routing allowance to {d.address} port {d.port}/{d.proto} ({d.label}) no "
            "longer matches a running container: run `dockfence apply` (or `dockfence watch`)"
            for d in live.direct if (str(d.address), d.proto, d.port) not in current]


def status() -> Status:
    """What the kernel enforces now, for every published port Docker reports."""
    inv = discovery.inventory()
    live = live_rules()
    ports = [_port_status(c, b, live) for c in inv.containers for b in c.bindings]
    warnings: list[str] = _stale_direct(live, inv) if live else []
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
                  inv.firewall_backend)
