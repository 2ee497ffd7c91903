"""nftables backend: render a ruleset as one `nft -f` transaction, read the live table back.

Everything lives in `table inet dockfence`, which Docker never touches. Only the table's drops
matter for enforcement: a drop in any base chain is final, while an accept merely ends our chain
and lets Docker's own chains (iptables or Docker 29's nftables) decide as before.

Paths covered:
- forward: traffic Docker DNATed to a container is matched on the conntrack *original*
  destination port (the host port the user published), never on the container port;
  new connections to a container that were not DNATed (direct routing) are dropped;
- input: the same host ports when docker-proxy serves them (IPv6 to an IPv4-only container);
- input: the host's own ports, when the policy has a `host:` section.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import OperationalError
from ..model import (
    IFNAME_RE,
    PROTOS,
    DirectGate,
    Gate,
    HostRules,
    IPNetwork,
    PortRange,
    Ruleset,
    Sources,
    Verdict,
    show_network,
)
from ..run import run
from ..stamp import Stamp

FAMILY, TABLE = "inet", "dockfence"
PRIORITY = "filter - 10"  # before Docker's iptables-nft/nftables filter chains
TAG_UNKNOWN = "containers.default"
TAG_DIRECT = "direct routing"
TAG_HOST = "host.default"
TAG_REVOKED = "revoked"
# conntrack mark of flows a new policy revoked (see engine.revoke): "df" in the high bytes
REVOKED_MARK = 0x64660001
BRIDGE_SET = "bridges"  # Docker's bridge interfaces: names and wildcards (`br-*`)
STAMP_SET = "stamp"  # one element whose comment is the table's Stamp (see dockfence.stamp)
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/;,()@+=*-]")


def comment(*parts: str) -> str:
    """A quoted nft comment of `label | origin`. Labels hold container names and file paths, so
    anything outside a conservative alphabet is replaced: user text never reaches nft raw."""
    return '"' + " | ".join(_COMMENT_UNSAFE.sub("?", p) for p in parts)[:127] + '"'


def _ifnames(names: tuple[str, ...]) -> str:
    # names were validated (policy) or come from Docker's bridge names; re-check anyway.
    for n in names:
        if not IFNAME_RE.match(n):
            raise OperationalError(f"refusing unsafe interface name {n!r}")
    return "{ " + ", ".join(f'"{n}"' for n in names) + " }"


def same_list(a: Sources, b: Sources) -> bool:
    """Equal allow-lists, identity first: the same policy list is the same tuple, and comparing
    (or hashing) 100,000 networks on every watch event is what this avoids."""
    return a.any == b.any and (a.networks is b.networks or (
        len(a.networks) == len(b.networks) and a.networks == b.networks))


def chain_order(rs: Ruleset) -> list[Sources]:
    """The allow-lists that get a chain, in the order of their names (allow_0, allow_1 ...):
    every list the policy names first, so the names and the table's shape depend on the policy
    alone and a container that appears later finds its chain; then unions of several rules."""
    out: list[Sources] = []
    gates: list[Sources] = [g.sources for g in rs.container_gates]
    gates += [g.sources for g in rs.host.gates] if rs.host else []
    gates += [d.sources for d in rs.direct]
    for s in (*rs.allow_lists, *gates):
        if not s.any and not s.nobody and not any(same_list(s, k) for k in out):
            out.append(s)
    return out


@dataclass
class _Renderer:
    lines: list[str]
    chains: list[tuple[Sources, str]]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def chain_of(self, sources: Sources) -> str:
        if sources.any:
            return "accept"
        if sources.nobody:
            return "drop"
        return "jump " + next(n for s, n in self.chains if same_list(s, sources))

    def allow_chain(self, name: str, sources: Sources) -> None:
        """A chain testing one allow-list's sets."""
        body = []
        for fam, nets in (("ip", sources.v4()), ("ip6", sources.v6())):
            if nets:
                sname = f"{name}_v{fam[-1] if fam == 'ip6' else '4'}"
                elements = ", ".join(show_network(n) for n in nets)
                self.lines += [
                    f"\tset {sname} {{",
                    f"\t\ttype {'ipv4_addr' if fam == 'ip' else 'ipv6_addr'}",
                    "\t\tflags interval",
                    # how the policy wrote it, so status can say "office" again
                    *([f"\t\tcomment {comment(', '.join(sources.names))}"]
                      if sources.names else []),
                    f"\t\telements = {{ {elements} }}",
                    "\t}",
                ]
                body.append(f"\t\t{fam} saddr @{sname} accept")
        self.lines += [f"\tchain {name} {{", *body, "\t\tcounter drop", "\t}"]

    def verdict_map(self, name: str, key_type: str, interval: bool,
                    entries: list[tuple[str, str, Sources]]) -> None:
        """A map from `key` to the verdict of its allow-list; entries: (key, comment, sources)."""
        elements = ", ".join(f"{key} comment {text} : {self.chain_of(sources)}"
                             for key, text, sources in entries)
        self.lines += [f"\tmap {name} {{", f"\t\ttype {key_type} : verdict",
                       *(["\t\tflags interval"] if interval else [])]
        if elements:
            self.lines.append(f"\t\telements = {{ {elements} }}")
        self.lines.append("\t}")

    def port_map(self, name: str, gates: list[Gate]) -> None:
        self.verdict_map(name, "inet_service", True,
                         [(str(g.ports), comment(g.label, g.origin), g.sources) for g in gates])

    def direct_map(self, name: str, addr_type: str, gates: list[DirectGate]) -> None:
        self.verdict_map(name, f"{addr_type} . inet_service", False,
                         [(f"{g.address} . {g.port}", comment(g.label, g.origin), g.sources)
                          for g in gates])


