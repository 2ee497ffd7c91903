"""Load and validate a version 1 policy file, with file:line errors for every bad value.

Two passes. msgspec checks the structure against the Structs below (types, unknown and missing
keys, the words `deny`/`allow`); `_resolve` then checks every value (ports, names, addresses,
URLs, durations) where the line of each one is known, and builds the Policy.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from . import addresses, filedigests, listfiles, listurls, located_yaml
from .errors import PolicyError
from .listurls import LIST_NAME_RE
from .model import IFNAME_RE, PortSpec, Sources, Verdict, parse_port

# Docker container names (and compose service names, which are stricter).
NAME_RE = re.compile(r"^/?[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Bounds what one check costs (well under 2 s at this size); see README, "The policy".
MAX_POLICY_BYTES = 8 * 1024 * 1024
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}

_T = TypeVar("_T")

_PORT_HINT = "a port is written 8080, 8080/tcp or 8000-8100/udp"
_IFNAME_HINT = ("not an interface name (1-15 characters: letters, digits, _ . @ -, "
                "or a prefix ending in *)")
_NAME_HINT = "not a container or compose service name"


def _ifname(value: str) -> str:
    if value == "lo":
        raise ValueError("loopback is never outside")
    if not IFNAME_RE.match(value):
        raise ValueError(_IFNAME_HINT)
    return value


def _container_name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(_NAME_HINT)
    return value.lstrip("/")


# --- the structure (msgspec), and what editors see (`dockfence schema`) ------------------------
# Ports, names, URLs and durations are checked by `_resolve`; the JSON Schema constraints below
# (extra_json_schema) only help editors, msgspec does not enforce them.

_Port = Annotated[
    Annotated[int, Meta(extra_json_schema={"minimum": 1, "maximum": 65535})]
    | Annotated[str, Meta(extra_json_schema={"pattern": r"^\d{1,5}(-\d{1,5})?(/(tcp|udp))?$"})],
    Meta(description="8080, 8080/tcp or 8000-8100/udp (tcp when no protocol is given)")]
_Entries = list[str | int] | str | int
_From = Annotated[_Entries, Meta(
    description="list names, addresses, CIDRs, or `any`; an empty list admits nobody")]
_Except = Annotated[_Entries, Meta(
    description="list names, addresses or CIDRs this rule refuses although `from` names them "
                "(a deny list: `from: any` with `except: [abusers]`)")]
_Default = Annotated[Literal["deny", "allow"],
                     Meta(description="what happens to connections no rule allows")]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _HostRule(_Strict):
    """Who may reach one of the host's own ports."""

    port: _Port
    from_: _From = msgspec.field(name="from")
    except_: _Except = msgspec.field(name="except", default_factory=list)


class _ContainerRule(_Strict, kw_only=True):
    """Who may reach a container's port (`container` + `port`) or a published `host_port`."""

    container: Annotated[str, Meta(description="container or compose service name")] \
        | UnsetType = UNSET
    port: _Port | None = None
    host_port: _Port | None = None
    from_: _From = msgspec.field(name="from")
    except_: _Except = msgspec.field(name="except", default_factory=list)


class _HostSection(_Strict):
    """The host's own ports (absent: left alone)."""

    default: _Default = "deny"
    allow: list[_HostRule] = []


class _LabelSection(_Strict):
    """Container labels may add sources, within `may_allow` (absent: labels are ignored)."""

    may_allow: _From


class _ContainerSection(_Strict):
    """Published container ports."""

    default: _Default = "deny"
    allow: list[_ContainerRule] = []
    labels: _LabelSection | None = None


class _ListSource(_Strict):
    """A list read from a file (`file`) or downloaded (`url`, `refresh`)."""

    file: Annotated[str, Meta(
        description="a file with one address or CIDR per line (`#` comments); relative to the "
                    "policy's folder", extra_json_schema={"minLength": 1})] | UnsetType = UNSET
    url: Annotated[str, Meta(
        description="where the list is downloaded from (http or https): one address or CIDR "
                    "per line", extra_json_schema={"pattern": "^https?://"})] | UnsetType = UNSET
    refresh: Annotated[
        Annotated[int, Meta(extra_json_schema={"minimum": 60})]
        | Annotated[str, Meta(extra_json_schema={"pattern": r"^\d+[smhdw]?$"})],
        Meta(description="how old the saved copy may get before apply downloads it again "
                         "(default 1d)")] | UnsetType = UNSET


