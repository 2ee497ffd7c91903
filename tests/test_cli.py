"""The command-line contract that needs neither root nor Docker: validation, usage errors and
exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dockfence.cli import main

from helpers import POLICY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return str(path)


def test_check_prints_only_ok(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["check", "--policy", write(tmp_path, POLICY)])
    assert result.exit_code == 0
    assert result.output == "OK\n"


def test_check_reads_policy_from_environment(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    result = runner.invoke(main, ["check"], env={"DOCKFENCE_POLICY": path})
    assert result.exit_code == 0, result.output


def test_check_default_path_is_etc(runner: CliRunner) -> None:
    result = runner.invoke(main, ["check"], env={"DOCKFENCE_POLICY": None})
    assert result.exit_code == 2
    assert "/etc/dockfence/policy.yaml" in result.output


def test_bad_policy_exit_2_with_file_line_and_value(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, POLICY.replace("198.51.100.7]", "198.51.100.777]"))
    result = runner.invoke(main, ["check", "--policy", path])
    assert result.exit_code == 2
    assert f"{path}:14" in result.output and "198.51.100.777" in result.output


@pytest.mark.parametrize("args", [
    ["explain", "not-an-address", "8081"],
    ["explain", "203.0.113.5", "0"],
    ["explain", "203.0.113.5", "8081/icmp"],
    ["explain", "203.0.113.5", "8081", "--to", "nowhere"],
    ["apply", "--no-such-flag"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(runner: CliRunner, args: list[str]) -> None:
    assert runner.invoke(main, args).exit_code == 2


def test_docker_unreachable_is_operational(runner: CliRunner, tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    result = runner.invoke(main, ["plan", "--policy", path],
                           env={"DOCKER_HOST": f"unix://{tmp_path}/absent.sock"})
    assert result.exit_code == 1
    assert "cannot reach Docker" in result.output


# --- what each path loads (start-up cost: see scripts/bench_commands.py) ------------------------

HEAVY = {"msgspec", "yaml", "rich", "http.client", "ssl"}


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """The modules a fresh interpreter holds after running `code`."""
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(*sys.modules)"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "DOCKFENCE_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_help_loads_no_engine_validator_or_output_library(tmp_path: Path) -> None:
    loaded = _modules_after("from dockfence.cli import main", tmp_path)
    assert not loaded & (HEAVY | {"dockfence.engine", "dockfence.policy", "dockfence.discovery",
                                  "dataclasses"})


NO_OP_APPLY = """
import contextlib
from dockfence import engine, listfiles
from dockfence.model import Inventory
from dockfence.stamp import Stamp, inventory_digest
path = {path!r}
stamp = Stamp(listfiles.inputs_digest(path), inventory_digest(Inventory()))
engine.host_lock = lambda wait=0.0: contextlib.nullcontext()
engine.state.Record.exists = lambda self: True
engine.discovery.inventory = Inventory
engine.nft.live_stamp = lambda: stamp
engine.record.warnings = lambda st: [] if st == stamp else None
plan, cut = engine.apply(path)
assert plan.unchanged and plan.policy is None and cut == 0, plan
"""


def test_no_op_apply_loads_no_validator_compiler_or_diff(tmp_path: Path) -> None:
    """The stamp answers "nothing changed" (proven against real tables by test_enforcement's
    lab tests); here: that answer needs neither the policy validator, nor the compiler, the
    diff, bans, counters or the output and HTTP libraries."""
    path = write(tmp_path, POLICY)
    loaded = _modules_after(NO_OP_APPLY.format(path=path), tmp_path)
    assert "dockfence.engine" in loaded
    assert not loaded & (HEAVY | {"dockfence.policy", "dockfence.compile", "dockfence.plan",
                                  "dockfence.explain", "dockfence.bans", "dockfence.counters",
                                  "dockfence.located_yaml"})
