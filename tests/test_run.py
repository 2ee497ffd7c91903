"""dockfence.run: finding a program on PATH (as shutil.which does) before starting it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from dockfence.errors import OperationalError
from dockfence.run import _found, run


def test_found_agrees_with_shutil_which(tmp_path: Path) -> None:
    (tmp_path / "tool").write_text("#!/bin/sh\necho hello\n")
    (tmp_path / "tool").chmod(0o755)
    (tmp_path / "data").write_text("not a program\n")  # not executable
    (tmp_path / "folder").mkdir(mode=0o755)  # executable, but a directory
    path = os.pathsep.join(["", str(tmp_path / "absent"), str(tmp_path), "/usr/bin:/bin"])
    for program in ("tool", "data", "folder", "absent", "sh", str(tmp_path / "tool"),
                    str(tmp_path / "data"), str(tmp_path / "folder")):
        assert _found(program, path) == (shutil.which(program, path=path) is not None), program
    assert _found("tool", path) and not _found("data", path) and not _found("folder", path)


def test_missing_program_names_its_package(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("dockfence.run._PATH", str(tmp_path))
    with pytest.raises(OperationalError, match=r"nft not found: install it \(package nftables\)"):
        run(["nft", "list", "ruleset"])


def test_runs_a_program() -> None:
    assert run(["sh", "-c", "echo hello"]).stdout == "hello\n"
