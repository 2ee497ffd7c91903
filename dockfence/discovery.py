"""Docker discovery: the only module that talks to the Docker Engine API.

Reads running containers, their published ports and addresses, and the bridge interfaces of
Docker's networks. Uses docker-py's from_env(), which honours DOCKER_HOST and negotiates the
API version.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions

from .errors import OperationalError
from .model import Binding, Container, Inventory

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _client() -> docker.DockerClient:
    try:
        return docker.from_env(timeout=15)
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise OperationalError(f"cannot reach Docker at {where}: {exc}") from None


def bindings_of(ports: dict[str, Any] | None) -> tuple[Binding, ...]:
    """`NetworkSettings.Ports`: {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8081"}] | None}."""
    out: list[Binding] = []
    for key, hosts in (ports or {}).items():
        port, _, proto = key.partition("/")
        for h in hosts or []:
            host_ip = h.get("HostIp") or "0.0.0.0"
            try:
                ipaddress.ip_address(host_ip)
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
                     routed_addresses=tuple(direct))


def bridge_name(net: dict[str, Any]) -> str | None:
    if net.get("Driver") != "bridge":
        return None
    name = (net.get("Options") or {}).get("com.docker.network.bridge.name")
    return name or f"br-{net['Id'][:12]}"


def inventory() -> Inventory:
    client = _client()
    try:
        info = client.api.info()
        networks = client.api.networks()
        routed = {n["Id"]: routed_families(n) for n in networks}
        containers = []
        for summary in client.api.containers():
            try:
                attrs = client.api.inspect_container(summary["Id"])
            except docker.errors.NotFound:
                continue  # gone between list and inspect
            c = container_of(attrs, routed)
            if c is not None:
                containers.append(c)
        bridges = sorted({b for n in networks if (b := bridge_name(n))})
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise OperationalError(f"Docker API error: {exc}") from None
    finally:
        client.close()
    return make_inventory(containers, bridges, firewall_backend(info))


def firewall_backend(info: dict[str, Any]) -> str:
    backend = info.get("FirewallBackend")
    return backend.get("Driver", "iptables") if isinstance(backend, dict) else "iptables"


def make_inventory(containers: Iterable[Container], bridges: Iterable[str],
                   backend: str) -> Inventory:
    """The one way an Inventory is put together, so watch's equals a fresh inventory()."""
    return Inventory(containers=tuple(sorted(containers, key=lambda c: c.name)),
                     bridges=tuple(sorted(set(bridges))), firewall_backend=backend)


class DockerLink:
    """watch's long-lived connection: inspects only what an event names."""

    def __init__(self) -> None:
        self.client = _client()

    def close(self) -> None:
        self.client.close()

    def networks(self) -> tuple[list[str], dict[str, set[int]]]:
        """Docker's bridge names, and the IP versions routed on each network (by id)."""
        try:
            networks = self.client.api.networks()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise OperationalError(f"Docker API error: {exc}") from None
        return ([b for n in networks if (b := bridge_name(n))],
                {n["Id"]: routed_families(n) for n in networks})

    def running(self, cid: str, routed: dict[str, set[int]]) -> Container | None:
        """The container if it runs now (None: stopped, gone, or a name the policy could not
        select, exactly as inventory() would leave it out)."""
        try:
            attrs = self.client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise OperationalError(f"Docker API error: {exc}") from None
        if not (attrs.get("State") or {}).get("Running"):
            return None
        return container_of(attrs, routed)


@dataclass(frozen=True)
class Event:
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
        stream = client.events(decode=True, filters={"type": list(RELEVANT_EVENTS)})
        connected()
        for raw in stream:
            ev = parse_event(raw)
            if ev is not None:
                yield ev
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise OperationalError(f"Docker event stream: {exc}") from None
    finally:
        client.close()


# Changes that can alter the inventory: containers starting or going, networks (bridges) and
# their attachments. Everything else (exec, health, attach ...) is noise.
RELEVANT_EVENTS = {
    "container": {"start", "die", "destroy", "rename", "update"},
    "network": {"create", "destroy", "connect", "disconnect"},
}
