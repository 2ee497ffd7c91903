"""Load and validate a version 1 policy file, with file:line errors for every bad value."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
)

from . import addresses, listfiles, listurls, located_yaml
from .errors import PolicyError
from .model import IFNAME_RE, PortRange, PortSpec, Sources, Verdict

_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?(?:/(tcp|udp))?$")
# Docker container names (and compose service names, which are stricter).
NAME_RE = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LIST_NAME_RE = listurls.LIST_NAME_RE
# Bounds what one check costs (well under 2 s at this size); see README, "The policy".
MAX_POLICY_BYTES = 8 * 1024 * 1024
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


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


# What editors see (`dockfence schema`); the validators above stay the authority.
_PORT_SCHEMA = {
    "anyOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
              {"type": "string", "pattern": r"^\d{1,5}(-\d{1,5})?(/(tcp|udp))?$"}],
    "description": "8080, 8080/tcp or 8000-8100/udp (tcp when no protocol is given)",
}
_FROM_SCHEMA = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    "description": "list names, addresses, CIDRs, or `any`; an empty list admits nobody",
}
PortField = Annotated[PortSpec, BeforeValidator(parse_port), WithJsonSchema(_PORT_SCHEMA)]
SourceField = Annotated[list[str | int], BeforeValidator(_as_list), WithJsonSchema(_FROM_SCHEMA)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)


_EXCEPT_SCHEMA = {
    "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
    "description": "list names, addresses or CIDRs this rule refuses although `from` names "
                   "them (a deny list: `from: any` with `except: [abusers]`)",
}
ExceptField = Annotated[list[str | int], BeforeValidator(_as_list), WithJsonSchema(_EXCEPT_SCHEMA)]


class _HostRule(_Strict):
    port: PortField
    from_: SourceField = Field(alias="from")
    except_: ExceptField = Field([], alias="except")


class _ContainerRule(_Strict):
    container: Annotated[str | None, BeforeValidator(_container_name)] = None
    port: PortField | None = None
    host_port: PortField | None = None
    from_: SourceField = Field(alias="from")
    except_: ExceptField = Field([], alias="except")


class _HostSection(_Strict):
    default: Literal["deny", "allow"] = "deny"
    allow: list[_HostRule] = []


class _LabelSection(_Strict):
    may_allow: SourceField


class _ContainerSection(_Strict):
    default: Literal["deny", "allow"] = "deny"
    allow: list[_ContainerRule] = []
    labels: _LabelSection | None = None  # absent: container labels are ignored


class _ListFile(_Strict):
    file: str = Field(min_length=1)


def _url(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("a list URL is a string")
    return listurls.check_url(value)


class _ListURL(_Strict):
    url: Annotated[str, BeforeValidator(_url),
                   WithJsonSchema({"type": "string", "pattern": "^https?://",
                                   "description": "where the list is downloaded from (http or "
                                                  "https): one address or CIDR per line"})]
    refresh: Annotated[int, BeforeValidator(listurls.parse_refresh),
                       WithJsonSchema({"type": "string", "pattern": r"^\d+[smhdw]?$",
                                       "description": "how old the saved copy may get before "
                                                      "apply downloads it again (default 1d)"})
                       ] = listurls.DEFAULT_REFRESH


def _list_kind(value: object) -> str:
    """Which form a list takes, so that errors speak of that form only."""
    if isinstance(value, dict):
        return "url" if "url" in value else "file"
    return "inline"


_LIST_TAGS = ("inline", "file", "url")
_ListValue = Annotated[
    Annotated[list[str], Tag("inline")] | Annotated[_ListFile, Tag("file")]
    | Annotated[_ListURL, Tag("url")],
    Discriminator(_list_kind)]


class _Document(_Strict):
    version: Literal[1]
    interfaces: list[Annotated[str, BeforeValidator(_ifname)]] | None = Field(None, min_length=1)
    lists: dict[str, _ListValue] = {}
    host: _HostSection | None = None
    containers: _ContainerSection = _ContainerSection()


def json_schema() -> dict[str, Any]:
    """The policy's JSON Schema, as editors' YAML language servers read it."""
    doc = _Document.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **doc,
            "title": "dockfence policy (version 1)"}


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
    # the most a container label may grant (`containers.labels.may_allow`); None: labels ignored
    label_limit: Sources | None = None
    lists: dict[str, Sources] = field(default_factory=dict, compare=False)
    # listfiles.policy_digest() of the text and list files this was made of ("" when parsed
    # from text alone): apply stamps it on the table
    digest: str = field(default="", compare=False)
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
    return parse(read(path), path)


def read(path: str) -> bytes:
    """The policy file's bytes; a PolicyError for anything but a readable regular file of at most
    MAX_POLICY_BYTES. Opened non-blocking, so a FIFO is refused instead of waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read policy: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise PolicyError(path, None, f"cannot read policy: {kind}, not a file")
        chunks, size = [], 0
        while size <= MAX_POLICY_BYTES and (chunk := os.read(fd, MAX_POLICY_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise PolicyError(path, None, f"cannot read policy: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(path, None, f"the policy is larger than {MAX_POLICY_BYTES:,} bytes; "
                          "keep long address lists in list files")
    return data


def parse(text: str | bytes, path: str = "<policy>") -> Policy:
    """A policy from its text (or UTF-8 bytes); a PolicyError with file, line and value."""
    try:
        doc = located_yaml.load(text)
    except located_yaml.YAMLError as exc:
        raise PolicyError(path, exc.line, str(exc), exc.value) from None
    if not isinstance(doc.data, dict):
        raise PolicyError(path, 1, "a policy is a YAML mapping starting with `version: 1`")
    try:
        raw = _Document.model_validate(doc.data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        if len(loc) > 2 and loc[0] == "lists" and loc[2] in _LIST_TAGS:  # the form's tag
            loc = loc[:2] + loc[3:]
            err = {**err, "loc": loc}
        line = doc.line(loc) or doc.lines.line  # a missing top-level key: the document's
        raise PolicyError(path, line, _friendly(err), doc.value(loc)) from None
    return _resolve(raw, doc, path, text)


def _resolve(raw: _Document, doc: located_yaml.Located, path: str,
             text: str | bytes = "") -> Policy:
    """Second pass: list names, addresses and cross-field rules, each error with its line."""
    lists: dict[str, tuple[list[int], list[int]]] = {}  # name -> (IPv4, IPv6) blocks
    labels: dict[str, str] = {}  # how plan and status name a list read from a file
    files: list[tuple[listfiles.ListFile, bytes]] = []
    downloaded: list[tuple[str, str, bytes]] = []  # (name, URL, the saved copy)
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
        if isinstance(entries, _ListURL):
            lu = listurls.ListURL(name, entries.url, entries.refresh)
            data = listurls.read_saved(lu)
            lists[name] = listfiles.parse_at(f"{lu.label()} (saved copy {lu.copy})", data)
            labels[name] = f"{name} (url {lu.url})"
            downloaded.append((name, lu.url, data))
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

    def rule_sources(r: _HostRule | _ContainerRule, loc: tuple[str | int, ...]) -> Sources:
        """`from` minus `except`, named as the policy wrote it ("any except abusers")."""
        admitted = sources(r.from_, (*loc, "from"))
        if not r.except_:
            return admitted
        if "any" in (str(e) for e in r.except_):
            raise PolicyError(path, doc.line((*loc, "except")), "`except: any` refuses "
                              "everyone; write `from: []` to admit nobody", "any")
        refused = sources(r.except_, (*loc, "except"))
        words = ", ".join(admitted.names or ("any",) if admitted.any else admitted.names)
        return admitted.excepting(refused.v4, refused.v6,
                                  (f"{words} except {', '.join(refused.names)}",))

    host_rules: list[HostRule] = []
    if raw.host is not None:
        for i, r in enumerate(raw.host.allow):
            loc = ("host", "allow", i)
            host_rules.append(HostRule(r.port, rule_sources(r, loc),
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
                                             rule_sources(r, loc), line))

    label_limit = None
    if raw.containers.labels is not None:
        label_limit = sources(raw.containers.labels.may_allow,
                              ("containers", "labels", "may_allow"))

    lines = {
        "containers.labels": doc.line(("containers", "labels")) or 0,
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
        label_limit=label_limit,
        # only labels look lists up by name later; do not pay for it otherwise
        lists={name: Sources.of_blocks(v4, v6, names=(name,))
               for name, (v4, v6) in lists.items()} if label_limit is not None else {},
        digest=listfiles.policy_digest(path, text, files, downloaded),
        list_files=tuple(lf for lf, _ in files),
    )
