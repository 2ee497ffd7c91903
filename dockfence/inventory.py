"""What Docker runs, as far as the rules depend on it: containers, their published ports and
the bridges. Pure data, built by dockfence.discovery.

Apart from the rules' model (dockfence.model): a no-op `apply` asks Docker and digests this
inventory, and needs none of the rules' types (their classes take ~10 ms to create).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The container labels discovery keeps, raw and bounded (one past each limit, so that
# dockfence.labels can say a limit was passed); dockfence.labels validates them.
PREFIX = "dockfence."
MAX_LABELS = 64  # dockfence labels read per container; more is refused as a whole
MAX_VALUE = 4096  # characters in one label's value


@functools.lru_cache(maxsize=1024)  # a host has a few host addresses and many bindings
def _host_ip(text: str) -> tuple[IPAddress, IPAddress | None]:
    """A binding's host address as Docker wrote it, and the one address it names (None for
    0.0.0.0 and ::), rebuilt from its number: canonical, and without an IPv6 scope (`%eth0`)."""
    address = ipaddress.ip_address(text)
    return address, None if address.is_unspecified else type(address)(int(address))


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
        return _host_ip(self.host_ip)[0].version

    @property
    def loopback_only(self) -> bool:
        return _host_ip(self.host_ip)[0].is_loopback

    @property
    def host_address(self) -> IPAddress | None:
        """The one host address the port is published on; None when published on every
        address of its family (0.0.0.0, ::)."""
        return _host_ip(self.host_ip)[1]

    def host_endpoint(self) -> str:
        ip, port = self.host_ip, self.host_port
        if port is None:
            return f"routed ({'IPv6' if self.family == 6 else 'IPv4'})"
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True)
class Container:
    """A running container, as far as the rules depend on it."""

    name: str
    id: str
    service: str | None = None  # com.docker.compose.service
    bindings: tuple[Binding, ...] = ()
    addresses: tuple[str, ...] = ()
    # addresses on networks where Docker opens published ports on the container's own address
    # (gateway mode `routed` or `nat-unprotected`): the only ones direct routing may reach
    routed_addresses: tuple[str, ...] = ()
    # the container's `dockfence.*` labels, raw (dockfence.labels validates them)
    labels: tuple[tuple[str, str], ...] = ()

    def matches(self, selector: str) -> bool:
        return selector in (self.name, self.service)


@dataclass(frozen=True)
class Inventory:
    """What Docker runs now: containers, bridges and the firewall backend."""

    containers: tuple[Container, ...] = ()
    bridges: tuple[str, ...] = ()  # interface names of Docker's bridge networks
    firewall_backend: str = "iptables"
    docker_version: str = ""  # the daemon's ServerVersion, "" when unknown

    @property
    def docker_guards_loopback(self) -> bool:
        """Docker 28.0+ drops packets from outside addressed to ports it published on
        127.0.0.1; older versions DNAT them to the container (moby#45610)."""
        major = self.docker_version.split(".", 1)[0]
        return major.isdigit() and int(major) >= 28


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
