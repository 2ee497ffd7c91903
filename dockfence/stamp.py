"""What an applied table was made from, recorded inside the table itself.

The table carries a one-element set `stamp` whose element comment says which dockfence wrote it
and digests of the policy's inputs and of Docker's inventory. `apply` compares it with the
digests of the current inputs to answer "nothing changed" without reading big sets back, and
watch rewrites it in the same transaction as the elements it changes, so the stamp always
describes the table it sits in. Pure: hashing only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .inventory import Inventory

FORMAT = 1
_STAMP_RE = re.compile(
    r"^dockfence/(?P<format>\d+) (?P<version>\S+) policy=(?P<policy>[0-9a-f]{32}) "
    r"inventory=(?P<inventory>[0-9a-f]{32})$")


# Past this many bytes SHA-256 is OpenSSL's (hashlib: ~8x faster on a big inline list); below,
# CPython's own, as a no-op apply hashes only a small policy and the inventory: loading OpenSSL
# costs ~4 ms of its start-up, what CPython's hashes 0.4 MB in.
OPENSSL_FROM = 256 << 10


def sha256(size: int) -> Any:
    """A SHA-256 hasher for `size` bytes: the same digest, from the implementation that gives
    it soonest, counting the import."""
    if size < OPENSSL_FROM:
        for module in ("_sha256", "_sha2"):  # CPython's own: 3.11, then 3.12+
            with contextlib.suppress(ImportError):
                return importlib.import_module(module).sha256()
    import hashlib

    return hashlib.sha256()


def digest(*chunks: bytes) -> str:
    """A short content digest (128 bits of SHA-256), length-prefixed so chunks cannot blur."""
    h = sha256(sum(map(len, chunks)))
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "big"))
        h.update(chunk)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Stamp:
    """What a table was made from (see the module's docstring)."""

    policy: str  # digest of the policy's inputs: the policy file and every list it reads
    inventory: str  # digest of what Docker runs, as far as the rules depend on it
    version: str = __version__

    def text(self) -> str:
        return (f"dockfence/{FORMAT} {self.version} policy={self.policy} "
                f"inventory={self.inventory}")

    @staticmethod
    def parse(text: str) -> Stamp | None:
        """The stamp a table carries, or None for anything else (older format, edited)."""
        m = _STAMP_RE.match(text)
        if m is None or int(m["format"]) != FORMAT:
            return None
        return Stamp(m["policy"], m["inventory"], m["version"])


def inventory_digest(inv: Inventory) -> str:
    """The digest of what the rules depend on in Docker's inventory: container names and compose
    services (rules select by them, labels quote them), published ports, the addresses direct
    routing may reach, dockfence's own container labels, and the bridges. Container ids, other
    addresses and the firewall backend change nothing in the table, so a restart that keeps the
    ports costs no full apply."""
    containers = sorted(json.dumps([
        c.name, c.service, sorted(c.routed_addresses), c.labels,
        sorted(json.dumps([b.proto, b.host_ip, b.host_port, b.container_port])
               for b in c.bindings)]) for c in inv.containers)
    return digest(*(x.encode() for x in containers), b"bridges", *sorted(
        b.encode() for b in inv.bridges))
