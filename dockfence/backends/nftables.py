"""nftables backend: render a ruleset as one `nft -f` transaction, read the live table back.

Everything lives in `table inet dockfence`, which Docker never touches. Only the table's drops
matter for enforcement: a drop in any base chain is final, while an accept merely ends our chain
and lets Docker's own chains (iptables or Docker 29's nftables) decide as before.

Paths covered:
- forward: traffic Docker DNATed to a container is matched on the conntrack *original*
  destination port (the host port the user published), never on the container port; a port
  published on a specific host address is matched on the original destination address and
  port first (maps `addr_v4_tcp` etc., present only while such ports exist);
  new connections to a container that were not DNATed (direct routing) are dropped;
- input: the same host ports when docker-proxy serves them (IPv6 to an IPv4-only container);
- input: the host's own ports, when the policy has a `host:` section;
- prerouting: packets from outside addressed to a loopback address, whatever the policy.

Every port gate is a chain of its own with named counters (`<gate>_allowed`, `<gate>_refused`),
and every drop point goes through refuse(): counted, reported through NFLOG under one kernel rate
limit, dropped. `status` and the metrics read the counters with one small listing. Banned
addresses (`dockfence ban`) are refused first in every gate that admits anyone, and by the
`allow` defaults.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import addresses
from ..errors import OperationalError
from ..run import background, run
from ..stamp import Stamp

# The rules' types load with the first render or read-back, not with this module: a no-op
# `apply` reads only the stamp (creating those classes costs ~10 ms).
if TYPE_CHECKING:
    from ..model import DirectGate, Gate, PortRange, Ruleset, Sources, Verdict

FAMILY, TABLE = "inet", "dockfence"
TABLE_COMMENT = '\tcomment "managed by dockfence; do not edit"'
PRIORITY = "filter - 10"  # before Docker's iptables-nft/nftables filter chains
TAG_UNKNOWN = "containers.default"
TAG_DIRECT = "direct routing"
TAG_HOST = "host.default"
TAG_REVOKED = "revoked"
TAG_BANNED = "banned"
TAG_EXCEPT = "except"
TAG_LOOPBACK = "loopback from outside"
# conntrack mark of flows a new policy revoked (see dockfence.revoke): "df" in the high bytes
REVOKED_MARK = 0x64660001
# Loading or listing a table of a million addresses takes nft seconds (tens on a busy host)
WHOLE_TABLE_TIMEOUT = 600
BRIDGE_SET = "bridges"  # Docker's bridge interfaces: names and wildcards (`br-*`)
ALLOW_ANY = "allow_any"  # the shared chain of `any`: refuses bans, accepts the rest
STAMP_SET = "stamp"  # one element whose comment is the table's Stamp (see dockfence.stamp)
# Banned addresses (dockfence ban): every allow-list refuses them, `any` included. Their
# elements are not the policy's: canonical listings leave them out, and apply carries them over.
BAN_SETS = {4: "bans_v4", 6: "bans_v6"}
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/;,()@+=*-]")


def comment(*parts: str) -> str:
    """A quoted nft comment of `label | origin`. Labels hold container names and file paths, so
    anything outside a conservative alphabet is replaced: user text never reaches nft raw."""
    return '"' + " | ".join(_COMMENT_UNSAFE.sub("?", p) for p in parts)[:127] + '"'


def _ifnames(names: tuple[str, ...]) -> str:
    # names were validated (policy) or come from Docker's bridge names; re-check anyway.
    from ..model import IFNAME_RE

    for n in names:
        if not IFNAME_RE.match(n):
            raise OperationalError(f"refusing unsafe interface name {n!r}")
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


# Refused new connections are counted, and reported through NFLOG (a plain `log` is silent
# outside the initial network namespace). One named limit shared by every refusal bounds what
# reaches userspace whatever the flood; the counters still count every packet.
LOG_GROUP = 0x6466  # "df"; NFLOG groups are per network namespace
LOG_PREFIX = "dockfence "  # + the counter name of the refusing rule (see dockfence.refusals)
LOG_LIMIT = "refusal_log"
LOG_RATE = "1000/second burst 2000 packets"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
# counters of the defaults (the gates' own are named after their chains, see gate_name)
COUNTER_UNKNOWN, COUNTER_DIRECT = "containers_default", "direct_routing"
COUNTER_HOST, COUNTER_REVOKED = "host_default", "revoked"
COUNTER_BANNED = "banned"  # bans refused by the shared chain of `any`


def gate_name(map_name: str, key: str) -> str:
    """The chain deciding one map element, and the stem of its counters: `tcp_ports_8080`,
    `host_tcp_22`, `direct_v6_tcp_2001_db8__2_80`. Derived from what the key holds, so status
    finds a port's counters without reading the chains."""
    return f"{map_name}_{_NAME_UNSAFE.sub('_', key.replace(' . ', '_'))}"


def addr_map(version: int, proto: str) -> str:
    """The map of the gates keyed on a host address and port: `addr_v4_tcp`."""
    return f"addr_v{version}_{proto}"


def gate_map_key(g: Gate) -> tuple[str, str]:
    """(map, key as nft writes it) of a container gate: `tcp_ports`, `8080` or
    `addr_v4_tcp`, `203.0.113.1 . 443`."""
    if g.host is None:
        return f"{g.proto}_ports", str(g.ports)
    return addr_map(g.host.version, g.proto), f"{g.host} . {g.ports.first}"


def gate_stem(g: Gate) -> str:
    """The chain and counter stem of a container gate (see gate_name)."""
    return gate_name(*gate_map_key(g))


def host_map(proto: str) -> str:
    """The map of the host's own ports (policy `host:`): `host_tcp`."""
    return f"host_{proto}"


