"""Address lists kept in files (`lists: {geo: {file: lists/geo.txt}}`): where they are, reading
them, and the digest of everything a policy reads, without the policy's validator.

A list file holds one address or CIDR per line; `#` starts a comment, blank lines are fine.
Relative paths are resolved against the policy's folder. Entries are validated straight into
integer blocks (dockfence.addresses): a million-line file costs no `ipaddress` object.
"""

from __future__ import annotations

import functools
import json
import operator
import os
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

from . import addresses, filedigests, stamp
from .errors import PolicyError


@dataclass(frozen=True)
class ListFile:
    """A list the policy reads from a file."""

    name: str  # the list's name in the policy
    shown: str  # the path as dockfence shows it: the policy's folder joined with what it wrote

    @staticmethod
    def at(name: str, written: str, policy_path: str) -> ListFile:
        path = Path(written).expanduser()
        if not path.is_absolute():
            path = Path(policy_path).parent / path
        return ListFile(name, os.path.normpath(path))

    def label(self) -> str:
        """How plan and status name the list: its name and where it came from."""
        return f"{self.name} (file {self.shown})"


def read_bytes(policy_path: str, line: int | None, lf: ListFile
               ) -> tuple[bytes, filedigests.Hashed]:
    """The list file's bytes and digest (for the policy's digest and the memo of digests)."""
    try:
        return filedigests.read(lf.shown)
    except OSError as exc:
        raise PolicyError(policy_path, line, f"cannot read list file {lf.shown} of list "
                          f"{lf.name!r}: {exc.strerror}", lf.shown) from None


def parse(lf: ListFile, data: bytes) -> tuple[list[int], list[int]]:
    """The file's (IPv4, IPv6) blocks; errors name the file, line and value."""
    return parse_at(lf.shown, data)


def parse_at(where: str, data: bytes) -> tuple[list[int], list[int]]:
    """The (IPv4, IPv6) blocks of a list's text; errors name `where`, the line and value."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise PolicyError(where, line, "not UTF-8 text") from None
    lines = text.splitlines()
    if "#" in text:  # C loops (map) throughout: a million lines cost no Python bytecode each
        lines = list(map(operator.itemgetter(0), map(str.partition, lines, repeat("#"))))
    cleaned = list(map(str.strip, lines))
    try:
        return addresses.parse_many(list(filter(None, cleaned)))
    except addresses.BadEntry as exc:
        numbers = [i for i, entry in enumerate(cleaned, 1) if entry]
        raise PolicyError(where, numbers[exc.index], str(exc), exc.text) from None


def policy_digest(policy_path: str, text: str | bytes,
                  lists: list[tuple[ListFile, str]],
                  downloaded: list[tuple[str, str, str]] | None = None) -> str:
    """The digest of everything a policy's rules are made of: the path as given (origins quote
    it), where it is (relative list files depend on it), its text (as UTF-8 bytes), each list
    file, and the saved copy of each downloaded list (name, URL). Files count by their digest
    (filedigests.of_bytes), which a memo can vouch for without reading a big list again."""
    data = text if isinstance(text, bytes) else text.encode()
    chunks = [policy_path.encode(), os.path.abspath(policy_path).encode(), data]
    for lf, digest in lists:
        chunks += [lf.name.encode(), lf.shown.encode(), os.path.abspath(lf.shown).encode(),
                   digest.encode()]
    for name, url, digest in downloaded or []:
        chunks += [b"url", name.encode(), url.encode(), digest.encode()]
    return stamp.digest(*chunks)


def discover(text: str, policy_path: str) -> list[tuple[str, str, Any]] | None:
    """(name, "file", written path) of the list files a policy names and (name, "url", its
    mapping) of its downloaded lists, found without validating it, so that `apply` can tell
    "nothing changed" cheaply; None when unsure (the caller then loads the policy properly).
    A policy that never spells `file` or `url` (nor escapes a character, which YAML could use
    to spell them) has none, and its YAML need not even be parsed."""
    if "file" not in text and "url" not in text and "\\" not in text:
        return []
    return _discover(text)


# What _discover() found for the last policy text, by that text's digest: a no-op `apply` of a
# policy with list files then needs no YAML parser (its import alone is ~15 ms).
MEMO = Path("/run/dockfence/discovered.json")  # beside record.py's: volatile, root's


@functools.lru_cache(maxsize=2)  # apply asks twice (refresh, then the digest): parse once
def _discover(text: str) -> list[tuple[str, str, Any]] | None:
    key = stamp.digest(text.encode())
    try:
        memo = json.loads(MEMO.read_text())
        if memo.get("text") == key:
            found = memo["found"]
            return None if found is None else [tuple(f) for f in found]
    except (OSError, ValueError, AttributeError):
        pass
    found = _parse_lists(text)
    try:
        tmp = MEMO.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"text": key, "found": found}))
        os.replace(tmp, MEMO)
    except (OSError, TypeError, ValueError):  # no /run/dockfence yet, or a value JSON lacks
        pass
    return found


def _parse_lists(text: str) -> list[tuple[str, str, Any]] | None:
    try:
        import yaml

        doc = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except Exception:  # any doubt: the full load decides, with its errors
        return None
    lists = doc.get("lists") if isinstance(doc, dict) else None
    if lists is None:
        return []
    if not isinstance(lists, dict):
        return None
    found: list[tuple[str, str, Any]] = []
    for name, value in lists.items():
        if isinstance(value, dict):
            if isinstance(value.get("file"), str):
                found.append((str(name), "file", value["file"]))
            elif isinstance(value.get("url"), str):
                found.append((str(name), "url", value))
            else:
                return None
    return found


def read_text(policy_path: str) -> str | None:
    """The policy's text, None when it cannot be read as UTF-8 (the full load says why)."""
    try:
        return Path(policy_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def inputs_digest(policy_path: str, text: str | None = None) -> str | None:
    """policy_digest() of the policy as it is on disk now (`text`: as the caller just read
    it), or None when only a full load can tell (unreadable, odd YAML): cheap, nothing is
    validated, and a list file or saved copy is read and hashed only when the memo of digests
    cannot vouch for it (filedigests)."""
    text = read_text(policy_path) if text is None else text
    if text is None:
        return None
    found = discover(text, policy_path)
    if found is None:
        return None
    if not found:  # no list file, no download: no memo to read
        return policy_digest(policy_path, text, [])
    memo = filedigests.Memo()
    lists, downloaded = [], []
    try:
        for name, kind, value in found:
            if kind == "url":
                from .listurls import LIST_NAME_RE, ListURL, good_copy

                copy = good_copy(ListURL(name, value["url"])) \
                    if LIST_NAME_RE.match(name) else None
                if copy is None:
                    return None
                downloaded.append((name, value["url"], memo.digest(copy)))
            else:
                lf = ListFile.at(name, value, policy_path)
                lists.append((lf, memo.digest(lf.shown)))
    except OSError:
        return None
    memo.save()
    return policy_digest(policy_path, text, lists, downloaded)
