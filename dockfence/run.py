"""The one place that starts subprocesses: argv lists only, a fixed environment, clear errors.

subprocess is imported on the first run, not with this module: an `apply` that changes nothing
reads the kernel over netlink and starts no process (~2 ms of start-up, scripts/bench_commands.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import OperationalError

if TYPE_CHECKING:
    import subprocess

T = TypeVar("T")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(argv: list[str], *, stdin: str | None = None, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", _PATH) + ":" + _PATH, "LC_ALL": "C"}
    if not _found(argv[0], env["PATH"]):
        raise OperationalError(f"{argv[0]} not found: install it (package "
                               f"{_PACKAGES.get(argv[0], argv[0])})")
    import subprocess

    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise OperationalError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise OperationalError(f"{' '.join(argv[:3])} failed: {detail}")
    return proc


def background(argv: list[str], *, stdin: str | None = None, check: bool = True,
               timeout: float = 60) -> Callable[[], subprocess.CompletedProcess[str]]:
    """run(argv), started now; what it returns waits for the result (and raises what run()
    would). A command whose answer is needed later runs beside the caller's own work, on
    another CPU (nft listing a big table while the policy is parsed and compiled, or loading
    one while the record of it is written)."""
    return later(lambda: run(argv, stdin=stdin, check=check, timeout=timeout), argv[0])


def later(work: Callable[[], T], name: str = "later") -> Callable[[], T]:
    """work() on a thread of its own, started now; the returned function waits for its result
    and raises what work() raised, in the caller's thread. For work that mostly waits (a
    process, a socket), so the caller's own work goes on meanwhile."""
    import threading

    box: dict[str, Any] = {}

    def run_it() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the caller, in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run_it, daemon=True, name=name)
    worker.start()

    def result() -> T:
        worker.join()
        if "error" in box:
            raise box["error"]
        return box["result"]  # type: ignore[no-any-return]
    return result


def _found(program: str, path: str) -> bool:
    """shutil.which(program, path=path) is not None, without shutil's imports (bz2, lzma)."""
    candidates = [program] if os.sep in program else [
        os.path.join(folder, program) for folder in path.split(os.pathsep) if folder]
    return any(os.access(c, os.X_OK) and not os.path.isdir(c) for c in candidates)


_PACKAGES = {"nft": "nftables", "conntrack": "conntrack", "unshare": "util-linux"}
