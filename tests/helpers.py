"""Shared builders for the pure-core tests, and the lab tests' polling."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import TypeVar

from dockfence.inventory import Binding, Container, Inventory
from dockfence.lab import NETNS_DIR, Lab

T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 60, interval: float = 0.1) -> T | None:
    """check's first truthy result, polled every interval seconds; None after timeout seconds.

    Callers assert on it with their own message, so a timeout says what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        time.sleep(interval)
    return None


def container(
    name: str,
    *ports: tuple[str, int, int],
    service: str | None = None,
    addresses: tuple[str, ...] = (),
    host_ip: str = "0.0.0.0",
) -> Container:
    """ports: (proto, host_port, container_port), published on host_ip and on [::]."""
    bindings = []
    for proto, host_port, container_port in ports:
        bindings.append(Binding(proto, host_ip, host_port, container_port))
        if host_ip == "0.0.0.0":
            bindings.append(Binding(proto, "::", host_port, container_port))
    return Container(name, name * 4, service, tuple(bindings), addresses)


def scenario() -> Inventory:
    """The README's example host: django and admin share container port 8080."""
    return Inventory(
        containers=(
            container("django", ("tcp", 8081, 8080), service="web", addresses=("172.17.0.2",)),
            container("admin", ("tcp", 8082, 8080), addresses=("172.17.0.3",)),
            container("postgres", ("tcp", 5432, 5432), addresses=("172.17.0.4",)),
            container("dns", ("udp", 5353, 53), addresses=("172.17.0.5",)),
            container("local", ("tcp", 9000, 9000), host_ip="127.0.0.1"),
            # on a network in routed mode: IPv6 published on the container's own address, no
            # host port; its IPv4 side is NATed as usual
            Container("api", "api" * 4, None,
                      (Binding("tcp", "::", None, 8443), Binding("tcp", "0.0.0.0", 8443, 8443)),
                      ("172.18.0.2", "2001:db8:78::2"), routed_addresses=("2001:db8:78::2",)),
        ),
        bridges=("docker0", "br-0123456789ab"),
    )


POLICY = """\
version: 1
lists:
  office: [203.0.113.0/28, "2001:db8:1::/64"]
host:
  default: deny
  allow:
    - port: 22/tcp
      from: any
containers:
  default: deny
  allow:
    - container: django
      port: 8080/tcp
      from: [office, 198.51.100.7]
    - container: dns
      port: 53/udp
      from: any
    - container: api
      port: 8443/tcp
      from: [office]
"""


def recorded_stamp(lab: Lab) -> str | None:
    """The stamp of dockfence's apply record for the lab host (dockfence.record): while it is
    the live table's, status, log and a no-op apply trust the record."""
    ino = os.stat(NETNS_DIR / lab.host_ns).st_ino
    try:
        with open(f"/run/dockfence/applied.{ino}.json") as fh:
            return str(json.loads(fh.readline())["stamp"])
    except FileNotFoundError:
        return None


def live_stamp(lab: Lab) -> str:
    listed = lab.host_exec("nft", "list", "set", "inet", "dockfence", "stamp").stdout
    found = re.search(r'comment "([^"]+)"', listed)
    assert found, listed
    return found[1]
