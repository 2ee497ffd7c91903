"""The one place that starts subprocesses: argv lists only, a fixed environment, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess

from .errors import OperationalError

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(argv: list[str], *, stdin: str | None = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", _PATH) + ":" + _PATH, "LC_ALL": "C"}
    if shutil.which(argv[0], path=env["PATH"]) is None:
        raise OperationalError(f"{argv[0]} not found: install it (package "
                               f"{_PACKAGES.get(argv[0], argv[0])})")
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise OperationalError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise OperationalError(f"{' '.join(argv[:3])} failed: {detail}")
    return proc


_PACKAGES = {"nft": "nftables", "conntrack": "conntrack", "unshare": "util-linux"}
