"""What an applied table was made from, recorded inside the table itself.

The table carries a one-element set `stamp` whose element comment says which dockfence wrote it
and digests of the policy's inputs and of Docker's inventory. `apply` compares it with the
digests of the current inputs to answer "nothing changed" without reading big sets back, and
watch rewrites it in the same transaction as the elements it changes, so the stamp always
describes the table it sits in. Pure: hashing only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from . import __version__
from .model import Inventory

FORMAT = 1
_STAMP_RE = re.compile(
    r"^dockfence/(?P<format>\d+) (?P<version>\S+) policy=(?P<policy>[0-9a-f]{32}) "
    r"inventory=(?P<inventory>[0-9a-f]{32})$")


def digest(*chunks: bytes) -> str:
    """A short content digest (128 bits of SHA-256), length-prefixed so chunks cannot blur."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "big"))
        h.update(chunk)
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class Stamp:
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
    """The digest of what Docker runs, as far as the rules depend on it. (Stand-in until the
    speed work's version lands; watch and apply must use the same one.)"""
    return digest(repr(inv).encode())
