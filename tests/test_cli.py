"""The command-line contract that needs neither root nor Docker: validation, usage errors and
exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from dockfence.cli import main

from helpers import POLICY


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
