"""What apply last wrote, kept next to the host lock, so that the next apply can say what changes
without reading a table of a million addresses back from the kernel.

The record is keyed by the table's stamp: it describes the live table only while the table
carries that stamp (the same inputs made both). Anything else (no record, another stamp, an
unreadable file) means "unknown" and the caller reads the kernel instead. Two lines: a small
header (stamp, warnings) that a no-op apply reads alone, then the ruleset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import struct
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stamp import Stamp

# The rules' types load with the first decode: a no-op `apply` reads only the warnings.
if TYPE_CHECKING:
    from .model import Gate, Ruleset, Sources

DIRECTORY = Path("/run/dockfence")
_BYTES = {4: 5, 6: 17}  # bytes of a block: 32 or 128 address bits and 8 of prefix length


def _path() -> Path:
    return DIRECTORY / f"applied.{os.stat('/proc/self/ns/net').st_ino}.json"


def _blocks_hex(version: int, blocks: tuple[int, ...]) -> str:
    return b"".join(map(int.to_bytes, blocks, repeat(_BYTES[version]), repeat("big"))).hex()


def _hex_blocks(version: int, text: str) -> tuple[int, ...]:
    data, w = bytes.fromhex(text), _BYTES[version]
    if len(data) % w:
        raise ValueError(f"a record's IPv{version} blocks are {w} bytes each")
    # the per-block loop in C: a million blocks in 0.3 s rather than 0.5 s
    return tuple(map(int.from_bytes, map(itemgetter(0), struct.iter_unpack(f"{w}s", data)),
                     repeat("big")))


def encode(rs: Ruleset) -> dict[str, Any]:
    sources: dict[Sources, int] = {}
    listed: list[dict[str, Any]] = []

    def ref(s: Sources) -> int:
        if s not in sources:
            sources[s] = len(listed)
            listed.append({"any": s.any, "v4": _blocks_hex(4, s.v4), "v6": _blocks_hex(6, s.v6),
                           "names": list(s.names), "deny_v4": _blocks_hex(4, s.deny_v4),
                           "deny_v6": _blocks_hex(6, s.deny_v6)})
        return sources[s]

    def gate(g: Gate) -> list[Any]:
        # the host address last, only when keyed on one: records of port gates stay as they were
        return [g.proto, g.ports.first, g.ports.last, ref(g.sources), g.label, g.origin,
                *([str(g.host)] if g.host is not None else [])]

    return {
        "container_gates": [gate(g) for g in rs.container_gates],
        "unknown": [rs.unknown_published, rs.unknown_origin],
        "outside": rs.outside,
        "bridges": list(rs.docker_bridges),
        "direct": [[str(d.address), d.proto, d.port, ref(d.sources), d.label, d.origin]
                   for d in rs.direct],
        "host": None if rs.host is None else [[gate(g) for g in rs.host.gates], rs.host.default,
                                             rs.host.origin],
        "sources": listed,
    }


def decode(doc: dict[str, Any]) -> Ruleset:
    from .model import DirectGate, Gate, HostRules, PortRange, Ruleset, Sources

    sources = [Sources(any=s["any"], v4=_hex_blocks(4, s["v4"]), v6=_hex_blocks(6, s["v6"]),
                       names=tuple(s["names"]), deny_v4=_hex_blocks(4, s.get("deny_v4", "")),
                       deny_v6=_hex_blocks(6, s.get("deny_v6", ""))) for s in doc["sources"]]

    def gate(g: list[Any]) -> Gate:
        return Gate(g[0], PortRange(g[1], g[2]), sources[g[3]], g[4], g[5],
                    ipaddress.ip_address(g[6]) if len(g) > 6 else None)

    host = doc["host"]
    return Ruleset(
        container_gates=tuple(gate(g) for g in doc["container_gates"]),
        unknown_published=doc["unknown"][0],
        unknown_origin=doc["unknown"][1],
        outside=tuple(doc["outside"]) if doc["outside"] is not None else None,
        docker_bridges=tuple(doc["bridges"]),
        direct=tuple(DirectGate(ipaddress.ip_address(d[0]), d[1], d[2], sources[d[3]], d[4],
                                d[5]) for d in doc["direct"]),
        host=None if host is None else HostRules(tuple(gate(g) for g in host[0]), host[1],
                                                 host[2]),
    )


def save(stamp: Stamp, rs: Ruleset) -> None:
    """Best effort: without a record the next apply reads the kernel, nothing worse."""
    try:
        DIRECTORY.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = _path()
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(json.dumps({"stamp": stamp.text(), "warnings": list(rs.warnings)}) + "\n")
            fh.write(json.dumps(encode(rs)) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def forget() -> None:
    with contextlib.suppress(OSError):
        _path().unlink()


def warnings(stamp: Stamp) -> list[str] | None:
    """The warnings of the ruleset recorded for this stamp (reads the small header only)."""
    try:
        with open(_path()) as fh:
            head = json.loads(fh.readline())
        return list(head["warnings"]) if head.get("stamp") == stamp.text() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ruleset(stamp: Stamp) -> Ruleset | None:
    """The ruleset recorded for this stamp, or None when unknown."""
    try:
        with open(_path()) as fh:
            head = json.loads(fh.readline())
            if head.get("stamp") != stamp.text():
                return None
            rs = decode(json.loads(fh.readline()))
        return dataclasses.replace(rs, warnings=tuple(head["warnings"]))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
