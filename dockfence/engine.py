"""Orchestration: lock, discover, compile, plan, apply atomically, verify, roll back, revoke."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import discovery, listfiles, record, state, statedir
from .backends import nftables as nft
from .errors import OperationalError, UsageError
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
from .run import run
from .stamp import Stamp, inventory_digest

# The no-op apply needs none of the policy validator, compiler, renderer's callers, explainer,
# diff, bans or counters: each loads where it is used.
if TYPE_CHECKING:
    from . import bans, counters, policy
    from .plan import Change


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
                time.sleep(0.05)
        yield


@dataclass
class Plan:
    """What apply would do (or did), against the live table."""

    policy: policy.Policy | None  # None: nothing changed, so the policy was not even parsed
    inventory: Inventory
    desired: Ruleset | None  # None with policy
    live: Ruleset | None
    changes: list[Change]
    unchanged: bool  # the live table enforces and says exactly what apply would write
    table: str  # `desired` rendered for nft, as apply loads it ("" from make_plan, or when
    # the stamp told that nothing changed)
    stamp: Stamp  # what the table carries once applied
    warnings: list[str] = field(default_factory=list)


def desired_state(policy_path: str, inv: Inventory | None = None,
                  ) -> tuple[policy.Policy, Inventory, Ruleset]:
    from . import policy
    from .compile import compile_policy

    pol = policy.load(policy_path)
    inv = discovery.inventory() if inv is None else inv
    return pol, inv, compile_policy(pol, inv)


def stamp_of(pol: policy.Policy, inv: Inventory) -> Stamp:
    return Stamp(pol.digest, inventory_digest(inv))


def live_rules() -> Ruleset | None:
    """What dockfence enforces now, read back from the kernel; None if not applied."""
    doc = nft.live_json()
    return None if doc is None else nft.parse_live(doc)


def trusted_live() -> Ruleset | None:
    """What dockfence enforces now: the record of the last apply while the table carries the
    stamp it was recorded with (one small set read, whatever the lists hold), else the whole
    table read back. Like apply, this trusts the stamp; `plan` and `doctor` read everything."""
    exists, live_st = nft.read_stamp()
    if not exists:
        return None
    return (record.ruleset(live_st) if live_st else None) or live_rules()


def enforced(pol: policy.Policy, inv: Inventory) -> tuple[bool, bool]:
    """(dockfence is applied, the live table was made from this policy and inventory), told by
    the table's stamp without reading the table."""
    exists, live = nft.read_stamp()
    return exists, live == stamp_of(pol, inv)


def make_plan(policy_path: str) -> Plan:
    """What apply would change, against the whole live table read back (exact: a table edited
    by hand shows, whatever its stamp says)."""
    from .plan import diff

    pol, inv, desired = desired_state(policy_path)
    st = stamp_of(pol, inv)
    doc = nft.live_json()
    live = nft.parse_live(doc) if doc is not None else None
    unchanged = (live is not None and nft.same_table(live, desired)
                 and nft.same_structure(doc, nft.render(desired, st, elements=False)))  # type: ignore[arg-type]
    return Plan(pol, inv, desired, live, diff(live, desired), unchanged, "", st,
                list(desired.warnings))


class RolledBack(OperationalError):
    """The new rules were not confirmed in time; the previous ones are back."""


def _unchanged_by_stamp(policy_path: str) -> tuple[Plan | None, Inventory | None]:
    """The no-op answer in constant time: the digests of the policy's files and of Docker's
    inventory equal the live table's stamp, and the last apply recorded its warnings. Nothing
    is parsed, compiled, rendered or read back. (None, inventory) when that cannot be told."""
    digest = listfiles.inputs_digest(policy_path)
    if digest is None:
        return None, None
    inv = discovery.inventory()
    st = Stamp(digest, inventory_digest(inv))
    if nft.live_stamp() != st:
        return None, inv
    warnings = record.warnings(st)
    if warnings is None:
        return None, inv
    return Plan(None, inv, None, None, [], True, "", st, warnings), inv


