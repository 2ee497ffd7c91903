"""The pure data model: ports, address sets, the container inventory and the ruleset.

Nothing here touches the host; every type is immutable so compiled rulesets can be compared.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

# Linux interface names: at most 15 bytes, no '/', ':' or white space; a trailing `*` makes a
# prefix (`wg*`), which nftables matches natively.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$|^[A-Za-z0-9_.@-]{1,14}\*$")

Proto = Literal["tcp", "udp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp")
Verdict = Literal["allow", "deny"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, order=True)
class PortRange:
    first: int
    last: int

    def __post_init__(self) -> None:
        if not (1 <= self.first <= self.last <= 65535):
            raise ValueError(f"invalid port range {self.first}-{self.last}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def overlaps(self, other: PortRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, order=True)
class PortSpec:
    """A port or port range with its protocol, as the policy writes it (`8000-8100/udp`)."""

    proto: Proto
    ports: PortRange

    def __str__(self) -> str:
        return f"{self.ports}/{self.proto}"


def _span(n: IPNetwork) -> tuple[int, int]:
    start = int(n.network_address)
    return start, start + (1 << (n.max_prefixlen - n.prefixlen)) - 1


def collapse(networks: list[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Merge overlapping and adjacent networks (nftables interval sets reject overlaps), IPv4
    first, each family sorted. Large lists are usually disjoint already: one sorted pass finds
    that, and the costly merge runs only when something touches."""
    out: list[IPNetwork] = []
    for version in (4, 6):
        nets = sorted({n for n in networks if n.version == version}, key=_span)
        spans = [_span(n) for n in nets]
        if any(b[0] <= a[1] + 1 for a, b in itertools.pairwise(spans)):
            out.extend(ipaddress.collapse_addresses(nets))  # type: ignore[arg-type]
        else:
            out.extend(nets)
    return tuple(out)


@dataclass(frozen=True)
class Sources:
    """Who may connect: every address (`any`) or a collapsed list of networks of both families.

    `names` is how the policy wrote it (list names, addresses), for people to read; it takes no
    part in comparisons.
    """

    any: bool = False
    networks: tuple[IPNetwork, ...] = ()
    names: tuple[str, ...] = field(default=(), compare=False)

    @staticmethod
    def of(networks: list[IPNetwork], any_: bool = False, names: tuple[str, ...] = ()) -> Sources:
        if any_:
            return Sources(any=True, names=("any",))
        return Sources(networks=collapse(networks), names=names)

    @property
    def nobody(self) -> bool:
        return not self.any and not self.networks

    def v4(self) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, ipaddress.IPv4Network))

    def v6(self) -> tuple[ipaddress.IPv6Network, ...]:
        return tuple(n for n in self.networks if isinstance(n, ipaddress.IPv6Network))

    def admits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return self.any or any(address in n for n in self.networks)

    def union(self, other: Sources) -> Sources:
        if self.any or other.any:
            return Sources(any=True, names=("any",))
        names = tuple(dict.fromkeys((*self.names, *other.names)))
        if self.networks == other.networks or not other.networks:
            return Sources(networks=self.networks, names=names)  # one rule, several bindings
        if not self.networks:
            return Sources(networks=other.networks, names=names)
        return Sources(networks=collapse([*self.networks, *other.networks]), names=names)

    def describe(self, limit: int = 8) -> str:
        """Short enough for a table cell whatever the size: the policy's own words when known,
        else the first networks; with a count once the list is long."""
        if self.any:
            return "anyone"
        if not self.networks:
            return "nobody"
        count = len(self.networks)
        if self.names:
            text = ", ".join(self.names)
            return f"{text} ({count:,} networks)" if count > limit else text
        shown = ", ".join(show_network(n) for n in self.networks[:limit])
        return shown if count <= limit else f"{shown} and {count - limit:,} more"

    @staticmethod
    def for_verdict(verdict: Verdict) -> Sources:
        """A default (`allow` / `deny`) as an allow-list."""
        return Sources(any=True, names=("any",)) if verdict == "allow" else Sources()

    @staticmethod
    def union_of(many: Iterable[Sources]) -> Sources:
        """Rules add up: the union of all their allow-lists."""
        out = Sources()
        for s in many:
            out = out.union(s)
        return out

    def detail(self, limit: int = 8) -> str:
        """describe(), plus the networks behind the names when there are few."""
        text = self.describe(limit)
        shown = ", ".join(show_network(n) for n in self.networks[:limit])
        if self.names and 0 < len(self.networks) <= limit and text != shown:
            return f"{text} ({shown})"
        return text

    def __str__(self) -> str:
        return self.describe()