def host_stem(g: Gate) -> str:
    """The chain and counter stem of a host gate: `host_tcp_22`."""
    return gate_name(host_map(g.proto), str(g.ports))


def direct_map(version: int, proto: str) -> str:
    """The map of the gates of container addresses reached without NAT: `direct_v6_tcp`."""
    return f"direct_v{version}_{proto}"


def direct_map_key(d: DirectGate) -> tuple[str, str]:
    """(map, key as nft writes it) of a direct-routing gate: `direct_v6_tcp`,
    `2001:db8::2 . 80`."""
    return direct_map(d.address.version, d.proto), f"{d.address} . {d.port}"


def direct_stem(d: DirectGate) -> str:
    """The chain and counter stem of a direct-routing gate (see gate_name)."""
    return gate_name(*direct_map_key(d))


def refuse(counter: str, text: str, match: str = "", why: str = "") -> str:
    """The refusal of one drop point: counted, reported (kernel rate-limited), dropped. Two
    rules, because `limit` ends a rule once over budget and the drop must happen anyway.
    `why` follows the counter in the log prefix when the counter alone does not tell (a ban
    refused in a port's chain)."""
    logged = f"{LOG_PREFIX}{counter} {why}" if why else f"{LOG_PREFIX}{counter}"
    return (f"\t\t{match}counter name {counter} limit name {LOG_LIMIT} "
            f'log prefix "{logged}" group {LOG_GROUP}\n'
            f"\t\t{match}drop comment {text}")


def decide(counter: str, verdict: Verdict, text: str, match: str = "") -> str:
    """A default's rule: counted under `counter`; refusals reported (see refuse). An `allow`
    default still refuses banned sources."""
    if verdict == "allow":
        bans = "\n".join(_banned(counter, match))
        return f"{bans}\n\t\t{match}counter name {counter} accept comment {text}"
    return refuse(counter, text, match)


def same_list(a: Sources, b: Sources) -> bool:
    """Equal allow-lists, identity first: the same policy list is the same tuple, and comparing
    (or hashing) 100,000 networks on every watch event is what this avoids."""
    return a.any == b.any and (a.v4 is b.v4 or a.v4 == b.v4) and (a.v6 is b.v6 or a.v6 == b.v6) \
        and a.deny_v4 == b.deny_v4 and a.deny_v6 == b.deny_v6


def chain_order(rs: Ruleset) -> list[Sources]:
    """The allow-lists that get a shared chain, in the order of their names (allow_0, allow_1
    ...): every list the policy names first, so the names and the table's shape depend on the
    policy alone and a port that watch adds later can jump to its list's chain at once; then
    unions of several rules."""
    out: list[Sources] = []
    gates: list[Sources] = [g.sources for g in rs.container_gates]
    gates += [g.sources for g in rs.host.gates] if rs.host else []
    gates += [d.sources for d in rs.direct]
    for s in (*rs.allow_lists, *gates):
        if (s.denies or (not s.any and not s.nobody)) and not any(same_list(s, k) for k in out):
            out.append(s)
    return out


def allow_chains(rs: Ruleset) -> list[tuple[Sources, str]]:
    """Which shared chain render() gives each allow-list (watch's element updates jump to them;
    a full apply gives each port a chain of its own, with its counters)."""
    return [(s, f"allow_{i}") for i, s in enumerate(chain_order(rs))]


