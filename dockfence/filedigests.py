"""Content digests of the files a policy reads (list files, downloaded lists' saved copies),
remembered with the files' stat data, so that a no-op `apply` need not read and hash a list of a
million entries again.

Like git's index: a remembered digest is trusted while the file's device, inode, size, mtime
and ctime are those it had when it was hashed, and only if its mtime and ctime were already
RACY_NS older than that moment. Any write after the hashing then moves ctime (only the kernel
sets ctime, to the current time: `touch -d` cannot put it back), and a write in the same
timestamp tick as the hashing cannot hide behind a coarse timestamp: such a file is hashed
again each time until it is old enough. Any doubt (no memo, odd JSON, another owner) means the
file is read and hashed. The memo is volatile and root's, beside the others in /run/dockfence.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .stamp import sha256

MEMO = Path("/run/dockfence/digests.json")
RACY_NS = 3_000_000_000  # covers 1-2 s timestamp granularity and the kernel's coarse clock
KEEP = 64  # entries kept: the files just asked for first, then the most recently hashed
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


def of_bytes(data: bytes) -> str:
    """A file's digest: SHA-256 of its bytes (what listurls records for a saved copy, too)."""
    h = sha256(len(data))
    h.update(data)
    return str(h.hexdigest())


@dataclass(frozen=True)
class Hashed:
    """A file's digest and its stat data at the moment it was hashed (`at`, ns since 1970)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    digest: str
    at: int

    @staticmethod
    def of(st: os.stat_result, digest: str, at: int) -> Hashed:
        return Hashed(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, digest,
                      at)

    @property
    def stat(self) -> tuple[int, ...]:
        return self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns

    def trusted(self) -> bool:
        """Was the file's last change long enough before the hashing that any later one shows?"""
        return max(self.mtime_ns, self.ctime_ns) + RACY_NS <= self.at

    def vouches_for(self, st: os.stat_result) -> bool:
        """Does this entry give the digest of the file that has this stat data now?"""
        return self.trusted() and self.stat == (st.st_dev, st.st_ino, st.st_size,
                                                st.st_mtime_ns, st.st_ctime_ns)


def read(path: str | Path) -> tuple[bytes, Hashed]:
    """The file's bytes and digest, with the stat data taken before they were read (a write
    while reading leaves an entry that is not trusted, or that the next stat contradicts)."""
    at = time.time_ns()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        data = fh.read()
    return data, Hashed.of(st, of_bytes(data), at)


def _hash_file(path: str) -> Hashed:
    """read() without keeping the bytes: hashed in chunks, no copy of a big list in memory."""
    at = time.time_ns()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        h = sha256(st.st_size)
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return Hashed.of(st, h.hexdigest(), at)


class Memo:
    """The remembered digests: ask with digest(), tell with note(), then save() once."""

    def __init__(self) -> None:
        self.known = _load()
        self.asked: dict[str, Hashed] = {}  # trusted entries of this run's files
        self.seen: set[str] = set()  # this run's files: their old entries go
        self.changed = False

    def digest(self, path: str | Path) -> str:
        """The digest of the file's bytes now: remembered while stat vouches for it, else read
        and hashed. OSError as reading it raises."""
        key = os.path.abspath(path)
        known = self.asked.get(key) or self.known.get(key)
        if known is not None:
            with contextlib.suppress(OSError):  # reading it tells what is wrong
                if known.vouches_for(os.stat(key)):
                    self.seen.add(key)
                    self.asked[key] = known
                    return known.digest
        hashed = _hash_file(key)
        self.note(key, hashed)
        return hashed.digest

    def note(self, path: str | Path, hashed: Hashed) -> None:
        """A file just read and hashed; only an entry that may be trusted later is kept."""
        key = os.path.abspath(path)
        known = self.asked.get(key) or self.known.get(key)
        self.seen.add(key)
        if not hashed.trusted():
            self.asked.pop(key, None)
            self.changed |= key in self.known  # a stale entry goes
            return
        if known is not None and known.trusted() and (known.stat, known.digest) == (
                hashed.stat, hashed.digest):
            self.asked[key] = known  # as remembered: nothing to write
            return
        self.asked[key] = hashed
        self.changed = True

    def save(self) -> None:
        """Write the memo if anything changed: this run's files first, at most KEEP entries
        (more only if this run asked for more)."""
        if not self.changed:
            return
        others = sorted(((k, h) for k, h in self.known.items() if k not in self.seen),
                        key=lambda kv: kv[1].at, reverse=True)
        _save(dict([*self.asked.items(), *others][:max(KEEP, len(self.asked))]))
        self.changed = False


def remember(hashed: dict[str, Hashed]) -> None:
    """Note files read and hashed elsewhere (policy.load), keyed by path."""
    if not hashed:
        return
    memo = Memo()
    for path, h in hashed.items():
        memo.note(path, h)
    memo.save()


def _load() -> dict[str, Hashed]:
    """The memo's entries; none at all on any doubt (its files are then hashed)."""
    try:
        fd = os.open(MEMO, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:  # only our own word counts
                return {}
            doc = json.loads(fh.read())
        out = {}
        for path, entry in doc["files"].items():
            *numbers, digest, at = entry
            if not (len(numbers) == 5 and all(type(n) is int for n in (*numbers, at))
                    and isinstance(digest, str) and _DIGEST_RE.match(digest)
                    and isinstance(path, str) and os.path.isabs(path)):
                return {}
            out[path] = Hashed(*numbers, digest, at)
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _save(entries: dict[str, Hashed]) -> None:
    """Replace the memo atomically, created 0600; quietly nothing without /run/dockfence or as
    another user (the memo only saves time)."""
    doc = {"files": {path: [h.dev, h.ino, h.size, h.mtime_ns, h.ctime_ns, h.digest, h.at]
                     for path, h in entries.items()}}
    tmp = MEMO.with_name(f".{MEMO.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "wb") as fh:
            fh.write(json.dumps(doc).encode())
        os.replace(tmp, MEMO)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