def show_network(n: IPNetwork) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)


# --- inventory: what Docker runs -------------------------------------------------------------

@dataclass(frozen=True)
class Binding:
    """One published port: host address:port -> container port, or, on a network in Docker's
    routed mode, the container port opened on the container's own address (no host port)."""

    proto: str  # tcp, udp or sctp: Docker can publish sctp, dockfence only gates tcp and udp
    host_ip: str  # "0.0.0.0", "::", or a specific address
    host_port: int | None  # None: routed mode, no NAT
    container_port: int

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.host_ip).version

    @property
    def loopback_only(self) -> bool:
        return ipaddress.ip_address(self.host_ip).is_loopback

    def host_endpoint(self) -> str:
        ip, port = self.host_ip, self.host_port
        if port is None:
            return f"routed ({'IPv6' if self.family == 6 else 'IPv4'})"
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class Container:
    name: str
    id: str
    service: str | None = None  # com.docker.compose.service
    bindings: tuple[Binding, ...] = ()
    addresses: tuple[str, ...] = ()
    # addresses on networks where Docker opens published ports on the container's own address
    # (gateway mode `routed` or `nat-unprotected`): the only ones direct routing may reach
    routed_addresses: tuple[str, ...] = ()

    def matches(self, selector: str) -> bool:
        return selector in (self.name, self.service)


@dataclass(frozen=True)
class Inventory:
    containers: tuple[Container, ...] = ()
    bridges: tuple[str, ...] = ()  # interface names of Docker's bridge networks
    firewall_backend: str = "iptables"


# What counts as a Docker bridge without asking Docker: the default bridge and the names Docker
# gives user networks (`br-` + 12 hex digits; nft wildcards only match prefixes). Bridges named
# otherwise (`com.docker.network.bridge.name`) are added by name at apply and by watch.
DOCKER_BRIDGE_PATTERNS = ("docker0", "br-*")


def covered_by_patterns(name: str) -> bool:
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1]))
               for p in DOCKER_BRIDGE_PATTERNS)


def bridge_names(bridges: Iterable[str]) -> tuple[str, ...]:
    """The elements of the table's bridge set: the patterns, and every bridge they miss (an
    interval set refuses a name that a wildcard already covers)."""
    extra = sorted({b for b in bridges if not covered_by_patterns(b)})
    return (*DOCKER_BRIDGE_PATTERNS, *extra)


# --- ruleset: what the kernel should enforce --------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """Who may open new connections to a host port (or range), and why.

    `label` says what the port is (container and port), `origin` which policy line decided.
    """

    proto: Proto
    ports: PortRange
    sources: Sources
    label: str
    origin: str

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.proto, self.ports.first, self.ports.last)


@dataclass(frozen=True)
class DirectGate:
    """Who may open new connections straight to a container address and port, without NAT (a
    neighbour routing to the container, or Docker's routed mode): the same allow-list as the
    published host port that leads to it."""

    address: IPAddress
    proto: Proto
    port: int
    sources: Sources
    label: str
    origin: str


def find_gate(gates: Iterable[Gate], proto: str, port: int | None) -> Gate | None:
    """The gate that decides `port`/`proto`, if any (gates never overlap)."""
    return next((g for g in gates if g.proto == proto and port in g.ports), None)


@dataclass(frozen=True)
class HostRules:
    gates: tuple[Gate, ...]
    default: Verdict
    origin: str


@dataclass(frozen=True)
class Ruleset:
    """Backend-neutral description of everything dockfence installs."""

    container_gates: tuple[Gate, ...]
    unknown_published: Verdict  # DNATed ports no gate names (published after apply)
    unknown_origin: str
    outside: tuple[str, ...] | None = None  # when set, only these interfaces are filtered
    # never filtered as sources; where containers live: names and nft wildcards (`br-*`)
    docker_bridges: tuple[str, ...] = ()
    direct: tuple[DirectGate, ...] = ()  # container address:port reachable without NAT
    host: HostRules | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # every allow-list the container rules name, selected or not: each gets its chain at apply,
    # so a container that appears later needs element updates only
    allow_lists: tuple[Sources, ...] = field(default=(), compare=False)