@dataclass
class _Renderer:
    lines: list[str]
    sets: dict[Sources, list[tuple[str, str]]]
    elements: bool = True  # False: the structure only (sets without their addresses)
    deny: dict[Sources, list[tuple[str, str]]] = field(default_factory=dict)  # `except` sets
    counts: dict[str, int] = field(default_factory=dict)  # packets each counter starts from
    # staged (dockfence.backends.staged): the address sets are named for this generation and
    # declared without elements; `staged` keeps, by name, what each must hold
    generation: int | None = None
    staged: dict[str, tuple[int, tuple[int, ...], str]] = field(default_factory=dict)

    def counter(self, name: str) -> list[str]:
        """A named counter, starting from what `counts` carries over (a rebuild keeps them)."""
        packets = self.counts.get(name)
        return [f"\tcounter {name} {{", *([f"\t\tpackets {packets} bytes 0"]
                                          if packets else []), "\t}"]

    def shared_chains(self, chains: list[tuple[Sources, str]]) -> None:
        """Every allow-list the policy names gets its sets and a shared chain from the start,
        named by the policy alone: watch adds a new port as one map element jumping there."""
        for sources, name in chains:
            if sources.any:  # `any except ...`: no allow sets, but a name of its own
                self.sets.setdefault(sources, [])
            self.gate_chain(name, comment(f"allow-list {name}"), sources, sets_named=name)
        self.lines += [f"\tchain {ALLOW_ANY} {{", *_banned(COUNTER_BANNED), "\t\taccept", "\t}"]

    def allow_sets(self, sources: Sources, name: str | None = None) -> list[tuple[str, str]]:
        """(family match, set name) of an allow-list's address sets, emitted once per list."""
        known = next((k for k in self.sets if same_list(k, sources)), None)
        if known is not None:
            return self.sets[known]
        name = name or f"allow_{len(self.sets)}"
        self.sets[sources] = self._address_sets(sources, name, sources.v4, sources.v6)
        return self.sets[sources]

    def deny_sets(self, sources: Sources) -> list[tuple[str, str]]:
        """(family match, set name) of the addresses an allow-list's `except` refuses."""
        known = next((k for k in self.deny if same_list(k, sources)), None)
        if known is not None:
            return self.deny[known]
        self.deny[sources] = self._address_sets(sources, f"deny_{len(self.deny)}",
                                                sources.deny_v4, sources.deny_v6)
        return self.deny[sources]

    def refusals(self, counter: str, sources: Sources) -> list[str]:
        """`except`: refused before anything is accepted, counted and reported as refusals."""
        if not sources.denies:
            return []
        text = comment(TAG_EXCEPT, ", ".join(sources.names))
        return [refuse(counter, text, f"{fam} saddr @{sname} ")
                for fam, sname in self.deny_sets(sources)]

    def _address_sets(self, sources: Sources, name: str, v4: tuple[int, ...],
                      v6: tuple[int, ...]) -> list[tuple[str, str]]:
        out = []
        staged = self.generation is not None
        for fam, version, blocks in (("ip", 4, v4), ("ip6", 6, v6)):
            if blocks:
                sname = staged_name(name, version, self.generation)
                elements = ", ".join(addresses.show_all(version, blocks)) \
                    if self.elements and not staged else ""
                declaration = [
                    f"\tset {sname} {{",
                    f"\t\ttype {'ipv4_addr' if fam == 'ip' else 'ipv6_addr'}",
                    "\t\tflags interval",
                    # how the policy wrote it, so status can say "office" again
                    *([f"\t\tcomment {comment(', '.join(sources.names))}"]
                      if sources.names else []),
                ]
                self.lines += [*declaration,
                               *([f"\t\telements = {{ {elements} }}"] if elements else []),
                               "\t}"]
                if staged:
                    self.staged[sname] = (version, blocks, "\n".join([*declaration, "\t}"]))
                out.append((fam, sname))
        return out

    def gate_chain(self, name: str, text: str, sources: Sources,
                   sets_named: str | None = None) -> str:
        """One chain per gate, so each port counts its own allowed and refused connections
        (and one per allow-list, shared: see shared_chains)."""
        tests = [""] if sources.any else [] if sources.nobody else [
            f"{fam} saddr @{sname} " for fam, sname in self.allow_sets(sources, sets_named)]
        denied = self.refusals(f"{name}_refused", sources) if tests else []
        self.lines += [*self.counter(f"{name}_allowed"), *self.counter(f"{name}_refused"),
                       f"\tchain {name} {{",
                       *(_banned(f"{name}_refused") if tests else []),
                       *denied,
                       *(f"\t\t{t}counter name {name}_allowed accept" for t in tests),
                       *([] if sources.any else [refuse(f"{name}_refused", text)]),
                       "\t}"]
        return f"goto {name}"

    def verdict_map(self, name: str, key_type: str, interval: bool,
                    entries: list[tuple[str, str, Sources]]) -> None:
        """A map from `key` to the chain deciding its allow-list; entries: (key, comment,
        sources)."""
        # Elements first: they emit the chains and sets they jump to, which must come before.
        elements = ", ".join(
            f"{key} comment {text} : {self.gate_chain(gate_name(name, key), text, sources)}"
            for key, text, sources in entries)
        self.lines += [f"\tmap {name} {{", f"\t\ttype {key_type} : verdict",
                       *(["\t\tflags interval"] if interval else [])]
        if elements:
            self.lines.append(f"\t\telements = {{ {elements} }}")
        self.lines.append("\t}")

    def port_map(self, name: str, gates: list[Gate]) -> None:
        self.verdict_map(name, "inet_service", True,
                         [(str(g.ports), comment(g.label, g.origin), g.sources) for g in gates])

    def addr_map(self, name: str, addr_type: str, gates: list[Gate]) -> None:
        self.verdict_map(name, f"{addr_type} . inet_service", False,
                         [(gate_map_key(g)[1], comment(g.label, g.origin), g.sources)
                          for g in gates])

    def direct_map(self, name: str, addr_type: str, gates: list[DirectGate]) -> None:
        self.verdict_map(name, f"{addr_type} . inet_service", False,
                         [(direct_map_key(g)[1], comment(g.label, g.origin), g.sources)
                          for g in gates])


_DIRECT_MAPS = (("ip", "ipv4_addr", 4), ("ip6", "ipv6_addr", 6))


def _banned(counter: str, match: str = "") -> list[str]:
    """Refuse banned sources (dockfence ban) under `counter`, before anything admits them."""
    why = "" if counter == COUNTER_BANNED else TAG_BANNED  # that counter says it already
    return [refuse(counter, comment(TAG_BANNED), f"{match}{fam} saddr @{BAN_SETS[v]} ", why)
            for fam, v in (("ip", 4), ("ip6", 6))]


def _ban_set(version: int, elements: str = "") -> str:
    """A ban set's declaration; `elements` as nft writes them (see with_bans)."""
    return "\n".join([f"\tset {BAN_SETS[version]} {{", f"\t\ttype ipv{version}_addr",
                      "\t\tflags interval,timeout",
                      *([f"\t\telements = {{ {elements} }}"] if elements else []), "\t}"])


def _ban_sets() -> list[str]:
    return [_ban_set(version) for version in BAN_SETS]


def with_bans(table: str, held: dict[int, list[tuple[int, int | None]]]) -> str:
    """A rendered table with its ban sets holding `held` (dockfence.bans.pieces), written into
    their declarations: `add element` commands after the table would make nft 1.0.6 read every
    element of the table being replaced into its cache first (minutes at a million)."""
    for version, items in held.items():
        if not items:
            continue
        bare = _ban_set(version) + "\n"
        if bare not in table:
            raise OperationalError(f"the table to load has no set {BAN_SETS[version]} to hold "
                                   "the bans: run dockfence apply")
        elements = ", ".join(addresses.show(version, b) + ("" if left is None else
                                                           f" timeout {left}s")
                             for b, left in items)
        table = table.replace(bare, _ban_set(version, elements) + "\n", 1)
    return table