_ListValue = list[str] | _ListSource
# one form or the other, as _resolve insists (for editors)
_LIST_FORMS = {"oneOf": [{"required": ["file"], "not": {"anyOf": [{"required": ["url"]},
                                                                  {"required": ["refresh"]}]}},
                         {"required": ["url"], "not": {"required": ["file"]}}]}


class _Document(_Strict):
    version: Annotated[Literal[1], Meta(description="the policy format: 1")]
    interfaces: Annotated[list[str], Meta(
        description="the outside interfaces (default: all but loopback and Docker's bridges)",
        min_length=1)] | None = None
    lists: dict[str, _ListValue] = {}
    host: _HostSection | None = None
    containers: _ContainerSection = msgspec.field(default_factory=_ContainerSection)


def json_schema() -> dict[str, Any]:
    """The policy's JSON Schema, as editors' YAML language servers read it."""
    doc = msgspec.json.schema(_Document)
    defs = doc["$defs"]
    root = defs.pop("_Document")
    defs["_ListSource"].update(_LIST_FORMS)
    for d in defs.values():
        d.pop("title", None)  # the Structs' private names
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **root, "$defs": defs,
            "title": "dockfence policy (version 1)"}


# What a msgspec error says, in the policy's words.
_ERROR_RE = re.compile(r"^(?P<what>.*?)(?: - at `(?P<path>[^`]*)`(?: in `(?P<inside>[^`]*)`)?)?$",
                       re.S)
_STEP_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[(\.\.\.)\]")
_KINDS = {"int": "a number", "str": "text", "array": "a list", "object": "a mapping",
          "null": "nothing (null)", "bool": "true or false", "float": "a decimal number"}
_FROM_HINT = "list names, addresses, CIDRs or `any`: one, or a list of them"
_ENTRY_HINT = "an address, a CIDR, a list name or `any`"
# What a value of the wrong type should have been (`[]`: an item of that list).
_HINTS = {"port": _PORT_HINT, "host_port": _PORT_HINT, "container": _NAME_HINT,
          "interfaces[]": _IFNAME_HINT, "from": _FROM_HINT, "except": _FROM_HINT,
          "may_allow": _FROM_HINT, "from[]": _ENTRY_HINT, "except[]": _ENTRY_HINT,
          "may_allow[]": _ENTRY_HINT, "default": "must be 'deny' or 'allow'",
          "version": "must be 1 (the only version so far)", "url": "a list URL is a string",
          "refresh": "refresh is a duration: 90s, 10m, 6h, 1d or 1w"}
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$", re.S)
_MISSING = re.compile(r"^Object missing required field `(.*)`$", re.S)
_EXPECTED = re.compile(r"^Expected `([^`]*)`(?:, got `([^`]*)`)?(?: of length >= (\d+))?$")


def _steps(path: str) -> tuple[str | int, ...]:
    """`$.containers.allow[0].port` -> ("containers", "allow", 0, "port")."""
    return tuple(m[1] if m[1] else int(m[2]) if m[2] else "..."
                 for m in _STEP_RE.finditer(path))