_DIRECT_MAPS = (("v4", "ip", "ipv4_addr", 4), ("v6", "ip6", "ipv6_addr", 6))


def _verdict(v: Verdict) -> str:
    return "accept" if v == "allow" else "drop"


def _stamp_set(stamp: Stamp | None) -> list[str]:
    return [f"\tset {STAMP_SET} {{", "\t\ttype inet_service",
            *([f"\t\telements = {{ 1 comment {comment(stamp.text())} }}"] if stamp else []),
            "\t}"]


def render(rs: Ruleset, stamp: Stamp | None = None) -> str:
    """The whole table as one `nft -f` transaction that replaces any previous version of it."""
    return _render(rs, stamp).text()


def allow_chains(rs: Ruleset) -> list[tuple[Sources, str]]:
    """Which chain render() gives each allow-list (watch adds elements that jump to them)."""
    return [(s, f"allow_{i}") for i, s in enumerate(chain_order(rs))]


def _render(rs: Ruleset, stamp: Stamp | None) -> _Renderer:
    r = _Renderer(lines=[], chains=allow_chains(rs))
    r.lines += [f"table {FAMILY} {TABLE} {{", '\tcomment "managed by dockfence; do not edit"',
                *_stamp_set(stamp)]
    for sources, name in r.chains:
        r.allow_chain(name, sources)
    for proto in PROTOS:
        r.port_map(f"{proto}_ports", [g for g in rs.container_gates if g.proto == proto])
    if rs.host is not None:
        for proto in PROTOS:
            r.port_map(f"host_{proto}", [g for g in rs.host.gates if g.proto == proto])
    for fam, _, addr_type, version in _DIRECT_MAPS:
        for proto in PROTOS:
            r.direct_map(f"direct_{fam}_{proto}", addr_type,
                         [g for g in rs.direct if g.proto == proto
                          and g.address.version == version])

    revoked = f"\t\tct mark {REVOKED_MARK:#x} counter drop comment {comment(TAG_REVOKED)}"
    # Docker's bridges: a named set that watch extends with one element update, holding the
    # patterns of Docker's own names, so a network created after the apply is known at once.
    r.lines += [f"\tset {BRIDGE_SET} {{", "\t\ttype ifname", "\t\tflags interval",
                *([f"\t\telements = {{ {_ifnames(rs.docker_bridges)[2:-2]} }}"]
                  if rs.docker_bridges else []), "\t}"]
    # Outside means: the interfaces the policy names, else everything but Docker's bridges.
    scope = (f"\t\tiifname != {_ifnames(rs.outside)} accept" if rs.outside is not None
             else f"\t\tiifname @{BRIDGE_SET} accept")
    r.lines += [
        "\tchain forward {",
        f"\t\ttype filter hook forward priority {PRIORITY}; policy accept;",
        revoked,
        "\t\tct state established,related accept",
        '\t\tiifname "lo" accept',
        scope,
        # Gated ports first, whichever bridge they lead to: a container recreated on a network
        # that appeared after the last apply keeps its allow-list.
        "\t\tct status dnat meta l4proto tcp ct original proto-dst vmap @tcp_ports",
        "\t\tct status dnat meta l4proto udp ct original proto-dst vmap @udp_ports",
        # Fail closed: Docker's DNAT only rewrites traffic addressed to the host itself, so a
        # DNATed connection from outside that no gate names is a port published since the last
        # apply, on whatever network (known, created since, or named in no set).
        f"\t\tct status dnat counter {_verdict(rs.unknown_published)} comment "
        f"{comment(TAG_UNKNOWN, rs.unknown_origin)}",
        f"\t\toifname @{BRIDGE_SET} goto to_containers",
        "\t}",
        "\tchain to_containers {",
        *(f"\t\t{match} daddr . {proto} dport vmap @direct_{fam}_{proto}"
          for fam, match, _, _ in _DIRECT_MAPS for proto in PROTOS),
        f"\t\tcounter drop comment {comment(TAG_DIRECT)}",
        "\t}",
        "\tchain input {",
        f"\t\ttype filter hook input priority {PRIORITY}; policy accept;",
        revoked,
        "\t\tct state established,related accept",
        '\t\tiifname "lo" accept',
        scope,
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
            f"\t\tcounter {_verdict(rs.host.default)} comment "
            f"{comment(TAG_HOST, rs.host.origin)}",
        ]
    r.lines += [
        "\t}",
        "\tchain output {",  # the host's side of revoked docker-proxy flows
        f"\t\ttype filter hook output priority {PRIORITY}; policy accept;",
        revoked,
        "\t}",
        "}",
    ]
    return r