def apply(policy_path: str, force: bool = False, confirm: Callable[[], bool] | None = None,
          full: bool = False, lock_wait: float = 0.0, rebuild: bool = False
          ) -> tuple[Plan, int]:
    """Make the kernel match the policy in one transaction. Returns the plan and how many
    established connections were cut because the new policy denies them.

    Unless `full`, a table whose stamp says it was made from these very inputs is trusted, and
    so is the record of what the last apply wrote: nothing big is read back. `full` reads the
    live table as plan does (a table edited by hand is rewritten).

    With `confirm`, the new rules stay only if it returns True (the operator could still reach
    the host); otherwise the previous table is restored, in one transaction too, and nothing
    was cut."""
    with host_lock(lock_wait):
        # Downloaded lists due for a refresh first: the digest below covers their saved copies,
        # so an unchanged download is still a no-op. A failed one keeps its last good copy.
        from . import listurls

        fetched = listurls.refresh_lists(policy_path)
        ssh = None if force else os.environ.get("SSH_CONNECTION")
        inv = None
        saved = state.Record()  # what `restore` loads at the next boot
        # over SSH the lockout check needs the compiled rules
        if not full and not rebuild and not ssh and saved.exists():
            quick, inv = _unchanged_by_stamp(policy_path)
            if quick is not None:
                quick.warnings[:0] = fetched
                return quick, 0
        from .plan import diff

        try:
            pol, inv, desired = desired_state(policy_path, inv)
        except listurls.MissingCopy as exc:  # say why the download failed, too
            raise listurls.MissingCopy("\n".join([*fetched, str(exc)])) from None
        risk = lockout(desired, inv, ssh)
        if risk:
            raise LockoutError(risk)
        st = stamp_of(pol, inv)
        exists, live_st = nft.read_stamp()
        live = record.ruleset(live_st) if exists and live_st and not full else None
        doc = None
        if exists and live is None:
            doc = nft.live_json()
            live = nft.parse_live(doc) if doc is not None else None
        # a rebuild loads the same decisions: the counters keep what they counted
        table = nft.render(desired, st, counts=(nft.live_counters() or {}) if rebuild else None)
        # rebuild: the same decisions, but load the table as render() writes it (watch's element
        # updates leave new ports without chains of their own)
        unchanged = not rebuild and live is not None and nft.same_table(live, desired) and (
            doc is None or nft.same_structure(doc, table))
        plan = Plan(pol, inv, desired, live, diff(live, desired), unchanged, table, st,
                    fetched + list(desired.warnings))
        if unchanged:
            if live_st != st:  # same rules from other bytes (a comment, a restart): restamp
                nft.apply_text(nft.stamp_update(st))
            if live_st != st or not saved.exists():
                saved.save_table(table)
            record.save(st, desired)
            return plan, 0
        previous = nft.live_text() if confirm is not None and exists else None
        # Recorded first: if that fails nothing changes (a stale record would bring back older
        # rules at the next boot); if the kernel refuses, the old record is put back.
        forget = saved.save_table(table)
        try:
            load(table)
        except BaseException:
            forget()
            raise
        if nft.live_stamp() != st:
            forget()
            _restore(previous if confirm is not None or live is None else
                     nft.render(live, live_st), exists)
            raise OperationalError("the kernel does not show the rules just applied; the "
                                   "previous rules were restored")
        record.save(st, desired)
        if confirm is not None and not confirm():
            forget()
            _restore(previous, exists)
            raise RolledBack("not confirmed: the previous rules were restored")
        return plan, revoke(live, desired, inv)


def load(table: str) -> None:
    """The one place a whole table is handed to the kernel: one atomic transaction. Bans are
    not the policy's: the rebuilt table carries them over from their record."""
    from . import bans

    nft.apply_text(nft.transaction(table) + bans.elements(bans.load(), time.time()))