def replace_bans(version: int, held: list[tuple[int, int | None]]) -> None:
    """Make the live ban set of this IP version hold exactly `held` (dockfence.bans.pieces),
    in one transaction over netlink: nft would read every allow-list element first."""
    from . import netlink as nl

    name = BAN_SETS[version]
    _commit([nl.Op(False, name, (), flush=True),
             *nl.block_ops(True, name, addresses.BITS[version], [b for b, _ in held],
                           [None if left is None else left * 1000 for _, left in held])])


def replace_stamp(stamp: Stamp) -> None:
    """Give the live table another stamp (same rules from other bytes), over netlink."""
    _commit(stamp_ops(stamp))


def stamp_ops(stamp: Stamp) -> list[Any]:
    """The netlink operations that replace the table's stamp, for the transaction of the
    change it describes (or alone)."""
    from . import netlink as nl

    return [nl.Op(False, STAMP_SET, (), flush=True),
            nl.Op(True, STAMP_SET, (nl.Element(nl.port_key(1), comment=stamp.text()),))]


def _commit(ops: list[Any]) -> None:
    from . import netlink

    try:
        netlink.commit(TABLE, ops)
    except OSError as exc:
        raise OperationalError(f"cannot update table {TABLE}: {exc}") from None


def _stamp_set(stamp: Stamp | None) -> list[str]:
    return [f"\tset {STAMP_SET} {{", "\t\ttype inet_service",
            *([f"\t\telements = {{ 1 comment {comment(stamp.text())} }}"] if stamp else []),
            "\t}"]



def _loopback_guard() -> list[str]:
    """Drop packets that arrive on any interface but lo addressed to 127.0.0.0/8 or ::1.
    Docker < 28 DNATs them to ports published on 127.0.0.1 (moby#45610), so a neighbour could
    reach a "this host only" port. At priority raw: before conntrack (no entry is made for them)
    and before Docker's DNAT. The host's own loopback traffic arrives on lo; replies of Docker's
    hairpin NAT (userland proxy off) arrive on a bridge addressed to the bridge, not 127/8."""
    tag = comment(TAG_LOOPBACK)
    return [
        "\tchain loopback_guard {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        f'\t\tiifname != "lo" ip daddr 127.0.0.0/8 counter drop comment {tag}',
        f'\t\tiifname != "lo" ip6 daddr ::1 counter drop comment {tag}',
        "\t}",
    ]


# An address set of a staged load (see dockfence.backends.staged) is named for the load's
# generation: `allow_0_g7_v4`. Everything that compares tables compares them without it.
_STAGED_NAME = re.compile(r"\b((?:allow|deny)_\d+)_g\d+(_v[46])\b")
_ADDRESS_SET = re.compile(r"(?:allow|deny)_\d+(?:_g(\d+))?_v[46]")


def staged_name(name: str, version: int, generation: int | None) -> str:
    """The name of an allow-list's (or `except` list's) set of one IP version: `allow_0_v4`,
    or `allow_0_g7_v4` in a staged load of generation 7."""
    return f"{name}_v{version}" if generation is None else f"{name}_g{generation}_v{version}"


def unstaged(text: str) -> str:
    """`text` with every staged set name as render() writes it outside a staged load."""
    return _STAGED_NAME.sub(r"\1\2", text)


def staged_generation(name: str) -> int | None:
    """The generation in a staged set's name; None for any other name."""
    m = _ADDRESS_SET.fullmatch(name)
    return int(m.group(1)) if m and m.group(1) else None


def is_address_set(name: str) -> bool:
    """Is this the name of an allow-list's or `except` list's set, staged or not?"""
    return _ADDRESS_SET.fullmatch(name) is not None


def has_addressed(rs: Ruleset) -> bool:
    """Does the table need the maps keyed on host address and port? Only while some port is
    published on a specific host address: a host without one gets the table it always had."""
    return any(g.host is not None for g in rs.container_gates)


def render(rs: Ruleset, stamp: Stamp | None = None, elements: bool = True,
           counts: dict[str, int] | None = None) -> str:
    """The whole table as one `nft -f` transaction that replaces any previous version of it.
    Without `elements`, the allow-list sets are declared empty: the structure, cheap at any
    size (see same_structure). `counts`: packets the named counters start from (a rebuild of
    the same rules keeps what they counted)."""
    return "\n".join(_render(rs, stamp, elements, counts).lines) + "\n"


def address_sets(rs: Ruleset) -> tuple[str, dict[str, tuple[int, tuple[int, ...]]]]:
    """The table's structure (render() without elements) and, by set name, the IP version and
    blocks of every address set: what a refreshed list changes when nothing else does."""
    r = _render(rs, elements=False)
    out: dict[str, tuple[int, tuple[int, ...]]] = {}
    for deny, table in ((False, r.sets), (True, r.deny)):
        for sources, names in table.items():
            for fam, name in names:
                v4, v6 = (sources.deny_v4, sources.deny_v6) if deny else (sources.v4, sources.v6)
                out[name] = (4, v4) if fam == "ip" else (6, v6)
    return "\n".join(r.lines) + "\n", out


def render_staged(rs: Ruleset, stamp: Stamp | None, counts: dict[str, int] | None,
                  generation: int) -> tuple[str, dict[str, tuple[int, tuple[int, ...], str]]]:
    """The table of a staged load: render()'s, but its address sets named for `generation`
    and declared empty; and, by set name, the IP version, blocks and declaration of each."""
    r = _render(rs, stamp, True, counts, generation)
    return "\n".join(r.lines) + "\n", r.staged


