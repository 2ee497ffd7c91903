"""The pure data model of the rules: ports, address sets and the ruleset (what Docker runs is
in dockfence.inventory).

Nothing here touches the host; every type is immutable so compiled rulesets can be compared.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from . import addresses

# Linux interface names: at most 15 bytes, no '/', ':' or white space; a trailing `*` makes a
# prefix (`wg*`), which nftables matches natively.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$|^[A-Za-z0-9_.@-]{1,14}\*$")
_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp))?$")

Proto = Literal["tcp", "udp"]
PROTOS: tuple[Proto, ...] = ("tcp", "udp")
Verdict = Literal["allow", "deny"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, order=True)
class PortRange:
    """A port or an inclusive range of ports."""

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


def parse_port(value: object) -> PortSpec:
    """`8080`, `8080/tcp`, `8000-8100/udp` (tcp when no protocol is given), as a policy or a
    container label writes it; ValueError says what is wrong."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("a port is written 8080, 8080/tcp or 8000-8100/udp")
    m = _PORT_RE.match(str(value).strip().lower())
    if not m:
        raise ValueError("a port is written 8080, 8080/tcp or 8000-8100/udp")
    first = int(m.group(1))
    last = int(m.group(2) or first)
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError("ports are 1 to 65535")
    if last < first:
        raise ValueError("a port range goes from low to high")
    return PortSpec(proto=m.group(3) or "tcp", ports=PortRange(first, last))  # type: ignore[arg-type]


