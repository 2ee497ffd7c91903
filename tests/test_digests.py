"""The digests behind a no-op `apply`: policy.load and listfiles.inputs_digest agree, and the memo
of file digests (dockfence.filedigests) is trusted only while stat data vouches for a file that
was already old when it was hashed (git's "racy" rule). conftest keeps the memo in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dockfence import filedigests, listfiles, listurls, policy, stamp

from helpers import POLICY

LATER = 10_000_000_000  # ns: a clock this far ahead finds every file written here old enough


def later_clock(monkeypatch: pytest.MonkeyPatch, ahead: int = LATER) -> None:
    """filedigests sees a clock `ahead` ns later: what it hashes now counts as long settled."""
    monkeypatch.setattr(filedigests, "time", types.SimpleNamespace(
        time_ns=lambda: time.time_ns() + ahead))


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths filedigests reads and hashes, in order."""
    seen: list[str] = []
    real = filedigests._hash_file

    def counted(path: str) -> filedigests.Hashed:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(filedigests, "_hash_file", counted)
    return seen


def with_list(tmp_path: Path, text: str = "203.0.113.0/28\n") -> tuple[Path, Path]:
    geo = tmp_path / "geo.txt"
    geo.write_text(text)
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("lists:\n", "lists:\n  geo: {file: geo.txt}\n"))
    return path, geo


def digest(path: Path) -> str | None:
    return listfiles.inputs_digest(str(path))


def until(changed: Callable[[], bool], action: Callable[[], None]) -> None:
    """Repeat `action` until `changed()` (a new ctime needs the kernel's clock to tick)."""
    deadline = time.monotonic() + 10
    while not changed():
        assert time.monotonic() < deadline, "the condition never came"
        action()


def test_load_and_inputs_digest_agree_on_list_files_from_memo_or_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    path, geo = with_list(tmp_path)
    later_clock(monkeypatch)
    first = policy.load(path).digest
    assert digest(path) == first and hashes == []  # load's reading was remembered
    assert digest(path) == first and hashes == []
    filedigests.MEMO.unlink()
    assert digest(path) == first and hashes == [str(geo)]  # hashed afresh: the same digest
    geo.write_text("198.51.100.0/24\n203.0.113.0/29\n")  # another size: the clock is faked
    assert digest(path) == policy.load(path).digest != first


def test_load_and_inputs_digest_agree_on_a_downloaded_lists_saved_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    monkeypatch.setenv("DOCKFENCE_STATE_DIR", str(tmp_path / "state"))
    lu = listurls.ListURL("cdn", "https://lists.example/cdn.txt")
    listurls.save(lu, b"203.0.113.0/28\n", time.time())
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("lists:\n", f"lists:\n  cdn: {{url: {lu.url}}}\n"))
    first = digest(path)
    assert first is not None and first == policy.load(path).digest
    assert hashes == [str(lu.copy)]
    later_clock(monkeypatch)
    assert policy.load(path).digest == first and digest(path) == first
    assert hashes == [str(lu.copy)]  # load hashed it (and remembered); the digest trusted that
    listurls.save(lu, b"203.0.113.0/29\n", time.time())  # a refresh: a new copy, a new inode
    assert digest(path) == policy.load(path).digest != first
    lu.copy.write_bytes(b"198.51.100.0/29\n")  # damaged: the no-op sees it, the load refuses it
    assert digest(path) not in (None, first)
    with pytest.raises(listurls.MissingCopy):
        policy.load(path)


def test_a_remembered_digest_is_not_read_again_and_the_memo_is_roots_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    path, geo = with_list(tmp_path)
    later_clock(monkeypatch)
    first = digest(path)
    assert hashes == [str(geo)]
    assert os.stat(filedigests.MEMO).st_mode & 0o777 == 0o600
    assert digest(path) == first and hashes == [str(geo)]
    # the memo is believed (a forged digest shows) only while it is this user's and private
    doc = json.loads(filedigests.MEMO.read_text())
    doc["files"][str(geo)][5] = "0" * 64
    filedigests.MEMO.write_text(json.dumps(doc))
    forged = digest(path)
    assert forged != first and len(hashes) == 1
    os.chmod(filedigests.MEMO, 0o620)
    assert digest(path) == first and len(hashes) == 2


@pytest.mark.parametrize("back", [0, 3600], ids=["as-written", "mtime-set-back"])
def test_a_file_hashed_within_the_racy_window_is_hashed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str], back: int) -> None:
    """Timestamps of 2 s granularity (as on FAT, or a coarse clock): a rewrite of the same size
    just after the hashing leaves stat as it was; only the racy rule sees it. An mtime set back
    (cp -p, tar) does not make a fresh file look settled: its ctime is new."""

    def coarse(st: os.stat_result) -> Any:
        two = 2_000_000_000
        fields = {f: getattr(st, f) for f in dir(st) if f.startswith("st_")}
        return types.SimpleNamespace(**{**fields, "st_mtime_ns": st.st_mtime_ns // two * two,
                                        "st_ctime_ns": st.st_ctime_ns // two * two})

    coarse_os = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if n[0] != "_"})
    coarse_os.stat = lambda p: coarse(os.stat(p))
    coarse_os.fstat = lambda fd: coarse(os.fstat(fd))
    monkeypatch.setattr(filedigests, "os", coarse_os)
    path, geo = with_list(tmp_path)
    mtime = os.stat(geo).st_mtime_ns - back * 1_000_000_000
    os.utime(geo, ns=(mtime, mtime))
    first = digest(path)
    geo.write_text("203.0.113.0/29\n")  # same size, and the mtime it had
    os.utime(geo, ns=(mtime, mtime))
    assert digest(path) == policy.load(path).digest != first
    assert len(hashes) == 2
    # the rule is what saw it: trusting the same entry would have missed the rewrite
    entry = filedigests.read(geo)[1]
    assert not entry.trusted()
    assert not entry.vouches_for(coarse(os.stat(geo)))
    settled = filedigests.Hashed(*entry.stat, entry.digest, entry.at + filedigests.RACY_NS)
    assert settled.vouches_for(coarse(os.stat(geo)))