def _render(rs: Ruleset, stamp: Stamp | None = None, elements: bool = True,
            counts: dict[str, int] | None = None, generation: int | None = None) -> _Renderer:
    from ..model import PROTOS

    r = _Renderer(lines=[], sets={}, elements=elements, counts=counts or {},
                  generation=generation)
    r.lines += [f"table {FAMILY} {TABLE} {{", TABLE_COMMENT,
                *_stamp_set(stamp), *_ban_sets(),
                *(line for c in (COUNTER_UNKNOWN, COUNTER_DIRECT, COUNTER_HOST, COUNTER_REVOKED,
                                 COUNTER_BANNED) for line in r.counter(c)),
                f"\tlimit {LOG_LIMIT} {{", f"\t\trate {LOG_RATE}", "\t}"]
    r.shared_chains(allow_chains(rs))
    for proto in PROTOS:
        r.port_map(f"{proto}_ports", [g for g in rs.container_gates
                                      if g.proto == proto and g.host is None])
    addressed = has_addressed(rs)
    if addressed:
        for _, addr_type, version in _DIRECT_MAPS:
            for proto in PROTOS:
                r.addr_map(addr_map(version, proto), addr_type,
                           [g for g in rs.container_gates if g.proto == proto
                            and g.host is not None and g.host.version == version])
    if rs.host is not None:
        for proto in PROTOS:
            r.port_map(host_map(proto), [g for g in rs.host.gates if g.proto == proto])
    for _, addr_type, version in _DIRECT_MAPS:
        for proto in PROTOS:
            r.direct_map(direct_map(version, proto), addr_type,
                         [g for g in rs.direct if g.proto == proto
                          and g.address.version == version])

    revoked = (f"\t\tct mark {REVOKED_MARK:#x} counter name {COUNTER_REVOKED} drop comment "
               f"{comment(TAG_REVOKED)}")
    # Docker's bridges: a named set that watch extends with one element update, holding the
    # patterns of Docker's own names, so a network created after the apply is known at once.
    r.lines += [f"\tset {BRIDGE_SET} {{", "\t\ttype ifname", "\t\tflags interval",
                *([f"\t\telements = {{ {_ifnames(rs.docker_bridges)[2:-2]} }}"]
                  if rs.docker_bridges else []), "\t}"]
    # Outside means: the interfaces the policy names, else everything but Docker's bridges.
    scope = [f"\t\tiifname != {_ifnames(rs.outside)} accept" if rs.outside is not None
             else f"\t\tiifname @{BRIDGE_SET} accept"]
    r.lines += [
        "\tchain forward {",
        f"\t\ttype filter hook forward priority {PRIORITY}; policy accept;",
        revoked,
        "\t\tct state established,related accept",
        '\t\tiifname "lo" accept',
        *scope,
        # Gated ports first, whichever bridge they lead to: a container recreated on a network
        # that appeared after the last apply keeps its allow-list. A port published on one
        # host address is keyed on that address first.
        *(f"\t\tct status dnat meta l4proto {proto} ct original {match} daddr . "
          f"ct original proto-dst vmap @{addr_map(version, proto)}"
          for proto in (PROTOS if addressed else ()) for match, _, version in _DIRECT_MAPS),
        "\t\tct status dnat meta l4proto tcp ct original proto-dst vmap @tcp_ports",
        "\t\tct status dnat meta l4proto udp ct original proto-dst vmap @udp_ports",
        # Fail closed: Docker's DNAT only rewrites traffic addressed to the host itself, so a
        # DNATed connection from outside that no gate names is a port published since the last
        # apply, on whatever network (known, created since, or named in no set).
        decide(COUNTER_UNKNOWN, rs.unknown_published, comment(TAG_UNKNOWN, rs.unknown_origin),
               "ct status dnat "),
        f"\t\toifname @{BRIDGE_SET} goto to_containers",
        "\t}",
        "\tchain to_containers {",
        *(f"\t\t{match} daddr . {proto} dport vmap @{direct_map(version, proto)}"
          for match, _, version in _DIRECT_MAPS for proto in PROTOS),
        refuse(COUNTER_DIRECT, comment(TAG_DIRECT)),
        "\t}",
        "\tchain input {",
        f"\t\ttype filter hook input priority {PRIORITY}; policy accept;",
        revoked,
        "\t\tct state established,related accept",
        '\t\tiifname "lo" accept',
        *scope,
        *(f"\t\t{match} daddr . {proto} dport vmap @{addr_map(version, proto)}"
          for proto in (PROTOS if addressed else ()) for match, _, version in _DIRECT_MAPS),
        "\t\ttcp dport vmap @tcp_ports",
        "\t\tudp dport vmap @udp_ports",
    ]
    if rs.host is not None:
        r.lines += [
            "\t\tmeta l4proto { icmp, ipv6-icmp } accept",
            "\t\tudp sport 67 udp dport 68 accept",  # DHCP replies are not tracked as replies
            "\t\tudp sport 547 udp dport 546 accept",
            "\t\ttcp dport vmap @host_tcp",
            "\t\tudp dport vmap @host_udp",
            decide(COUNTER_HOST, rs.host.default, comment(TAG_HOST, rs.host.origin)),
        ]
    r.lines += [
        "\t}",
        "\tchain output {",  # the host's side of revoked docker-proxy flows
        f"\t\ttype filter hook output priority {PRIORITY}; policy accept;",
        revoked,
        "\t}",
        *(_loopback_guard() if rs.loopback_guard else []),
        "}",
    ]
    return r


