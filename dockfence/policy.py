"""Load and validate a version 1 policy file, with file:line errors for every bad value."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from . import addresses, listfiles, located_yaml
from .errors import PolicyError
from .model import IFNAME_RE, PortRange, PortSpec, Sources, Verdict

_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp))?$")
# Docker container names (and compose service names, which are stricter).
NAME_RE = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LIST_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def parse_port(value: object) -> PortSpec:
    """`8080`, `8080/tcp`, `8000-8100/udp` (tcp when no protocol is given)."""
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


parse_network = addresses.parse_network  # an address or CIDR, host bits clear


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str | int) else value


def _ifname(value: object) -> object:
    if value == "lo":
        raise ValueError("loopback is never outside")
    if not isinstance(value, str) or not IFNAME_RE.match(value):
        raise ValueError("not an interface name (1-15 characters: letters, digits, _ . @ -, "
                         "or a prefix ending in *)")
    return value


def _container_name(value: object) -> object:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError("not a container or compose service name")
    return value.lstrip("/")


PortField = Annotated[PortSpec, BeforeValidator(parse_port)]
SourceField = Annotated[list[str | int], BeforeValidator(_as_list), Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)


class _HostRule(_Strict):
    port: PortField
    from_: SourceField = Field(alias="from")


class _ContainerRule(_Strict):
    container: Annotated[str | None, BeforeValidator(_container_name)] = None
    port: PortField | None = None
    host_port: PortField | None = None
    from_: SourceField = Field(alias="from")


class _HostSection(_Strict):
    default: Literal["deny", "allow"] = "deny"
    allow: list[_HostRule] = []


class _ContainerSection(_Strict):
    default: Literal["deny", "allow"] = "deny"
    allow: list[_ContainerRule] = []


class _ListFile(_Strict):
    file: str = Field(min_length=1)


class _Document(_Strict):
    version: Literal[1]
    interfaces: list[Annotated[str, BeforeValidator(_ifname)]] | None = Field(None, min_length=1)
    lists: dict[str, list[str] | _ListFile] = {}
    host: _HostSection | None = None
    containers: _ContainerSection = _ContainerSection()


# --- the validated policy ---------------------------------------------------------------------

@dataclass(frozen=True)
class HostRule:
    port: PortSpec
    sources: Sources
    line: int


@dataclass(frozen=True)
class ContainerRule:
    container: str | None
    port: PortSpec | None  # the container's own port
    host_port: PortSpec | None
    sources: Sources
    line: int

    def describe(self) -> str:
        what = f"port {self.port}" if self.port else f"host port {self.host_port}"
        return f"{self.container} {what}" if self.container else what


@dataclass(frozen=True)
class Policy:
    path: str
    interfaces: tuple[str, ...] | None
    host_default: Verdict | None  # None: no host section, the host's own ports are left alone
    host_rules: tuple[HostRule, ...]
    container_default: Verdict
    container_rules: tuple[ContainerRule, ...]
    lines: dict[str, int]  # line of `host.default`, `containers.default`, ...
    # listfiles.policy_digest() of the text and list files this was made of ("" when parsed
    # from text alone): apply stamps it on the table
    digest: str = ""
    list_files: tuple[listfiles.ListFile, ...] = ()

    def where(self, line: int | None) -> str:
        return f"{self.path}:{line}" if line else self.path


def _friendly(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"unknown key {err['loc'][-1]!r}"
    if kind == "missing":
        return f"missing required key {loc!r}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{loc}: {msg}"


def load(path: str | Path) -> Policy:
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read policy: {exc.strerror}") from None
    return parse(text, path)


def parse(text: str, path: str = "<policy>") -> Policy:
    try:
        doc = located_yaml.load(text)
    except located_yaml.YAMLError as exc:
        raise PolicyError(path, exc.line, f"not valid YAML: {exc}") from None
    if not isinstance(doc.data, dict):
        raise PolicyError(path, 1, "a policy is a YAML mapping starting with `version: 1`")
    try:
        raw = _Document.model_validate(doc.data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        raise PolicyError(path, doc.line(loc), _friendly(err), doc.value(loc)) from None
    return _resolve(raw, doc, path, text)


def _resolve(raw: _Document, doc: located_yaml.Located, path: str, text: str = "") -> Policy:
    """Second pass: list names, addresses and cross-field rules, each error with its line."""
    lists: dict[str, tuple[list[int], list[int]]] = {}  # name -> (IPv4, IPv6) blocks
    labels: dict[str, str] = {}  # how plan and status name a list read from a file
    files: list[tuple[listfiles.ListFile, bytes]] = []
    for name, entries in raw.lists.items():
        if not LIST_NAME_RE.match(name) or name == "any":
            raise PolicyError(path, doc.line(("lists", name)),
                              "a list name starts with a letter (letters, digits, _ and -) "
                              "and is not `any`", name)
        if isinstance(entries, _ListFile):
            lf = listfiles.ListFile.at(name, entries.file, path)
            data = listfiles.read_bytes(path, doc.line(("lists", name, "file")), lf)
            lists[name] = listfiles.parse(lf, data)
            labels[name] = lf.label()
            files.append((lf, data))
            continue
        try:
            lists[name] = addresses.parse_many([str(e) for e in entries])
        except addresses.BadEntry as exc:
            raise PolicyError(path, doc.line(("lists", name, exc.index)), str(exc),
                              entries[exc.index]) from None

    seen: dict[tuple[str, ...], Sources] = {}  # one list in many rules is collapsed once

    def sources(entries: list[str | int], loc: tuple[str | int, ...]) -> Sources:
        key = tuple(str(e) for e in entries)
        if key in seen:
            return seen[key]
        v4: list[int] = []
        v6: list[int] = []
        any_ = False
        for i, entry in enumerate(entries):
            text = str(entry)
            line = doc.line((*loc, i)) or doc.line(loc)
            if text == "any":
                any_ = True
            elif text in lists:
                v4 += lists[text][0]
                v6 += lists[text][1]
            elif LIST_NAME_RE.match(text):  # a word, not an address: a list that does not exist
                raise PolicyError(path, line, "unknown list name", text)
            else:
                try:
                    version, b = addresses.parse(text)
                except ValueError as exc:
                    raise PolicyError(path, line, str(exc), text) from None
                (v4 if version == 4 else v6).append(b)
        seen[key] = Sources.of_blocks(v4, v6, any_, tuple(labels.get(e, e) for e in key))
        return seen[key]

    host_rules: list[HostRule] = []
    if raw.host is not None:
        for i, r in enumerate(raw.host.allow):
            loc = ("host", "allow", i)
            host_rules.append(HostRule(r.port, sources(r.from_, (*loc, "from")),
                                       doc.line(loc) or 0))

    container_rules: list[ContainerRule] = []
    for i, r in enumerate(raw.containers.allow):
        loc = ("containers", "allow", i)
        line = doc.line(loc) or 0
        if (r.port is None) == (r.host_port is None):
            raise PolicyError(path, line, "a container rule names exactly one of `port` "
                              "(the container's port) or `host_port`")
        if r.port is not None and r.container is None:
            raise PolicyError(path, line, "`port` is the container's own port: name the "
                              "`container` too, or use `host_port`")
        container_rules.append(ContainerRule(r.container, r.port, r.host_port,
                                             sources(r.from_, (*loc, "from")), line))

    lines = {
        "host.default": doc.line(("host", "default")) or doc.line(("host",)) or 0,
        "containers.default": doc.line(("containers", "default"))
        or doc.line(("containers",)) or 0,
    }
    return Policy(
        path=path,
        interfaces=tuple(raw.interfaces) if raw.interfaces else None,
        host_default=raw.host.default if raw.host is not None else None,
        host_rules=tuple(host_rules),
        container_default=raw.containers.default,
        container_rules=tuple(container_rules),
        lines=lines,
        digest=listfiles.policy_digest(path, text, files),
        list_files=tuple(lf for lf, _ in files),
    )
