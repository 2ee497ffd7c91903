"""The record of what dockfence applied, so `restore` can load it at boot before Docker starts.

Two files under $DOCKFENCE_STATE_DIR (default /var/lib/dockfence):
- `table.nft`: the last full table, as rendered, after a header line naming its generation
  and the digest of the text;
- `journal.nft`: watch's updates since, each after a header naming the generation it applies
  to, its length and digest; an update is the new content of every set or map it touched
  (`flush map ... NAME` + `add element ...`), so restore keeps only the last one of each.
  A full apply starts a new generation, so entries left from an older one are ignored
  (compaction needs no rewrite of a 100k-entry table per event).

Both are written before the kernel changes and undone if the kernel refuses. A journal entry
cut short (a crash while writing it) was never applied to the kernel either, so it is dropped;
anything else that does not check out is damage, and restore refuses to load it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import OperationalError
from .stamp import digest
from .statedir import state_dir

FORMAT = 1
TABLE_FILE, JOURNAL_FILE = "table.nft", "journal.nft"
_TABLE_HEADER = re.compile(rf"^# dockfence state {FORMAT} generation=([0-9a-f]{{16}}) "
                           r"digest=([0-9a-f]{32})$")
_ENTRY_HEADER = re.compile(r"^# entry generation=([0-9a-f]{16}) bytes=(\d+) "
                           r"digest=([0-9a-f]{32})$")

Undo = Callable[[], None]


class StateError(OperationalError):
    """The record cannot be written, or what was read back is damaged."""




def _sum(text: str) -> str:
    return digest(text.encode())


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def latest(entries: list[str]) -> str:
    """The journal's entries are blocks that each start with `flush set|map ... NAME` and give
    that set or map its whole content: only the last block of each name counts."""
    blocks: dict[str, list[str]] = {}
    for entry in entries:
        for line in entry.splitlines(keepends=True):
            if line.startswith("flush "):
                name = line.split()[-1]
                blocks.pop(name, None)  # re-inserted last: the order of the last updates
                blocks[name] = [line]
            elif blocks:
                blocks[next(reversed(blocks))].append(line)
    return "".join("".join(b) for b in blocks.values())


class Record:
    """The state directory. Every write returns an Undo that puts the previous bytes back."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or state_dir()
        self.table_path = self.dir / TABLE_FILE
        self.journal_path = self.dir / JOURNAL_FILE
        self.generation: str | None = None

    def _prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.table_path.exists()

    def save_table(self, table: str) -> Undo:
        """Record a full table (a new generation; the journal starts empty)."""
        old_generation = self.generation
        generation = os.urandom(8).hex()  # secrets.token_hex, without its imports
        header = f"# dockfence state {FORMAT} generation={generation} digest={_sum(table)}\n"
        try:
            old_table, old_journal = _read(self.table_path), _read(self.journal_path)
            self._prepare()
            _write_atomically(self.table_path, (header + table).encode())
            self.journal_path.unlink(missing_ok=True)
        except OSError as exc:
            raise StateError(f"cannot record the applied rules in {self.dir}: {exc}; nothing "
                             "was changed (set DOCKFENCE_STATE_DIR to a writable directory)"
                             ) from None
        self.generation = generation

        def undo() -> None:
            self.generation = old_generation
            self._put_back(old_table, old_journal)
        return undo

    def append(self, update: str, durable: bool = True) -> Undo:
        """Record element updates made on top of the recorded table. With durable=False the
        entry reaches the page cache (a crash of this process cannot lose it) and sync()
        makes it durable later: watch syncs right after the kernel change, so a busy disk
        never delays enforcement."""
        if self.generation is None:
            self.generation = self._current_generation()
        if self.generation is None:
            raise StateError(f"no recorded table in {self.dir} to add updates to")
        data = update.encode()
        entry = (f"# entry generation={self.generation} bytes={len(data)} "
                 f"digest={_sum(update)}\n").encode() + data
        try:
            fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                size = os.fstat(fd).st_size
                os.write(fd, entry)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StateError(f"cannot record the update in {self.journal_path}: {exc}") from None

        def undo() -> None:
            with open(self.journal_path, "r+b") as fh:
                fh.truncate(size)
        return undo

    def sync(self) -> None:
        try:
            fd = os.open(self.journal_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def journal_size(self) -> int:
        try:
            return self.journal_path.stat().st_size
        except OSError:
            return 0

    def forget(self) -> None:
        """`dockfence remove`: nothing to bring back at the next boot."""
        for path in (self.journal_path, self.table_path):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StateError(f"cannot delete {path}: {exc}") from None
        self.generation = None

    def _put_back(self, table: bytes | None, journal: bytes | None) -> None:
        for path, data in ((self.table_path, table), (self.journal_path, journal)):
            if data is None:
                path.unlink(missing_ok=True)
            else:
                _write_atomically(path, data)

    def _current_generation(self) -> str | None:
        """The recorded table's generation, from its header line alone: what an update is
        appended under needs no read of the whole record (restore checks its digests)."""
        try:
            with open(self.table_path, "rb") as fh:
                head = fh.readline(256).decode(errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read the record in {self.dir}: {exc}") from None
        m = _TABLE_HEADER.match(head.rstrip("\n"))
        if m is None:
            raise StateError(f"{self.table_path} is damaged (header or digest does not match)")
        return m[1]

    def load(self) -> tuple[str, str] | None:
        """(generation, the table followed by its journal's updates), None when nothing was
        recorded; StateError when the record is unreadable or damaged."""
        try:
            raw = _read(self.table_path)
            journal = _read(self.journal_path) or b""
        except OSError as exc:
            raise StateError(f"cannot read the record in {self.dir}: {exc}") from None
        if raw is None:
            return None
        try:
            head, _, body = raw.decode().partition("\n")
        except UnicodeDecodeError:
            raise StateError(f"{self.table_path} is damaged (not text)") from None
        m = _TABLE_HEADER.match(head)
        if m is None or _sum(body) != m[2]:
            raise StateError(f"{self.table_path} is damaged (header or digest does not match)")
        generation = m[1]
        return generation, body + latest(self._entries(journal, generation))

    def _entries(self, journal: bytes, generation: str) -> list[str]:
        out, pos = [], 0
        while pos < len(journal):
            end = journal.find(b"\n", pos)
            if end < 0:
                break  # a header cut short: never applied
            m = _ENTRY_HEADER.match(journal[pos:end].decode(errors="replace"))
            if m is None:
                raise StateError(f"{self.journal_path} is damaged at byte {pos}")
            start, size = end + 1, int(m[2])
            if start + size > len(journal):
                break  # an entry cut short: the kernel never saw it
            try:
                body = journal[start:start + size].decode()
            except UnicodeDecodeError:
                raise StateError(f"{self.journal_path} is damaged at byte {start}") from None
            if _sum(body) != m[3]:
                raise StateError(f"{self.journal_path} is damaged at byte {start}")
            if m[1] == generation:
                out.append(body)
            pos = start + size
        return out