def transaction(table: str) -> str:
    """Create-if-missing, delete, recreate: one atomic batch with no window in between.
    `table` is what render() made."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + table


def live_bans() -> dict[str, int | None] | None:
    """Banned networks in the live table -> seconds left (None: no timeout); None when
    dockfence is not applied."""
    found: dict[str, int | None] = {}
    for name in BAN_SETS.values():
        proc = run(["nft", "-j", "list", "set", FAMILY, TABLE, name], check=False)
        if proc.returncode != 0:
            return None
        for obj in json.loads(proc.stdout).get("nftables", []):
            for elem in obj.get("set", {}).get("elem", []):
                val, left = elem, None
                if isinstance(elem, dict) and "elem" in elem:
                    val, left = elem["elem"]["val"], elem["elem"].get("expires")
                text = _elem_text(val)
                found[text[:-3] if text.endswith(("/32", "/128")) else text] = left
    return found


def live_stamp_present() -> bool:
    """Is dockfence's table loaded?"""
    return read_stamp()[0]


def read_stamp() -> tuple[bool, Stamp | None]:
    """(the table exists, its stamp or None), from one small set over netlink: cheap whatever
    the lists hold, and no nft process."""
    from . import netlink

    try:
        comments = netlink.element_comments(TABLE, STAMP_SET)
        if comments is None:  # no such set: no table at all, or one too old to carry a stamp
            return netlink.table_handle(TABLE) is not None, None
    except OSError as exc:
        raise OperationalError(f"cannot read table {TABLE}: {exc}") from None
    return True, next((s for s in map(Stamp.parse, comments) if s is not None), None)


def live_stamp() -> Stamp | None:
    """The stamp of the live table (one small set: cheap whatever the lists hold), or None when
    dockfence is not applied or the table carries no valid stamp."""
    return read_stamp()[1]


def removal() -> str:
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


# --- live state -------------------------------------------------------------------------------

def live_json() -> dict[str, Any] | None:
    """The live table as nft JSON without stateful values, or None if dockfence is not installed."""
    return live_json_later()()


def live_json_later() -> Callable[[], dict[str, Any] | None]:
    """live_json(), with nft listing the table from now on: the returned function waits for it.
    Listing 100,000 addresses takes nft seconds; the caller parses and compiles meanwhile."""
    listing = background(["nft", "-j", "-s", "list", "table", FAMILY, TABLE], check=False,
                         timeout=WHOLE_TABLE_TIMEOUT)

    def result() -> dict[str, Any] | None:
        proc = listing()
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
                return None
            raise OperationalError(f"nft list table failed: {proc.stderr.strip()}")
        with addresses.no_gc():  # a dict per set element, no cycles
            return json.loads(proc.stdout)  # type: ignore[no-any-return]
    return result


def live_counters() -> dict[str, int] | None:
    """Packets counted by each named counter of the live table (read over netlink: cheap
    whatever the lists hold), or None when dockfence is not applied."""
    from . import netlink

    try:
        return netlink.counters(TABLE)
    except OSError as exc:
        raise OperationalError(f"cannot read the counters of {TABLE}: {exc}") from None


def live_generation() -> tuple[int, Stamp | None] | None:
    """Changes whenever the rules are replaced, so readers of the rules know when to read them
    again; None when dockfence is not applied. The table's kernel handle (a whole-table load
    recreates it) and its stamp (a staged load keeps the table, and stamps what it loads).
    Over netlink: no nft process in the refusal reader's loop."""
    from . import netlink

    try:
        handle = netlink.table_handle(TABLE)
    except OSError as exc:
        raise OperationalError(f"cannot read table {TABLE}: {exc}") from None
    return None if handle is None else (handle, live_stamp())


def live_text() -> str | None:
    proc = run(["nft", "-s", "list", "table", FAMILY, TABLE], check=False,
               timeout=WHOLE_TABLE_TIMEOUT)
    return proc.stdout if proc.returncode == 0 else None


_COUNTS = ("packets", "bytes")


def canonical(doc: dict[str, Any] | None, elements: bool = True) -> str | None:
    """A listing with kernel handles and version info stripped, for exact comparisons; without
    the elements of sets and maps when `elements` is False (the table's structure)."""
    if doc is None:
        return None

    drop = {"handle"} if elements else {"handle", "elem"}
    items = []
    bans = set(BAN_SETS.values())
    for obj in doc.get("nftables", []):
        # handles sit on the table, set, map, chain and rule objects themselves, never deeper;
        # named counters list their values even with -s: they are state, not rules; banned
        # addresses come and go by themselves and are not the policy's
        items.append({kind: {k: v for k, v in body.items()
                             if k not in drop and not (kind == "counter" and k in _COUNTS)
                             and not (k == "elem" and body.get("name") in bans)}
                      for kind, body in obj.items() if kind != "metainfo"})
    # The kernel lists objects in the order they were made (a staged load makes its sets
    # first) and rules in their chain's order, which decides: declarations compare as a set,
    # rules chain by chain. A staged load's set names carry its generation: left out.
    rules: dict[str, list[str]] = {}
    declared = []
    for i in items:
        if "rule" in i:
            rules.setdefault(i["rule"].get("chain", ""), []).append(json.dumps(i, sort_keys=True))
        elif i:
            declared.append(json.dumps(i, sort_keys=True))
    ordered = sorted(declared) + [r for chain in sorted(rules) for r in rules[chain]]
    return unstaged("[" + ", ".join(ordered) + "]")