def collapse(networks: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Merge overlapping and adjacent networks, IPv4 first, each family sorted (what
    `ipaddress.collapse_addresses` gives, per family). For callers holding `ipaddress` objects;
    the core works on integer blocks (see dockfence.addresses)."""
    nets = list(networks)
    return tuple(addresses.to_network(v, b) for v in (4, 6)
                 for b in addresses.collapse(v, (addresses.of_network(n) for n in nets
                                                 if n.version == v)))


@dataclass(frozen=True)
class Sources:
    """Who may connect: every address (`any`) or collapsed networks of both families, as sorted
    integer blocks (see dockfence.addresses): a million of them compare, hash and diff at C
    speed.

    `names` is how the policy wrote it (list names, addresses), for people to read; it takes no
    part in comparisons.

    Deny lists (`except:`) make it a pair: an address is admitted when `any` or one of `v4`/`v6`
    holds it, and `deny_v4`/`deny_v6` do not. The deny blocks always lie inside what `any` or
    `v4`/`v6` cover (they are cut to it), and the kernel refuses them before it accepts.
    """

    any: bool = False
    v4: tuple[int, ...] = ()
    v6: tuple[int, ...] = ()
    names: tuple[str, ...] = field(default=(), compare=False)
    deny_v4: tuple[int, ...] = ()
    deny_v6: tuple[int, ...] = ()

    def __hash__(self) -> int:
        # Kept once computed: hashing 100,000 blocks costs a millisecond, and compile and
        # render key their dicts by lists many times over.
        h: int | None = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.any, self.v4, self.v6, self.deny_v4, self.deny_v6))
            object.__setattr__(self, "_hash", h)
        return h

    @staticmethod
    def of(networks: Iterable[IPNetwork], any_: bool = False,
           names: tuple[str, ...] = ()) -> Sources:
        nets = list(networks)
        return Sources.of_blocks([addresses.of_network(n) for n in nets if n.version == 4],
                                 [addresses.of_network(n) for n in nets if n.version == 6],
                                 any_, names)

    @staticmethod
    def of_blocks(v4: Iterable[int], v6: Iterable[int], any_: bool = False,
                  names: tuple[str, ...] = ()) -> Sources:
        if any_:
            return Sources(any=True, names=("any",))
        return Sources(v4=addresses.collapse(4, v4), v6=addresses.collapse(6, v6), names=names)

    def excepting(self, v4: Iterable[int], v6: Iterable[int], names: tuple[str, ...]) -> Sources:
        """These sources but for the given blocks (a rule's `except:`): the denied blocks cut
        to what is admitted, so that an `except` outside `from` changes nothing."""
        d4, d6 = addresses.collapse(4, v4), addresses.collapse(6, v6)
        if not self.any:
            d4, d6 = addresses.intersect(4, self.v4, d4), addresses.intersect(6, self.v6, d6)
        if self.any and not (d4 or d6):
            return Sources(any=True, names=("any",))
        if self.nobody or (d4 == self.v4 and d6 == self.v6 and not self.any):
            return Sources(names=names)  # everything it named is excepted: nobody
        return Sources(self.any, self.v4, self.v6, names, d4, d6)

    @property
    def denies(self) -> bool:
        return bool(self.deny_v4 or self.deny_v6)

    @property
    def nobody(self) -> bool:
        return not self.any and not self.v4 and not self.v6

    @property
    def count(self) -> int:
        return len(self.v4) + len(self.v6)

    @property
    def deny_count(self) -> int:
        return len(self.deny_v4) + len(self.deny_v6)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        """As `ipaddress` objects (slow for long lists: for tests and small ones)."""
        return tuple(addresses.to_network(v, b) for v, blocks in ((4, self.v4), (6, self.v6))
                     for b in blocks)

    def texts(self, limit: int | None = None) -> list[str]:
        """The networks as text, IPv4 first, at most `limit` of them."""
        v4 = self.v4 if limit is None else self.v4[:limit]
        rest = None if limit is None else max(0, limit - len(v4))
        v6 = self.v6 if rest is None else self.v6[:rest]
        return addresses.show_all(4, v4) + addresses.show_all(6, v6)

    def admits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return self.covers(address) and not self.denied(address)

    def covers(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Is the address in `from` (before any `except`)?"""
        blocks = self.v4 if address.version == 4 else self.v6
        return self.any or addresses.contains(address.version, blocks, int(address))

    def denied(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Does an `except` refuse the address?"""
        blocks = self.deny_v4 if address.version == 4 else self.deny_v6
        return addresses.contains(address.version, blocks, int(address))

    def union(self, other: Sources) -> Sources:
        """Rules add up. With deny lists, the union of (A1 minus D1) and (A2 minus D2), each Di
        inside Ai, is exactly (A1 + A2) minus D where D = (D1 & D2) + (D1 - A2) + (D2 - A1):
        an address of D1 is refused by the union exactly when rule 2 does not admit it, that
        is when it is outside A2 or inside D2 (and the same the other way round); an address
        in neither Di is admitted by whichever rule covers it. D lies inside A1 + A2 again."""
        names = tuple(dict.fromkeys((*self.names, *other.names)))
        if self.denies or other.denies:
            return self._union_denying(other, names)
        if self.any or other.any:
            return Sources(any=True, names=("any",))
        if self == other or other.nobody:
            return Sources(v4=self.v4, v6=self.v6, names=names)  # one rule, several bindings
        if self.nobody:
            return Sources(v4=other.v4, v6=other.v6, names=names)
        return Sources.of_blocks(self.v4 + other.v4, self.v6 + other.v6, names=names)

    def _union_denying(self, other: Sources, names: tuple[str, ...]) -> Sources:
        if self == other:
            return Sources(self.any, self.v4, self.v6, names, self.deny_v4, self.deny_v6)
        deny = []
        for v, a1, d1, a2, d2 in ((4, self.v4, self.deny_v4, other.v4, other.deny_v4),
                                  (6, self.v6, self.deny_v6, other.v6, other.deny_v6)):
            parts = list(addresses.intersect(v, d1, d2))
            if not other.any:  # nothing lies outside `any`
                parts += addresses.subtract(v, d1, a2)
            if not self.any:
                parts += addresses.subtract(v, d2, a1)
            deny.append(addresses.collapse(v, parts))
        if self.any or other.any:
            if not (deny[0] or deny[1]):
                return Sources(any=True, names=("any",))
            return Sources(True, (), (), names, deny[0], deny[1])
        return Sources(False, addresses.collapse(4, self.v4 + other.v4),
                       addresses.collapse(6, self.v6 + other.v6), names, deny[0], deny[1])

    def describe(self, limit: int = 8) -> str:
        """Short enough for a table cell whatever the size: the policy's own words when known,
        else the first networks; with a count once the list is long."""
        if self.any and not self.denies:
            return "anyone"
        if self.any and not self.names:
            return f"anyone except {self.deny_count:,} networks"
        if self.nobody:
            return "nobody"
        count = self.count
        if self.names:
            text = ", ".join(self.names)
            return f"{text} ({count:,} networks)" if count > limit else text
        shown = ", ".join(self.texts(limit))
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
        shown = ", ".join(self.texts(limit))
        if self.names and 0 < self.count <= limit and text != shown:
            return f"{text} ({shown})"
        return text

    def __str__(self) -> str:
        return self.describe()


def show_network(n: IPNetwork) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)


# --- ruleset: what the kernel should enforce --------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """Who may open new connections to a host port (or range), and why.

    `label` says what the port is (container and port), `origin` which policy line decided.
    `host`: the host address the gate is keyed on, for a port published on that address only
    (always a single port); None: the port on every host address.
    """

    proto: Proto
    ports: PortRange
    sources: Sources
    label: str
    origin: str
    host: IPAddress | None = None

    def where(self) -> str:
        """`8081`, `203.0.113.1:443`, `[2001:db8::1]:443`: the port as people write it."""
        if self.host is None:
            return str(self.ports)
        return f"[{self.host}]:{self.ports}" if self.host.version == 6 else \
            f"{self.host}:{self.ports}"


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


def find_gate(gates: Iterable[Gate], proto: str, port: int | None,
              host: IPAddress | None = None) -> Gate | None:
    """The gate that decides `port`/`proto` on host address `host` (None: on an address no
    gate is keyed on), if any: the one keyed on that address and port, else the port's own,
    as the kernel looks them up. Port gates never overlap; neither do addressed ones."""
    gates = tuple(gates)
    if host is not None:
        found = next((g for g in gates if g.host == host and g.proto == proto
                      and port in g.ports), None)
        if found is not None:
            return found
    return next((g for g in gates if g.host is None and g.proto == proto and port in g.ports),
                None)


def addressed_gates(gates: Iterable[Gate], proto: str, port: int) -> list[Gate]:
    """The gates keyed on a host address for `port`/`proto`."""
    return [g for g in gates if g.host is not None and g.proto == proto and port in g.ports]


@dataclass(frozen=True)
class HostRules:
    """The host's own ports: one gate per rule, and what happens to the rest."""

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
    # drop packets from outside addressed to loopback addresses (always rendered; False only
    # when read back from a table made before dockfence did this)
    loopback_guard: bool = True
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # every allow-list the container rules name, selected or not: each gets its chain at apply,
    # so a container that appears later needs element updates only
    allow_lists: tuple[Sources, ...] = field(default=(), compare=False)