@pytest.mark.parametrize("field", ["st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns"])
def test_each_stat_field_that_moves_invalidates(tmp_path: Path, field: str) -> None:
    geo = tmp_path / "geo.txt"
    geo.write_text("203.0.113.0/28\n")
    st = os.stat(geo)
    entry = filedigests.Hashed.of(st, "0" * 64, time.time_ns() + LATER)
    now = types.SimpleNamespace(**{f: getattr(st, f) for f in (
        "st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")})
    assert entry.vouches_for(now)  # type: ignore[arg-type]
    setattr(now, field, getattr(now, field) + 1)
    assert not entry.vouches_for(now)  # type: ignore[arg-type]


def test_real_changes_are_seen_after_the_digest_was_remembered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[str]) -> None:
    path, geo = with_list(tmp_path)
    later_clock(monkeypatch)
    digests = [digest(path)]

    def was(st: os.stat_result) -> Callable[[], bool]:
        return lambda: os.stat(geo).st_ctime_ns != st.st_ctime_ns

    # the same size and mtime, other bytes: only ctime tells
    st = os.stat(geo)
    until(was(st), lambda: geo.write_text("203.0.113.0/29\n"))
    os.utime(geo, ns=(st.st_atime_ns, st.st_mtime_ns))
    digests.append(digest(path))
    # a bigger file
    with geo.open("a") as fh:
        fh.write("198.51.100.7\n")
    digests.append(digest(path))
    # replaced by another file (another inode) of the same size and mtime
    st = os.stat(geo)
    other = tmp_path / "other.txt"
    other.write_text("198.51.100.0/28\n198.51.100.7\n")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, geo)
    digests.append(digest(path))
    assert len(set(digests)) == 4 and len(hashes) == 4
    assert digests[-1] == policy.load(path).digest


@pytest.mark.parametrize("memo", [
    "not json", "[]", '{"files": []}', '{"files": {"/x": [1, 2]}}',
    '{"files": {"%s": [1, 2, 3, 4, 5, "nothex", 6]}}', '{"files": {"%s": [1, 2, 3, 4, 5, 6, 7]}}',
    '{"files": {"%s": [1, 2, 3, 4, true, "%s", 6]}}', '{"files": {"geo.txt": "x"}}',
])
def test_a_damaged_memo_means_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      hashes: list[str], memo: str) -> None:
    path, geo = with_list(tmp_path)
    later_clock(monkeypatch)
    want = digest(path)
    assert len(hashes) == 1
    filedigests.MEMO.write_text(memo.replace("%s", str(geo), 1).replace("%s", "0" * 64))
    os.chmod(filedigests.MEMO, 0o600)
    assert digest(path) == want and len(hashes) == 2
    assert digest(path) == want and len(hashes) == 2  # written afresh, trusted again


def test_the_memo_stays_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    later_clock(monkeypatch)
    files = []
    for i in range(filedigests.KEEP + 5):
        files.append(tmp_path / f"l{i}.txt")
        files[-1].write_text(f"198.51.100.{i}\n")
        memo = filedigests.Memo()
        memo.digest(files[-1])
        memo.save()
    kept = json.loads(filedigests.MEMO.read_text())["files"]
    assert len(kept) == filedigests.KEEP
    assert str(files[-1]) in kept and str(files[0]) not in kept  # the oldest went first


def test_a_file_just_written_is_not_remembered(tmp_path: Path, hashes: list[str]) -> None:
    path, geo = with_list(tmp_path)
    assert digest(path) == digest(path) == policy.load(path).digest
    assert hashes == [str(geo)] * 2
    assert not filedigests.MEMO.exists()  # nothing it could trust later: nothing written


@pytest.mark.parametrize("size", [0, 1, 4096, stamp.OPENSSL_FROM - 1, stamp.OPENSSL_FROM,
                                  3 * stamp.OPENSSL_FROM + 7])
def test_sha256_is_the_same_digest_from_either_implementation(tmp_path: Path, size: int) -> None:
    """Small inputs are hashed by CPython's own SHA-256, big ones by OpenSSL's: the digests
    (recorded in tables, memos and downloads' descriptions) are SHA-256 either way."""
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    path = tmp_path / "list.txt"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert filedigests.of_bytes(data) == expected
    assert filedigests._hash_file(str(path)).digest == expected
    assert stamp.digest(data) == hashlib.sha256(
        len(data).to_bytes(8, "big") + data).hexdigest()[:32]
    builtin = size < stamp.OPENSSL_FROM
    assert (type(stamp.sha256(size)).__module__ == "_hashlib") != builtin