def transaction(table: str) -> str:
    """Create-if-missing, delete, recreate: one atomic batch with no window in between.
    `table` is what render() made."""
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + table


def stamp_update(stamp: Stamp) -> str:
    """nft commands that replace the table's stamp; part of the same transaction as the change
    it describes."""
    return (f"flush set {FAMILY} {TABLE} {STAMP_SET}\n"
            f"add element {FAMILY} {TABLE} {STAMP_SET} {{ 1 comment {comment(stamp.text())} }}\n")


def live_stamp() -> Stamp | None:
    """The stamp of the live table (one small set: cheap whatever the lists hold), or None when
    dockfence is not applied or the table carries no valid stamp."""
    proc = run(["nft", "-j", "list", "set", FAMILY, TABLE, STAMP_SET], check=False)
    if proc.returncode != 0:
        return None
    for obj in json.loads(proc.stdout).get("nftables", []):
        for elem in obj.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                return Stamp.parse(elem["elem"].get("comment", ""))
    return None


def removal() -> str:
    return f"table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


# --- live state -------------------------------------------------------------------------------

def live_json() -> dict[str, Any] | None:
    """The live table as nft JSON without stateful values, or None if dockfence is not installed."""
    proc = run(["nft", "-j", "-s", "list", "table", FAMILY, TABLE], check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise OperationalError(f"nft list table failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def live_text() -> str | None:
    proc = run(["nft", "-s", "list", "table", FAMILY, TABLE], check=False)
    return proc.stdout if proc.returncode == 0 else None


def canonical(doc: dict[str, Any] | None) -> str | None:
    """A listing with kernel handles and version info stripped, for exact comparisons."""
    if doc is None:
        return None

    items = []
    for obj in doc.get("nftables", []):
        # handles sit on the table, set, map, chain and rule objects themselves, never deeper
        items.append({kind: {k: v for k, v in body.items() if k != "handle"}
                      for kind, body in obj.items() if kind != "metainfo"})
    return json.dumps([i for i in items if i], sort_keys=True)


def canonical_of(table: str) -> str:
    """How the kernel lists a rendered table: loaded into a throwaway network namespace and
    listed back, so that "unchanged" means byte-for-byte what the live kernel would show. The
    load is also the check: if the kernel refuses the table there, nothing live was touched."""
    script = f'nft -f - && nft -j -s list table {FAMILY} {TABLE}'
    proc = run(["unshare", "--net", "--", "sh", "-c", script], stdin=table)
    return canonical(json.loads(proc.stdout)) or ""


def apply_text(text: str) -> None:
    run(["nft", "-f", "-"], stdin=text)


# --- parsing the live table back into a ruleset ------------------------------------------------

def _elem_networks(elem: Any) -> list[IPNetwork]:
    if isinstance(elem, str):
        return [ipaddress.ip_network(elem)]
    if "prefix" in elem:
        p = elem["prefix"]
        return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
    if "range" in elem:
        lo, hi = (ipaddress.ip_address(a) for a in elem["range"])
        return list(ipaddress.summarize_address_range(lo, hi))  # type: ignore[arg-type]
    if "elem" in elem:
        return _elem_networks(elem["elem"]["val"])
    raise OperationalError(f"unexpected set element in live table: {elem!r}")


def _ports(val: Any) -> PortRange:
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
    sets: dict[str, list[IPNetwork]] = {}
    bridges: tuple[str, ...] = ()
    set_names: dict[str, tuple[str, ...]] = {}
    maps: dict[str, list[Any]] = {}
    rules: dict[str, list[dict[str, Any]]] = {}
    for obj in doc.get("nftables", []):
        if "set" in obj and obj["set"]["name"] == BRIDGE_SET:
            bridges = tuple(obj["set"].get("elem", []))
        elif "set" in obj and obj["set"]["name"] != STAMP_SET:
            s = obj["set"]
            sets[s["name"]] = [n for e in s.get("elem", []) for n in _elem_networks(e)]
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
        target = (verdict.get("jump") or verdict.get("goto") or {}).get("target", "")
        v4, v6 = sets.get(f"{target}_v4", []), sets.get(f"{target}_v6", [])
        # What dockfence wrote was collapsed already and nft lists it in order: sorting is
        # enough to compare it with a compiled ruleset, and far cheaper than collapsing again.
        names = set_names.get(f"{target}_v4") or set_names.get(f"{target}_v6") or ()
        return Sources(networks=(*sorted(v4), *sorted(v6)), names=names)  # type: ignore[type-var]

    def gates(map_name: str, proto: str) -> list[Gate]:
        out = []
        for key, verdict in maps.get(map_name, []):
            val, (label, origin) = _key(key)
            out.append(Gate(proto, _ports(val), sources_of(verdict), label, origin))  # type: ignore[arg-type]
        return sorted(out, key=lambda g: g.ports)

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
    host = None
    if host_default is not None:
        host = HostRules(tuple(gates("host_tcp", "tcp") + gates("host_udp", "udp")),
                         host_default[0], host_default[1])
    return Ruleset(
        container_gates=tuple(gates("tcp_ports", "tcp") + gates("udp_ports", "udp")),
        unknown_published=unknown[0],
        unknown_origin=unknown[1],
        outside=outside(),
        docker_bridges=bridges,
        direct=tuple(g for fam, _, _, _ in _DIRECT_MAPS for proto in PROTOS
                     for g in direct(f"direct_{fam}_{proto}", proto)),
        host=host,
    )