def canonical_of(table: str, elements: bool = True) -> str:
    """How the kernel lists a rendered table: loaded into a throwaway network namespace and
    listed back. With `elements` False only the structure is loaded: cheap at any list size."""
    if not elements:
        table = "".join(line for line in table.splitlines(keepends=True)
                        if not line.startswith("\t\telements = {"))
    script = f'nft -f - && nft -j -s list table {FAMILY} {TABLE}'
    proc = run(["unshare", "--net", "--", "sh", "-c", script], stdin=table,
               timeout=WHOLE_TABLE_TIMEOUT)
    return canonical(json.loads(proc.stdout), elements) or ""


def same_structure(doc: dict[str, Any], table: str) -> bool:
    """Has the live table (a listing) exactly the chains, rules and declarations of `table`
    (what render() made, with or without elements)? Elements are compared by same_table(), on
    parsed rulesets."""
    return canonical(doc, elements=False) == canonical_of(table, elements=False)


def _listed(rs: Ruleset) -> tuple[Any, ...]:
    """Everything render() writes of a ruleset, with text as its comments carry it (made safe,
    cut at 127 characters), so a ruleset parsed back from the kernel compares equal to the one
    that was rendered."""
    order = chain_order(rs)

    def src(s: Sources) -> tuple[Any, ...]:
        named = s.names and (s.denies or (not s.any and not s.nobody))
        # lists of the same addresses share sets, which carry the names of the first of them
        names = next((k.names for k in order if same_list(k, s)), s.names) if named else ()
        return (s.any, s.v4, s.v6, s.deny_v4, s.deny_v6,
                comment(", ".join(names)) if named else None)

    def gates(gs: tuple[Gate, ...]) -> tuple[Any, ...]:
        return tuple((g.proto, g.ports, g.host, src(g.sources), comment(g.label, g.origin))
                     for g in sorted(gs, key=_gate_order))

    return (gates(rs.container_gates), rs.unknown_published,
            comment(TAG_UNKNOWN, rs.unknown_origin), rs.outside, tuple(sorted(rs.docker_bridges)),
            tuple((d.address, d.proto, d.port, src(d.sources), comment(d.label, d.origin))
                  for d in rs.direct),
            None if rs.host is None else (gates(rs.host.gates), rs.host.default,
                                          comment(TAG_HOST, rs.host.origin)))


def _gate_order(g: Gate) -> tuple[int, int, str, PortRange]:
    """Port gates first, then by address; per protocol as parse_live lists them."""
    host = g.host
    return (0 if host is None else host.version, 0 if host is None else int(host), g.proto,
            g.ports)


def same_table(live: Ruleset, desired: Ruleset) -> bool:
    """Would render() write the same table (but for the stamp) for both rulesets? `live` is
    parse_live()'s or a record's; the lists compare as sorted integer tuples, in C."""
    return _listed(live) == _listed(desired)


def apply_text(text: str) -> None:
    apply_text_later(text)()


def apply_text_later(text: str) -> Callable[[], object]:
    """apply_text(), with nft loading from now on: the returned function waits for it and
    raises what apply_text() would. nft takes seconds over a big table, on another CPU."""
    return background(["nft", "-f", "-"], stdin=text, timeout=WHOLE_TABLE_TIMEOUT)


# --- parsing the live table back into a ruleset ------------------------------------------------

def _elem_text(elem: Any) -> str:
    """A listed interval-set element as text parse_many() takes: an address or a prefix."""
    if isinstance(elem, str):
        return elem
    if "prefix" in elem:
        return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
    if "elem" in elem:
        return _elem_text(elem["elem"]["val"])
    raise ValueError(elem)


def _set_blocks(version: int, elems: list[Any]) -> list[int]:
    """The blocks of a listed interval set: addresses and prefixes in bulk (C loops), ranges
    (a hand-written `a-b`) one by one."""
    # the two shapes nft lists for what dockfence writes, inline: no call per element
    texts = [e if e.__class__ is str else
             f"{e['prefix']['addr']}/{e['prefix']['len']}" if "prefix" in e else ""
             for e in elems]
    ranges = []
    if "" in texts:  # anything else (ranges, wrapped elements): one by one
        odd = [e for e, t in zip(elems, texts, strict=True) if not t]
        texts = list(filter(None, texts))
        for e in odd:
            try:
                texts.append(_elem_text(e))
            except (ValueError, KeyError, TypeError):
                ranges.append(e.get("range") if isinstance(e, dict) else None)
    try:
        blocks = addresses.parse_many(texts)[version == 6]
    except addresses.BadEntry as exc:
        raise OperationalError(f"unexpected set element in live table: {exc.text!r}") from None
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2):
            raise OperationalError(f"unexpected set element in live table: {r!r}")
        first, last = (addresses.parse(a)[1] >> 8 for a in r)
        blocks += addresses.of_range(version, first, last)
    return blocks


def _ports(val: Any) -> PortRange:
    from ..model import PortRange

    if isinstance(val, int):
        return PortRange(val, val)
    if isinstance(val, dict) and "range" in val:
        return PortRange(int(val["range"][0]), int(val["range"][1]))
    raise OperationalError(f"unexpected map key in live table: {val!r}")


def _split(text: str) -> tuple[str, str]:
    label, _, origin = text.partition(" | ")
    return label, origin


def _key(key: Any) -> tuple[Any, tuple[str, str]]:
    """A map element's key and its `label | origin` comment."""
    if isinstance(key, dict) and "elem" in key:
        return key["elem"]["val"], _split(key["elem"].get("comment", ""))
    return key, ("", "")


