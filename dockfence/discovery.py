"""Docker discovery: the only module that talks to the Docker Engine API.

Reads running containers, their published ports and addresses, and the bridge interfaces of
Docker's networks, through the small stdlib client in dockfence.dockerapi (it honours
DOCKER_HOST and negotiates the API version as docker-py's from_env() did, without its imports).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from . import dockerapi
from .errors import OperationalError
from .inventory import MAX_LABELS, MAX_VALUE, PREFIX, Binding, Container, Inventory

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _client() -> dockerapi.Client:
    try:
        return dockerapi.Client(timeout=15)
    except dockerapi.DockerError as exc:
        where = os.environ.get("DOCKER_HOST") or dockerapi.DEFAULT_HOST
        raise OperationalError(f"cannot reach Docker at {where}: {exc}") from None


def bindings_of(ports: dict[str, Any] | None) -> tuple[Binding, ...]:
    """`NetworkSettings.Ports`: {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8081"}] | None}."""
    out: list[Binding] = []
    for key, hosts in (ports or {}).items():
        port, _, proto = key.partition("/")
        for h in hosts or []:
            try:
                # canonical text (Docker's own, or a user's `-p 2001:DB8::0001:...`), no scope
                address = ipaddress.ip_address(h.get("HostIp") or "0.0.0.0")
                host_ip = str(type(address)(int(address)))
                # an empty HostPort: routed mode publishes the container port itself
                host_port = int(h["HostPort"]) if h.get("HostPort") else None
                out.append(Binding(proto or "tcp", host_ip, host_port, int(port)))
            except (ValueError, KeyError, TypeError):
                continue  # not a port Docker could have published; nothing to gate
    return tuple(sorted(set(out), key=lambda b: (b.proto, b.host_port or 0, b.container_port,
                                                 b.host_ip)))


DIRECT_MODES = {"routed", "nat-unprotected"}


def routed_families(net: dict[str, Any]) -> set[int]:
    """IP versions for which a network lets outside traffic reach container addresses."""
    options = net.get("Options") or {}
    return {v for v in (4, 6)
            if options.get(f"com.docker.network.bridge.gateway_mode_ipv{v}") in DIRECT_MODES}


def container_of(attrs: dict[str, Any],
                 routed: dict[str, set[int]] | None = None) -> Container | None:
    """A container from `GET /containers/{id}/json`; `routed` maps network ids to the IP
    versions routed on them."""
    name = attrs.get("Name", "").lstrip("/")
    if not _SAFE_NAME.match(name):
        return None
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    service = labels.get("com.docker.compose.service")
    if service is not None and not _SAFE_NAME.match(service):
        service = None  # labels are free text; an odd one cannot be selected by the policy
    settings = attrs.get("NetworkSettings") or {}
    addresses: list[str] = []
    direct: list[str] = []
    for net in (settings.get("Networks") or {}).values():
        families = (routed or {}).get(net.get("NetworkID", ""), set())
        for key, version in (("IPAddress", 4), ("GlobalIPv6Address", 6)):
            if net.get(key):
                addresses.append(net[key])
                if version in families:
                    direct.append(net[key])
    return Container(name=name, id=attrs.get("Id", ""), service=service,
                     bindings=bindings_of(settings.get("Ports")), addresses=tuple(addresses),
                     routed_addresses=tuple(direct), labels=dockfence_labels(labels))


def dockfence_labels(labels: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The `dockfence.*` labels, bounded in number and size (one past each limit, so that
    dockfence.labels can say a limit was passed), sorted so inventories compare equal."""
    found = sorted((k[:200], v[:MAX_VALUE + 1]) for k, v in labels.items()
                   if isinstance(k, str) and isinstance(v, str) and k.startswith(PREFIX))
    return tuple(found[:MAX_LABELS + 1])


def bridge_name(net: dict[str, Any]) -> str | None:
    if net.get("Driver") != "bridge":
        return None
    name = (net.get("Options") or {}).get("com.docker.network.bridge.name")
    return name or f"br-{net['Id'][:12]}"


def network_facts(networks: list[dict[str, Any]]) -> tuple[list[str], dict[str, set[int]]]:
    """From `GET /networks`: Docker's bridge names, and the IP versions routed on each network
    (by id)."""
    return ([b for n in networks if (b := bridge_name(n))],
            {n["Id"]: routed_families(n) for n in networks})


@dataclass(frozen=True)
class Daemon:
    """What doctor needs to know about the Docker daemon."""

    version: str
    firewall_backend: str | None  # None: the Engine does not report it (before 28.1)
    ipv6_networks: tuple[str, ...]


def daemon_facts() -> Daemon:
    """What `dockfence doctor` needs to know about the daemon itself."""
    client = _client()
    try:
        version = str(client.get("/version").get("Version", "?"))
        backend = client.get("/info").get("FirewallBackend")
        networks = client.get("/networks")
    except (dockerapi.DockerError, KeyError, TypeError, AttributeError) as exc:
        raise OperationalError(f"Docker API error: {exc}") from None
    finally:
        client.close()
    return Daemon(version, backend.get("Driver") if isinstance(backend, dict) else None,
                  tuple(sorted(n["Name"] for n in networks if n.get("EnableIPv6"))))


def inventory() -> Inventory:
    client = _client()
    try:
        info = client.get("/info")
        bridges, routed = network_facts(client.get("/networks"))
        containers = []
        for summary in client.get("/containers/json"):
            try:
                attrs = client.get(f"/containers/{summary['Id']}/json")
            except dockerapi.NotFound:
                continue  # gone between list and inspect
            c = container_of(attrs, routed)
            if c is not None:
                containers.append(c)
    except (dockerapi.DockerError, KeyError, TypeError, AttributeError) as exc:
        raise OperationalError(f"Docker API error: {exc}") from None
    finally:
        client.close()
    return make_inventory(containers, bridges, firewall_backend(info),
                          str(info.get("ServerVersion") or ""))


def firewall_backend(info: dict[str, Any]) -> str:
    backend = info.get("FirewallBackend")
    return backend.get("Driver", "iptables") if isinstance(backend, dict) else "iptables"


def make_inventory(containers: Iterable[Container], bridges: Iterable[str],
                   backend: str, version: str = "") -> Inventory:
    """The one way an Inventory is put together, so watch's equals a fresh inventory()."""
    return Inventory(containers=tuple(sorted(containers, key=lambda c: c.name)),
                     bridges=tuple(sorted(set(bridges))), firewall_backend=backend,
                     docker_version=version)


class DockerLink:
    """watch's long-lived connection: inspects only what an event names."""

    def __init__(self) -> None:
        self.client = _client()

    def close(self) -> None:
        self.client.close()

    def networks(self) -> tuple[list[str], dict[str, set[int]]]:
        """Docker's bridge names, and the IP versions routed on each network (by id)."""
        try:
            return network_facts(self.client.get("/networks"))
        except (dockerapi.DockerError, KeyError, TypeError, AttributeError) as exc:
            raise OperationalError(f"Docker API error: {exc}") from None

    def running(self, cid: str, routed: dict[str, set[int]]) -> Container | None:
        """The container if it runs now (None: stopped, gone, or a name the policy could not
        select, exactly as inventory() would leave it out)."""
        try:
            attrs = self.client.get(f"/containers/{quote(cid, safe='')}/json")
        except dockerapi.NotFound:
            return None
        except dockerapi.DockerError as exc:
            raise OperationalError(f"Docker API error: {exc}") from None
        if not (attrs.get("State") or {}).get("Running"):
            return None
        return container_of(attrs, routed)


@dataclass(frozen=True)
class Event:
    """A Docker event that can change the inventory."""

    kind: str  # container | network
    action: str
    id: str  # the container's id (for network connect/disconnect too), or the network's
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name} {self.action}"


def parse_event(ev: dict[str, Any]) -> Event | None:
    """A relevant event from the raw stream, or None."""
    kind, action = ev.get("Type", ""), str(ev.get("Action", "")).split(":")[0]
    if action not in RELEVANT_EVENTS.get(kind, ()):
        return None
    actor = ev.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    target = attrs.get("container", "") if kind == "network" and action in (
        "connect", "disconnect") else actor.get("ID", "")
    return Event(kind, action, str(target), str(attrs.get("name", "?")))


def event_stream(connected: Callable[[], None]) -> Iterator[Event]:
    """Relevant Docker events, live, on one long-lived connection (no read timeout: idle is
    normal). `connected` is called once the daemon accepted the subscription, so that a full
    sync done after it misses nothing. Ends or raises OperationalError when Docker goes."""
    client = _client()
    try:
        stream = client.stream("/events", {"filters": json.dumps({"type": list(RELEVANT_EVENTS)})},
                               idle_ok=True)
        connected()
        for raw in stream:
            ev = parse_event(raw)
            if ev is not None:
                yield ev
    except dockerapi.DockerError as exc:
        raise OperationalError(f"Docker event stream: {exc}") from None
    finally:
        client.close()


# Changes that can alter the inventory: containers starting or going, networks (bridges) and
# their attachments. Everything else (exec, health, attach ...) is noise.
RELEVANT_EVENTS = {
    "container": {"start", "die", "destroy", "rename", "update"},
    "network": {"create", "destroy", "connect", "disconnect"},
}
