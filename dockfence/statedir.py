"""Where dockfence keeps a record of what it applied ($DOCKFENCE_STATE_DIR, default
/var/lib/dockfence), so that a table gone missing (`nft flush ruleset`) is told apart from a
host where dockfence was never applied. The watch/restore side writes the record; this side
only asks whether one exists."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT = "/var/lib/dockfence"


def state_dir() -> Path:
    return Path(os.environ.get("DOCKFENCE_STATE_DIR") or DEFAULT)


def applied_record() -> str | None:
    """The path of the record of an earlier apply (dockfence.state's table), or None."""
    path = state_dir() / "table.nft"
    return str(path) if path.is_file() else None