def restore() -> bool:
    """Load the last recorded table (and watch's updates since) in one transaction, without
    Docker or the policy, bans included. False when nothing was recorded; StateError (nothing
    changed) when the record is damaged."""
    loaded = state.Record().load()
    if loaded is None:
        return False
    with host_lock():
        load(loaded[1])
    return True


def _restore(previous: str | None, existed: bool) -> None:
    record.forget()
    if previous is None or not existed:
        nft.apply_text(nft.removal())
    else:
        nft.apply_text(nft.removal() + previous)


def ban(target: str, seconds: int | None, reason: str = "", force: bool = False) -> int:
    """Ban an address or network: recorded (it survives re-apply and restore), then added to
    the live table, then its established flows to containers are cut. Returns how many."""
    from . import bans

    net = bans.parse_target(target)
    client = (os.environ.get("SSH_CONNECTION") or "").split()[:1]
    if client and not force:
        try:
            if ipaddress.ip_address(client[0]) in net:
                raise LockoutError(f"{net} holds the address of your own SSH session "
                                   f"({client[0]}); pass --force if that is what you want")
        except ValueError:
            pass
    entry = bans.Ban(show_network(net), None if seconds is None else time.time() + seconds,
                     reason)
    with host_lock(wait=30):
        bans.save(bans.with_ban(bans.load(), entry))
        if nft.live_stamp_present():
            nft.apply_text(nft.ban_element_commands(net, seconds))
            return _cut_banned(net)
    return 0


def unban(target: str) -> bool:
    """Lift a ban (recorded and live). False when it was not banned."""
    from . import bans

    net = bans.parse_target(target)
    with host_lock(wait=30):
        current = bans.load()
        kept = bans.without(current, show_network(net))
        live = nft.live_bans() or {}
        if len(kept) == len(current) and show_network(net) not in live:
            return False
        bans.save(kept)
        if show_network(net) in live:
            nft.apply_text(nft.unban_commands(net))
        return True


def ban_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bans.Ban | None:
    """The recorded ban that covers this address, if any."""
    from . import bans

    for b in bans.load():
        if address in ipaddress.ip_network(b.network):
            return b
    return None


def current_bans() -> list[dict[str, object]]:
    """Bans in force: the record, with what the kernel says is left of each."""
    from . import bans

    live = nft.live_bans()
    now = time.time()
    out: list[dict[str, object]] = []
    for b in bans.load():
        out.append({"network": b.network, "reason": b.reason,
                    "expires_in": b.remaining(now),
                    "in_kernel": live is not None and b.network in live})
    return out


def _cut_banned(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """Mark the banned source's established flows into containers (NATed, proxied or routed)
    so the table drops them both ways; flows to the host's own ports are left alone."""
    ports = nft.gated_ports()
    local = _local_addresses()
    flows = []
    for family in ("ipv4", "ipv6"):
        proc = run(["conntrack", "-L", "-f", family], check=False)
        flows += parse_conntrack(proc.stdout)
    hit = set()
    for f in flows:
        try:
            if ipaddress.ip_address(f.src) not in net:
                continue
        except ValueError:
            continue
        to_container = f.dst not in local or any(
            lo <= f.dport <= hi for lo, hi in ports.get("udp" if f.proto == "udp" else "tcp", []))
        if to_container:
            hit.add((f.proto, f.src, f.dst, f.dport))
    for proto, src, dst, dport in sorted(hit):
        run(["conntrack", "-U", "-p", proto, "-s", src, "-d", dst, "--dport", str(dport),
             "--mark", str(nft.REVOKED_MARK)], check=False)
    return len(hit)


def remove() -> bool:
    with host_lock():
        record.forget()
        state.Record().forget()  # nothing to bring back at the next boot
        if not nft.read_stamp()[0]:
            return False
        nft.apply_text(nft.removal())
        return True


# --- revoking: new rules do not stop flows that conntrack already accepted ---------------------

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
        if not flows:
            return 0
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
    from .explain import explain

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
    from . import counters

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
    from . import counters

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