def _kinds(text: str) -> str:
    kinds = text.split(" | ")
    if len(kinds) > 1 and "null" in kinds:  # an optional key: leaving it out is the way
        kinds.remove("null")
    names = [_KINDS.get(k, k) for k in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _dotted(loc: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _explain(message: str, data: Any, prefix: tuple[str | int, ...] = (),
             ) -> tuple[tuple[str | int, ...], str]:
    """(where, what) of a msgspec ValidationError about `data` (found at `prefix`), in the
    policy's terms."""
    m = _ERROR_RE.match(message)
    what = m["what"] if m else message
    steps = _steps(m["inside"] or m["path"] or "") if m else ()
    if "..." in steps:  # a value inside `lists`: msgspec does not say which list
        return _list_error(data)
    loc = (*prefix, *steps)
    if unknown := _UNKNOWN.match(what):
        return (*loc, unknown[1]), f"unknown key {unknown[1]!r}"
    if missing := _MISSING.match(what):
        return loc, f"missing required key {_dotted((*loc, missing[1]))!r}"
    if m and m["inside"]:  # `key` in ...: located_yaml makes every key text; never expected
        return loc, "a key is a plain word"
    # the field's hint; `steps`, not `loc`: a list's name is the policy's, never a field
    hint = _HINTS.get(f"{steps[-2]}[]" if len(steps) > 1 and isinstance(steps[-1], int)
                      else str(steps[-1])) if steps else None
    if hint:
        return loc, f"{_dotted(loc)}: {hint}"
    if expected := _EXPECTED.match(what):
        want, got, least = expected.groups()
        text = f"expected {_kinds(want)}"
        if least:
            text += f" of at least {least} {'item' if want == 'array' else 'character'}" + \
                ("s" if least != "1" else "")
        if got:
            text += f", got {_kinds(got)}"
        return loc, f"{_dotted(loc)}: {text}"
    return loc, f"{_dotted(loc)}: {what[:1].lower()}{what[1:]}" if loc else what


def _list_error(data: Any) -> tuple[tuple[str | int, ...], str]:
    """Which list broke the structure: each one is checked again on its own."""
    for name, value in data["lists"].items():
        try:
            msgspec.convert(value, _ListValue)
        except msgspec.ValidationError as exc:
            return _explain(str(exc), value, ("lists", name))
    return ("lists",), "lists: not valid"  # pragma: no cover - msgspec said one was not


# --- the validated policy ---------------------------------------------------------------------

@dataclass(frozen=True)
class HostRule:
    """Who may reach one of the host's own ports."""

    port: PortSpec
    sources: Sources
    line: int


@dataclass(frozen=True)
class ContainerRule:
    """Who may reach a container's port, or a published host port."""

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
    """A validated policy: rules with their sources and lines."""

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
        raw = msgspec.convert(doc.data, _Document)
    except msgspec.ValidationError as exc:
        loc, message = _explain(str(exc), doc.data)
        line = doc.line(loc) or doc.lines.line  # a missing top-level key: the document's
        raise PolicyError(path, line, message, doc.value(loc)) from None
    return _resolve(raw, doc, path, text)


def _as_list(value: list[str | int] | str | int) -> list[str | int]:
    return [value] if isinstance(value, str | int) else value


def _resolve(raw: _Document, doc: located_yaml.Located, path: str,
             text: str | bytes = "") -> Policy:
    """Second pass: every value, list names, addresses and cross-field rules, each error with
    its line. Every value is checked before a list file or a saved copy is read: a typo is
    exit 2 whatever the files."""

    def fail(loc: tuple[str | int, ...], message: object) -> PolicyError:
        return PolicyError(path, doc.line(loc), f"{_dotted(loc)}: {message}", doc.value(loc))

    def checked(check: Callable[[Any], _T], value: object, loc: tuple[str | int, ...]) -> _T:
        try:
            return check(value)
        except ValueError as exc:
            raise fail(loc, exc) from None

    def list_source(name: str, src: _ListSource) -> listfiles.ListFile | listurls.ListURL:
        loc = ("lists", name)
        if (src.file is UNSET) == (src.url is UNSET):
            raise fail(loc, "a list is written inline ([203.0.113.0/24, ...]), or names a "
                       "`file` or a `url` (one of them)")
        if src.url is UNSET:
            if src.refresh is not UNSET:
                raise fail((*loc, "refresh"), "`refresh` is for downloaded lists (`url`)")
            if not src.file:
                raise fail((*loc, "file"), "`file` names the list's file")
            return listfiles.ListFile.at(name, str(src.file), path)
        refresh = listurls.DEFAULT_REFRESH if src.refresh is UNSET else \
            checked(listurls.parse_refresh, src.refresh, (*loc, "refresh"))
        return listurls.ListURL(name, checked(listurls.check_url, src.url, (*loc, "url")),
                                refresh)

    interfaces = tuple(checked(_ifname, name, ("interfaces", i))
                       for i, name in enumerate(raw.interfaces)) if raw.interfaces else None

    forms: dict[str, list[str] | listfiles.ListFile | listurls.ListURL] = {}
    for name, entries in raw.lists.items():
        loc = ("lists", name)
        if not LIST_NAME_RE.match(name) or name == "any":
            raise PolicyError(path, doc.line(loc),
                              "a list name starts with a letter (letters, digits, _ and -) "
                              "and is not `any`", name)
        forms[name] = entries if isinstance(entries, list) else list_source(name, entries)

    host_ports = [checked(parse_port, r.port, ("host", "allow", i, "port"))
                  for i, r in enumerate(raw.host.allow)] if raw.host is not None else []
    container_parts: list[tuple[str | None, PortSpec | None, PortSpec | None]] = []
    for i, r in enumerate(raw.containers.allow):
        loc = ("containers", "allow", i)
        container = None if r.container is UNSET else \
            checked(_container_name, r.container, (*loc, "container"))
        port = None if r.port is None else checked(parse_port, r.port, (*loc, "port"))
        host_port = None if r.host_port is None else \
            checked(parse_port, r.host_port, (*loc, "host_port"))
        if (port is None) == (host_port is None):
            raise PolicyError(path, doc.line(loc), "a container rule names exactly one of `port` "
                              "(the container's port) or `host_port`")
        if port is not None and container is None:
            raise PolicyError(path, doc.line(loc), "`port` is the container's own port: name "
                              "the `container` too, or use `host_port`")
        container_parts.append((container, port, host_port))

    lists: dict[str, tuple[list[int], list[int]]] = {}  # name -> (IPv4, IPv6) blocks
    labels: dict[str, str] = {}  # how plan and status name a list read from a file
    files: list[tuple[listfiles.ListFile, str]] = []  # (list file, its digest)
    downloaded: list[tuple[str, str, str]] = []  # (name, URL, the saved copy's digest)
    hashed: dict[str, filedigests.Hashed] = {}  # what a no-op apply may trust without reading
    for name, form in forms.items():
        if isinstance(form, listfiles.ListFile):
            data, hashed[form.shown] = listfiles.read_bytes(
                path, doc.line(("lists", name, "file")), form)
            lists[name] = listfiles.parse(form, data)
            labels[name] = form.label()
            files.append((form, hashed[form.shown].digest))
        elif isinstance(form, listurls.ListURL):
            data, hashed[str(form.copy)] = listurls.read_saved(form)
            lists[name] = listfiles.parse_at(f"{form.label()} (saved copy {form.copy})", data)
            labels[name] = f"{name} (url {form.url})"
            downloaded.append((name, form.url, hashed[str(form.copy)].digest))
        else:
            try:
                lists[name] = addresses.parse_many(form)
            except addresses.BadEntry as exc:
                raise PolicyError(path, doc.line(("lists", name, exc.index)), str(exc),
                                  form[exc.index]) from None

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
        admitted = sources(_as_list(r.from_), (*loc, "from"))
        excepted = _as_list(r.except_)
        if not excepted:
            return admitted
        if "any" in (str(e) for e in excepted):
            raise PolicyError(path, doc.line((*loc, "except")), "`except: any` refuses "
                              "everyone; write `from: []` to admit nobody", "any")
        refused = sources(excepted, (*loc, "except"))
        words = ", ".join(admitted.names or ("any",) if admitted.any else admitted.names)
        return admitted.excepting(refused.v4, refused.v6,
                                  (f"{words} except {', '.join(refused.names)}",))

    host_rules: list[HostRule] = []
    if raw.host is not None:
        for i, (r, port) in enumerate(zip(raw.host.allow, host_ports, strict=True)):
            loc = ("host", "allow", i)
            host_rules.append(HostRule(port, rule_sources(r, loc), doc.line(loc) or 0))

    container_rules: list[ContainerRule] = []
    for i, (r, (container, port, host_port)) in enumerate(
            zip(raw.containers.allow, container_parts, strict=True)):
        loc = ("containers", "allow", i)
        container_rules.append(ContainerRule(container, port, host_port, rule_sources(r, loc),
                                             doc.line(loc) or 0))

    label_limit = None
    if raw.containers.labels is not None:
        label_limit = sources(_as_list(raw.containers.labels.may_allow),
                              ("containers", "labels", "may_allow"))

    lines = {
        "containers.labels": doc.line(("containers", "labels")) or 0,
        "host.default": doc.line(("host", "default")) or doc.line(("host",)) or 0,
        "containers.default": doc.line(("containers", "default"))
        or doc.line(("containers",)) or 0,
    }
    filedigests.remember(hashed)
    return Policy(
        path=path,
        interfaces=interfaces,
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

