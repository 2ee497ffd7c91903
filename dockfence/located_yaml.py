"""YAML parsed into plain data plus the line of every key and list item, for error messages.

Policies are written by people who are not always the host's administrator (container labels,
downloaded lists), so this loader is built for hostile input. libyaml (PyYAML's C parser) turns
the text into events, and one iterative pass over them builds the data, refusing everything a
policy has no use for before it can cost time or memory:

- anchors and aliases (`&a`, `*a`): expanding shared nodes is exponential (a "billion laughs"
  file of 1 KB), and `<<` merge keys build on them;
- explicit tags (`!!python/object`, `!!binary`, `!foo`) and more than one document;
- nesting deeper than MAX_DEPTH (no recursion, so no RecursionError either);
- keys that are not plain words (a mapping or sequence as a key), and duplicate keys;
- bytes that are not UTF-8, and control characters (NUL): reported with their line.

Keys are always their text (`1:` is the key "1", `yes:` the key "yes"): a key is a name, never a
YAML 1.1 number or boolean. Plain values are null, booleans, integers, floats or strings as in
YAML 1.1, except that sexagesimal numbers (`22:30`, YAML 1.1 makes that 1350) and timestamps stay
strings, so a port or an address is never silently turned into something else.

Long inline lists are one address per line, and libyaml's events cost ~2.5 µs per line. A run of
such lines (same indentation, each `- address` with nothing YAML could read otherwise) is read
with one regular expression instead, and libyaml parses the text with each run cut to a single
line naming it. Only where that line comes back as a plain item of a list are the run's
addresses taken; anywhere else (inside a block scalar, a quoted string, as a key), and on any
error, the whole original text is parsed the slow way, so the result is always libyaml's own.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_resolver = yaml.resolver.Resolver()
_constructor = yaml.constructor.SafeConstructor()

MAX_DEPTH = 32  # a policy nests 6 levels deep
# Keys, values and list items together. Bounds what a file can cost in Python objects (and in
# validation errors) whatever its size: an inline list of 200,000 addresses still fits.
MAX_NODES = 300_000
_TAG = "tag:yaml.org,2002:"
# What YAML allows in a stream (YAML 1.1, 5.1): everything else is refused with its line.
_NOT_PRINTABLE = "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_NOT_PRINTABLE_ASCII = re.compile("[^\x09\x0a\x0d\x20-\x7e]")
_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # libyaml's line breaks
# A list item that is an address and nothing else in YAML: quoted, or a plain scalar that
# _scalar() keeps a string (a `:` or `/`, or two dots) and that does not end in `:` (a key).
_ADDRESS_ITEM = (r"""- +(?:"[0-9A-Fa-f:./]++"|'[0-9A-Fa-f:./]++'|"""
                 r"(?=[0-9A-Fa-f.]*+[:/]|[0-9A-Fa-f]*+\.[0-9A-Fa-f]*+\.)"
                 r"[0-9A-Fa-f][0-9A-Fa-f:./]*+(?<!:))(?:[ \t]++#[^\n]*+)?[ \t]*+\n")
MIN_RUN = 64  # shorter runs are not worth cutting out
# possessive and atomic: nothing to backtrack into, ~0.2 µs a line
_RUN = re.compile(rf"^( *){_ADDRESS_ITEM}(?>\1{_ADDRESS_ITEM})+", re.M)
_RUN_VALUE = re.compile(r"^ *- +[\"']?([0-9A-Fa-f:./]+)", re.M)


class YAMLError(ValueError):
    def __init__(self, line: int | None, message: str, value: object = None) -> None:
        self.line, self.value = line, value
        super().__init__(message)


@dataclass(slots=True)
class Lines:
    """The 1-based line of a mapping or list, and of its children (by key or by index): a
    scalar child is its line alone (an inline list of 100,000 builds no object per item)."""

    line: int
    keys: dict[str, Lines | int] | None = None
    items: list[Lines | int] | None = None


@dataclass
class Located:
    """Parsed YAML, with the line of every key and list item."""

    data: Any
    lines: Lines

    def line(self, loc: tuple[str | int, ...]) -> int | None:
        """The line of the deepest node on the path `loc` that exists (None: not even the
        first part does)."""
        node: Lines | int = self.lines
        line = None
        for part in loc:
            if isinstance(node, int):  # a scalar has no children
                break
            if isinstance(part, int) and node.items is not None and 0 <= part < len(node.items):
                node = node.items[part]
            elif node.keys is not None and str(part) in node.keys:
                node = node.keys[str(part)]
            else:
                break
            line = node if isinstance(node, int) else node.line
        return line

    def value(self, loc: tuple[str | int, ...]) -> object:
        """The scalar at `loc`, or None."""
        node = self.data
        for part in loc:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                return None
        return node if isinstance(node, str | int | float | bool) else None


def line_at(text: str, pos: int) -> int:
    """1-based line of character `pos`, counting line breaks as libyaml does."""
    return sum(1 for _ in _BREAK.finditer(text, 0, pos)) + 1


def decode(data: bytes) -> str:
    """UTF-8 (an optional BOM is dropped), or a YAMLError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = line_at(data[: exc.start].decode("utf-8-sig"), exc.start)
        bad = data[exc.start: exc.end]
        raise YAMLError(line, "not UTF-8: the policy is UTF-8 text", bad) from None


def load(source: str | bytes) -> Located:
    """Parse one YAML document (text or UTF-8 bytes) into data with lines."""
    text = decode(source) if isinstance(source, bytes) else source
    # most policies are ASCII: the full class costs ~7 ms to compile, at every start
    if bad := (_NOT_PRINTABLE_ASCII if text.isascii() else re.compile(_NOT_PRINTABLE)).search(text):
        char = bad.group()
        raise YAMLError(line_at(text, bad.start()),
                        f"control character U+{ord(char):04X} is not allowed in YAML", char)
    if (cut := _Cut.of(text)) is not None:
        try:
            return _parse(cut.text, cut)
        except (YAMLError, _Uncut):  # errors and odd places are for libyaml's own reading
            pass
    return _parse(text, None)


def _parse(text: str, cut: _Cut | None) -> Located:
    parser = _Parser(text)
    try:
        return _build(parser, cut)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # libyaml may point one line past the end of a file that ends inside a quoted scalar
        line = min(mark.line + 1, line_at(text, len(text))) if mark else None
        if "nesting depth" in str(exc.problem):  # libyaml >= 0.2.6 stops at its own depth
            raise YAMLError(line, f"nested more than {MAX_DEPTH} levels deep") from None
        raise YAMLError(line, f"not valid YAML: {exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:  # libyaml counts UTF-8 bytes
        at = len(text.encode()[: exc.position].decode(errors="ignore"))
        raise YAMLError(line_at(text, at), exc.reason) from None
    except yaml.YAMLError as exc:
        raise YAMLError(None, f"not valid YAML: {exc}") from None
    finally:
        parser.dispose()


class _Uncut(Exception):
    """A cut-out run's line did not come back as a list item: parse the original text."""


class _Cut:
    """The text with every long run of address items replaced by one line naming the run."""

    __slots__ = ("first", "names", "nonce", "placed", "shift", "text", "values")

    def __init__(self, text: str, nonce: str, names: dict[str, int], first: list[int],
                 values: list[list[str]], placed: list[int]) -> None:
        self.text, self.nonce, self.names = text, nonce, names
        self.first, self.values = first, values
        self.placed = placed  # the line of each run's stand-in, in the cut text
        # lines of the original text below stand-ins: shift[k] more than in the cut text
        self.shift = [0]
        for run in values:
            self.shift.append(self.shift[-1] + len(run) - 1)

    @classmethod
    def of(cls, text: str) -> _Cut | None:
        if not text.isascii() or "\r" in text:  # line breaks are "\n" alone
            return None
        runs = [m for m in _RUN.finditer(text)
                if text.count("\n", m.start(), m.end()) >= MIN_RUN]
        if not runs:
            return None
        nonce = "dockfence" + os.urandom(8).hex()
        if nonce in text:
            return None
        pieces, names, first, values, placed = [], {}, [], [], []
        line = cut_line = 1
        at = 0
        for i, m in enumerate(runs):
            gap = text.count("\n", at, m.start())
            line, cut_line = line + gap, cut_line + gap
            run = _RUN_VALUE.findall(text, m.start(), m.end())
            name = f"{nonce}r{i}"
            pieces += [text[at:m.start()], f"{m[1]}- {name}\n"]
            names[name] = i
            first.append(line)
            values.append(run)
            placed.append(cut_line)
            line += len(run)
            cut_line += 1
            at = m.end()
        pieces.append(text[at:])
        return cls("".join(pieces), nonce, names, first, values, placed)

    def line(self, cut_line: int) -> int:
        """The original line of a line of the cut text."""
        return cut_line + self.shift[bisect.bisect_left(self.placed, cut_line)]

    def run(self, event: Any, top: _Open | None) -> tuple[int, list[str]]:
        """The first line and addresses of the run a scalar names, if it is a list item."""
        i = self.names.get(event.value)
        if i is None or event.style != "" or top is None or top.is_map:
            raise _Uncut
        return self.first[i], self.values[i]


class _Open:
    """A mapping or sequence being built, on the explicit stack."""

    __slots__ = ("data", "is_map", "key", "key_line", "lines")

    def __init__(self, data: dict[str, Any] | list[Any], lines: Lines) -> None:
        self.data, self.lines, self.is_map = data, lines, isinstance(data, dict)
        self.key: str | None = None  # a mapping's key waiting for its value
        self.key_line = 0


def _build(parser: Any, cut: _Cut | None = None) -> Located:
    """One pass over the events with an explicit stack: linear time, no recursion."""
    stack: list[_Open] = []
    top: _Open | None = None
    root: tuple[Any, Lines] | None = None
    lines: Lines | int
    documents = nodes = 0
    value: Any
    while (event := parser.get_event()) is not None:
        kind = type(event)
        line = event.start_mark.line + 1
        if cut is not None:
            line = cut.line(line)
        nodes += 1
        if nodes > MAX_NODES:
            raise YAMLError(line, f"more than {MAX_NODES:,} keys, values and list items: keep "
                            "long address lists in list files")
        if kind is yaml.ScalarEvent:
            _plain(event, line)
            if cut is not None and cut.nonce in event.value:
                first, run = cut.run(event, top)
                nodes += len(run) - 1
                if nodes > MAX_NODES:
                    raise _Uncut  # libyaml's reading names the line
                top.data.extend(run)  # type: ignore[union-attr]
                top.lines.items.extend(range(first, first + len(run)))  # type: ignore
                continue
            if top is not None and top.is_map and top.key is None:
                _take_key(top, event, line)
                continue
            value, lines = _scalar(event, line), line
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            assert top is not None
            value, lines = top.data, top.lines
            stack.pop()
            top = stack[-1] if stack else None
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            _plain(event, line)
            if len(stack) >= MAX_DEPTH:
                raise YAMLError(line, f"nested more than {MAX_DEPTH} levels deep")
            if top is not None and top.is_map and top.key is None:
                raise YAMLError(line, "a key is a plain word, not a mapping or a list")
            if kind is yaml.MappingStartEvent:
                top = _Open({}, Lines(line, keys={}))
            else:
                top = _Open([], Lines(line, items=[]))
            stack.append(top)
            continue
        elif kind is yaml.AliasEvent:
            raise YAMLError(line, "YAML aliases (*name) are not allowed in a policy: write the "
                            "value out, or use a named list", f"*{event.anchor}")
        elif kind is yaml.DocumentStartEvent:
            documents += 1
            if documents > 1:
                raise YAMLError(line, "more than one YAML document: a policy is one document")
            continue
        else:  # stream start and end, document end
            continue
        if top is None:
            root = (value, Lines(lines) if isinstance(lines, int) else lines)
        elif top.is_map:
            key = top.key
            assert key is not None
            # a key's line is where errors point
            if isinstance(lines, int):
                lines = top.key_line
            else:
                lines.line = top.key_line
            top.data[key] = value  # type: ignore[call-overload]
            top.lines.keys[key] = lines  # type: ignore[index]
            top.key = None
        else:
            top.data.append(value)  # type: ignore[union-attr]
            top.lines.items.append(lines)  # type: ignore[union-attr]
    if root is None:
        return Located(None, Lines(1))
    return Located(*root)


def _plain(event: Any, line: int) -> None:
    """Refuse anchors and tags: see the module's docstring."""
    if event.anchor is not None:
        raise YAMLError(line, "YAML anchors (&name) are not allowed in a policy",
                        f"&{event.anchor}")
    if event.tag is not None:
        tag = str(event.tag)
        raise YAMLError(line, "YAML tags are not allowed in a policy",
                        "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag)


def _take_key(mapping: _Open, event: Any, line: int) -> None:
    key = str(event.value)
    if event.style == "" and key == "<<":
        raise YAMLError(line, "YAML merge keys (<<) are not allowed in a policy", key)
    if key in mapping.data:
        raise YAMLError(line, f"duplicate key {key!r}", key)
    mapping.key, mapping.key_line = key, line


# First characters of plain scalars that YAML 1.1 may type (null, bool, int, float, timestamp).
_MAYBE_TYPED = frozenset(c for c in _resolver.yaml_implicit_resolvers if c is not None)


_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]{0,99})\Z")


def _scalar(event: Any, line: int) -> object:
    """A plain scalar's YAML 1.1 type (see the module's docstring); quoted ones are strings."""
    value: str = event.value
    if not event.implicit[0]:  # quoted, or a block scalar
        return value
    if _DECIMAL.match(value):  # the common number: a port, a version
        return int(value)
    if (value and value[0] not in _MAYBE_TYPED) or ":" in value or "/" in value \
            or value.count(".") > 1:  # a word, an address, a CIDR, a time: never a number
        return value
    tag = _resolver.resolve(yaml.ScalarNode, value, (True, False))
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        return _constructor.bool_values[value.lower()]
    if tag in (_TAG + "int", _TAG + "float"):
        make = _constructor.construct_yaml_int if tag.endswith("int") else \
            _constructor.construct_yaml_float
        try:
            return make(yaml.ScalarNode(tag, value))
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise YAMLError(line, "number too large", value) from None
    return value