def parse_live(doc: dict[str, Any]) -> Ruleset:
    """Rebuild the ruleset dockfence installed from the live listing (for status and plan)."""
    from ..model import PROTOS, DirectGate, Gate, HostRules, PortRange, Ruleset, Sources

    sets: dict[str, tuple[int, ...]] = {}
    bridges: tuple[str, ...] = ()
    set_names: dict[str, tuple[str, ...]] = {}
    maps: dict[str, list[Any]] = {}
    rules: dict[str, list[dict[str, Any]]] = {}
    for obj in doc.get("nftables", []):
        if "set" in obj and obj["set"]["name"] == BRIDGE_SET:
            bridges = tuple(obj["set"].get("elem", []))
        elif "set" in obj and obj["set"]["name"] != STAMP_SET:
            s = obj["set"]
            version = 6 if s.get("type") == "ipv6_addr" else 4
            blocks = _set_blocks(version, s.get("elem", []))
            # What dockfence wrote was collapsed already and nft lists it in order; sorting
            # (integers: cheap, and a no-op on sorted input) makes a hand-edited set compare
            # as a set too.
            blocks.sort()
            sets[s["name"]] = tuple(blocks)
            if s.get("comment"):
                set_names[s["name"]] = tuple(s["comment"].split(", "))
        elif "map" in obj:
            maps[obj["map"]["name"]] = obj["map"].get("elem", [])
        elif "rule" in obj:
            rules.setdefault(obj["rule"]["chain"], []).append(obj["rule"])

    def sources_of(verdict: dict[str, Any]) -> Sources:
        if "accept" in verdict:
            return Sources(any=True)
        if "drop" in verdict:
            return Sources()
        # a gate chain (see _Renderer.gate_chain): one accept per address set, or a bare one
        target = (verdict.get("jump") or verdict.get("goto") or {}).get("target", "")
        accepts = [r["expr"] for r in rules.get(target, []) if any("accept" in e for e in
                                                                    r["expr"])]
        refs = [e["match"]["right"][1:] for expr in accepts for e in expr
                if isinstance(e.get("match", {}).get("right"), str)
                and e["match"]["right"].startswith("@")]
        denies = [e["match"]["right"][1:] for r in rules.get(target, [])
                  if any("drop" in e for e in r["expr"]) for e in r["expr"]
                  if isinstance(e.get("match", {}).get("right"), str)
                  and e["match"]["right"].startswith("@deny_")]
        d4 = next((sets[r] for r in denies if r.endswith("_v4")), ())
        d6 = next((sets[r] for r in denies if r.endswith("_v6")), ())
        names = next((set_names[r] for r in refs + denies if r in set_names), ())
        if accepts and not refs:
            return Sources(any=True, names=names if d4 or d6 else (), deny_v4=d4, deny_v6=d6)
        v4 = next((sets[r] for r in refs if r.endswith("_v4")), ())
        v6 = next((sets[r] for r in refs if r.endswith("_v6")), ())
        return Sources(v4=v4, v6=v6, names=names, deny_v4=d4, deny_v6=d6)

    def gates(map_name: str, proto: str) -> list[Gate]:
        out = []
        for key, verdict in maps.get(map_name, []):
            val, (label, origin) = _key(key)
            out.append(Gate(proto, _ports(val), sources_of(verdict), label, origin))  # type: ignore[arg-type]
        return sorted(out, key=lambda g: g.ports)

    def addressed(version: int, proto: str) -> list[Gate]:
        out = []
        for key, verdict in maps.get(addr_map(version, proto), []):
            val, (label, origin) = _key(key)
            address, port = val["concat"]
            host = ipaddress.ip_address(address)
            out.append(Gate(proto, PortRange(int(port), int(port)),  # type: ignore[arg-type]
                            sources_of(verdict), label, origin, host))
        return sorted(out, key=_gate_order)

    def direct(map_name: str, proto: str) -> list[DirectGate]:
        out = []
        for key, verdict in maps.get(map_name, []):
            val, (label, origin) = _key(key)
            address, port = val["concat"]
            out.append(DirectGate(ipaddress.ip_address(address), proto, int(port),  # type: ignore[arg-type]
                                  sources_of(verdict), label, origin))
        return out

    def tagged(chain: str, tag: str) -> tuple[Verdict, str] | None:
        for rule in rules.get(chain, []):
            label, origin = _split(rule.get("comment", ""))
            if label == tag:
                verdict: Verdict = "allow" if any("accept" in e for e in rule["expr"]) else "deny"
                return verdict, origin
        return None

    def outside() -> tuple[str, ...] | None:
        """The interface names of the forward rule `iifname != {...} accept`, if any."""
        for rule in rules.get("forward", []):
            for e in rule["expr"]:
                m = e.get("match", {})
                if m.get("left") == {"meta": {"key": "iifname"}} and m.get("op") == "!=":
                    right = m["right"]
                    return tuple(sorted(right["set"])) if isinstance(right, dict) else (right,)
        return None

    unknown = tagged("forward", TAG_UNKNOWN) or ("deny", "")
    host_default = tagged("input", TAG_HOST)
    # a drop (never an accept) makes the guard; absent in tables made before it existed
    guard = tagged("loopback_guard", TAG_LOOPBACK)
    host = None
    if host_default is not None:
        host = HostRules(tuple(g for proto in PROTOS for g in gates(host_map(proto), proto)),
                         host_default[0], host_default[1])
    return Ruleset(
        container_gates=tuple(gates("tcp_ports", "tcp") + gates("udp_ports", "udp") + [
            g for proto in PROTOS for v in (4, 6) for g in addressed(v, proto)]),
        unknown_published=unknown[0],
        unknown_origin=unknown[1],
        outside=outside(),
        docker_bridges=bridges,
        direct=tuple(g for _, _, version in _DIRECT_MAPS for proto in PROTOS
                     for g in direct(direct_map(version, proto), proto)),
        host=host,
        loopback_guard=guard is not None and guard[0] == "deny",
    )
