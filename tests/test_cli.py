"""The command-line contract that needs neither root nor Docker: validation, usage errors, help
and exit codes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dockfence import __version__, cli
from dockfence.cli import main

from helpers import POLICY

REPO = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """One command line in this process: exit code, stdout, stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return str(path)


def test_check_prints_only_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(capsys, "check", "--policy", write(tmp_path, POLICY)) == (0, "OK\n", "")


def test_check_reads_policy_from_environment(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKFENCE_POLICY", write(tmp_path, POLICY))
    code, stdout, stderr = run(capsys, "check")
    assert code == 0, stderr
    assert stdout == "OK\n"


def test_check_default_path_is_etc(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DOCKFENCE_POLICY", raising=False)
    code, _, stderr = run(capsys, "check")
    assert code == 2
    assert "/etc/dockfence/policy.yaml" in stderr


def test_empty_environment_variable_means_the_default(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKFENCE_POLICY", "")
    code, _, stderr = run(capsys, "check")
    assert code == 2
    assert "/etc/dockfence/policy.yaml" in stderr


def test_bad_policy_exit_2_with_file_line_and_value(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    path = write(tmp_path, POLICY.replace("198.51.100.7]", "198.51.100.777]"))
    code, stdout, stderr = run(capsys, "check", "--policy", path)
    assert code == 2
    assert stdout == ""
    assert f"{path}:14" in stderr and "198.51.100.777" in stderr


@pytest.mark.parametrize(("args", "named"), [
    (["explain", "not-an-address", "8081"], "'not-an-address'"),
    (["explain", "203.0.113.5", "0"], "'0'"),
    (["explain", "203.0.113.5", "65536/udp"], "'65536/udp'"),
    (["explain", "203.0.113.5", "8081/icmp"], "'8081/icmp'"),
    (["explain", "203.0.113.5", "8081", "--to", "nowhere"], "'nowhere'"),
    (["explain", "203.0.113.5"], "PORT"),
    (["apply", "--no-such-flag"], "--no-such-flag"),
    (["apply", "--pol", "x.yaml"], "--pol"),  # no abbreviations (click had none)
    (["apply", "--confirm", "0"], "0 is not in the range 1..3600"),
    (["apply", "--confirm", "3601"], "3601 is not in the range 1..3600"),
    (["apply", "--confirm", "soon"], "'soon'"),
    (["plan", "extra"], "extra"),
    (["ban"], "ADDRESS"),
    (["frobnicate"], "'frobnicate'"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_usage_errors_exit_2_naming_the_value(capsys: pytest.CaptureFixture[str],
                                              args: list[str], named: str) -> None:
    code, stdout, stderr = run(capsys, *args)
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("usage: dockfence")
    assert named in stderr.splitlines()[-1], stderr


def test_directory_as_a_file_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for args in (["check", "--policy", str(tmp_path)], ["init", "-o", str(tmp_path)]):
        code, _, stderr = run(capsys, *args)
        assert code == 2 and f"'{tmp_path}' is a directory" in stderr, (args, stderr)
    monkeypatch.setenv("DOCKFENCE_POLICY", str(tmp_path))  # the default is checked the same way
    code, _, stderr = run(capsys, "check")
    assert code == 2 and f"'{tmp_path}' is a directory" in stderr
    policy = write(tmp_path, POLICY)
    code, _, stderr = run(capsys, "demo", "--docker-bin-dir", policy)
    assert code == 2 and f"'{policy}' is not a directory" in stderr


def test_no_command_prints_help_as_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, stderr = run(capsys)
    assert code == 2 and stdout == ""
    assert stderr.startswith("usage: dockfence") and "commands:" in stderr


def test_help_lists_every_command_with_what_it_does(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("-h", "--help"):
        code, stdout, stderr = run(capsys, flag)
        assert code == 0 and stderr == ""
        for name, (_, summary, _) in cli._COMMANDS.items():
            assert f"  {name} " in stdout and summary in stdout, name
        assert "Exit codes: 0 ok, 1 operational failure" in stdout


@pytest.mark.parametrize("name", list(cli._COMMANDS))
def test_every_command_has_help_with_its_docstring(capsys: pytest.CaptureFixture[str],
                                                   name: str) -> None:
    fn, _, options = cli._COMMANDS[name]
    for flag in ("-h", "--help"):
        code, stdout, stderr = run(capsys, name, flag)
        assert code == 0 and stderr == ""
        assert stdout.startswith(f"usage: dockfence {name}")
        words = " ".join(stdout.split())
        assert " ".join((fn.__doc__ or "x").split()) in words  # argparse re-wraps the lines
        for flags, settings in options:
            assert flags[0] in stdout or settings["metavar"] in stdout
            assert " ".join(settings["help"].split()) in words, flags


def test_help_names_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    _, stdout, _ = run(capsys, "apply", "-h")
    assert "$DOCKFENCE_POLICY, then /etc/dockfence/policy.yaml" in " ".join(stdout.split())
    _, stdout, _ = run(capsys, "ban", "-h")
    assert "default: forever" in stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"dockfence, version {__version__}\n", "")


def test_options_go_anywhere_and_take_equals(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    path = write(tmp_path, POLICY)
    assert run(capsys, "check", f"--policy={path}") == (0, "OK\n", "")
    parsed = vars(cli._command_parser("ban").parse_args(
        ["--for", "-1", "203.0.113.9", "--reason=a b", "--force"]))  # fail2ban's -1
    assert parsed == {"address": "203.0.113.9", "duration": "-1", "reason": "a b",
                      "force": True}
    parsed = vars(cli._command_parser("explain").parse_args(
        ["2001:db8::1", "53/UDP", "--to", "2001:db8::2", "--json"]))
    assert (str(parsed["source"]), parsed["port"], str(parsed["to"])) == (
        "2001:db8::1", (53, "udp"), "2001:db8::2")
    assert parsed["as_json"] is True


def test_docker_unreachable_is_operational(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, POLICY)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/absent.sock")
    code, _, stderr = run(capsys, "plan", "--policy", path)
    assert code == 1
    assert "cannot reach Docker" in stderr


def test_process_exit_codes(tmp_path: Path) -> None:
    """`python3 -m dockfence` exits with main's code: 0, 1, 2 as a process."""
    def exit_code(*args: str, **env: str) -> int:
        return subprocess.run([sys.executable, "-m", "dockfence", *args], cwd=REPO, timeout=60,
                              capture_output=True, env={**os.environ, **env}).returncode

    path = write(tmp_path, POLICY)
    assert exit_code("check", "--policy", path) == 0
    assert exit_code("plan", "--policy", path, DOCKER_HOST=f"unix://{tmp_path}/absent") == 1
    assert exit_code("apply", "--confirm", "0") == 2
    assert exit_code() == 2


def test_the_process_flushes_what_it_printed_and_lets_a_profiler_write(tmp_path: Path) -> None:
    """The program leaves with os._exit (no interpreter teardown): what it printed into a pipe
    (block-buffered) still arrives whole; under cProfile it exits as usual, and the profile is
    written."""
    proc = subprocess.run([sys.executable, "-m", "dockfence", "schema"], cwd=REPO, timeout=60,
                          capture_output=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["type"] == "object"
    profile = tmp_path / "apply.prof"
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m",
                           "dockfence", "--version"], cwd=REPO, timeout=60, capture_output=True)
    assert proc.returncode == 0 and __version__ in proc.stdout.decode()
    assert profile.stat().st_size > 0


def test_closed_stdout_exits_quietly() -> None:
    """`dockfence schema | head -1`: the reader has left; no traceback, exit 1 (as click did)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails (EPIPE)
    try:
        proc = subprocess.run([sys.executable, "-m", "dockfence", "schema"], cwd=REPO,
                              stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == b""


def test_interrupted_command_says_aborted(capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "remove", (interrupted, "", ()))
    assert run(capsys, "remove") == (1, "", "\nAborted!\n")


def test_colour_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cli._style("No changes.", 32, Terminal()) == "\x1b[32mNo changes.\x1b[0m"
    assert cli._style("No changes.", 32, io.StringIO()) == "No changes."
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli._style("No changes.", 32, Terminal()) == "No changes."


# --- what each path loads (start-up cost: see scripts/bench_commands.py) ------------------------

HEAVY = {"msgspec", "yaml", "rich", "http.client", "ssl",
         # click and what it pulled in: 20 ms of start-up on every command (issue 7)
         "click", "inspect", "uuid", "platform", "datetime"}


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """The modules a fresh interpreter holds after running `code`. Without `site` (-S; its
    packages on PYTHONPATH instead): a .pth file of the machine must not load modules for us.
    As root, in a network namespace of its own: code that reaches the engine must never touch
    the machine's own firewall, even when it goes a way the test did not expect."""
    packages = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    isolated = ["unshare", "--net", "--"] if os.geteuid() == 0 else []
    proc = subprocess.run([*isolated, sys.executable, "-S", "-c",
                           code + "\nimport sys\nprint(*sys.modules)"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "DOCKFENCE_STATE_DIR": str(tmp_path),
                               "PYTHONPATH": os.pathsep.join([str(REPO), *packages])})
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_modules_after_sees_imports(tmp_path: Path) -> None:
    """The probe below can fail: what a command imports shows up."""
    assert {"dockfence.cli", "argparse"} <= _modules_after("import dockfence.cli", tmp_path)
    assert {"rich", "yaml"} <= _modules_after("import dockfence.policy, rich", tmp_path)


@pytest.mark.parametrize("argv", [["--help"], ["apply", "--help"], ["explain", "--help"],
                                  ["status", "--help"]])
def test_help_loads_no_engine_validator_or_output_library(tmp_path: Path,
                                                          argv: list[str]) -> None:
    code = ("import contextlib, io\nfrom dockfence.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    assert main({argv!r}) == 0\nassert out.getvalue().startswith('usage: ')")
    loaded = _modules_after(code, tmp_path)
    assert not loaded & (HEAVY | {"dockfence.engine", "dockfence.policy", "dockfence.discovery",
                                  "dataclasses", "ipaddress", "subprocess", "shutil"})


NO_OP_APPLY = """
import contextlib, io
from dockfence import engine, listfiles
from dockfence.cli import main
from dockfence.inventory import Inventory
from dockfence.stamp import Stamp, inventory_digest
path = {path!r}
stamp = Stamp(listfiles.inputs_digest(path), inventory_digest(Inventory()))
engine.host_lock = lambda wait=0.0: contextlib.nullcontext()
engine.state.Record.exists = lambda self: True
engine.discovery.inventory = Inventory
engine.nft.live_stamp = lambda: stamp
engine.record.warnings = lambda st: [] if st == stamp else None
def never(*args, **kwargs):
    raise AssertionError("the no-op path loaded a table")
engine.load_later = never
plan, cut = engine.apply(path)
assert plan.unchanged and plan.policy is None and cut == 0, plan
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["apply", "--policy", path]) == 0
assert out.getvalue() == "No changes. The live rules already match the policy.\\n", out.getvalue()
"""


def test_no_op_apply_loads_no_validator_compiler_or_diff(tmp_path: Path) -> None:
    """The stamp answers "nothing changed" (proven against real tables by test_enforcement's
    lab tests); here: that answer, through the command line, needs neither the policy
    validator, nor the compiler, the diff, bans, counters or the output and HTTP libraries.
    (inspect comes with dataclasses, which Docker's inventory needs.)"""
    path = write(tmp_path, POLICY)
    loaded = _modules_after(NO_OP_APPLY.format(path=path), tmp_path)
    assert "dockfence.engine" in loaded
    assert not loaded & (HEAVY - {"inspect"} | {
        "dockfence.policy", "dockfence.compile", "dockfence.plan", "dockfence.explain",
        "dockfence.bans", "dockfence.counters", "dockfence.located_yaml",
        # nor the rules' types (their classes cost ~10 ms to create), nor OpenSSL (~4 ms) for
        # the few small digests it makes
        "dockfence.model", "dockfence.labels", "_hashlib", "dockfence.backends.staged",
        # it starts no process and writes no state: neither subprocess, nor shutil (bz2, lzma)
        # for finding programs, nor secrets (random, hmac, base64) for naming a generation
        "subprocess", "shutil", "bz2", "lzma", "secrets", "random"})


NO_OP_OVER_SSH = NO_OP_APPLY.replace("plan, cut = engine.apply(path)", """
import json, os
from dockfence import record
recorded = record.decode(json.loads({recorded!r}))
engine.record.ruleset = lambda st: recorded if st == stamp else None
os.environ["SSH_CONNECTION"] = "203.0.113.3 50000 203.0.113.1 22"
plan, cut = engine.apply(path)""")


def _recorded(path: str) -> str:
    from dockfence import policy, record
    from dockfence.compile import compile_policy
    from dockfence.inventory import Inventory

    return json.dumps(record.encode(compile_policy(policy.load(path), Inventory())))


def test_no_op_apply_over_ssh_checks_the_recorded_rules_only(tmp_path: Path) -> None:
    """Over SSH, "nothing changed" still needs no validator, compiler or diff: the lockout
    check reads the rules recorded for the live stamp (before, every apply over SSH compiled
    and rendered the whole policy: seconds with big lists)."""
    path = write(tmp_path, POLICY)
    loaded = _modules_after(NO_OP_OVER_SSH.format(path=path, recorded=_recorded(path)),
                            tmp_path)
    assert "dockfence.explain" in loaded  # the lockout check ran
    assert not loaded & {"dockfence.policy", "dockfence.compile", "dockfence.plan",
                         "dockfence.located_yaml", "msgspec", "yaml", "subprocess"}


def test_a_no_op_over_ssh_is_refused_when_the_rules_in_force_lock_the_session_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick answer is not given when the recorded rules would deny the session's next
    login (nor when no rules are recorded): apply then goes the long way, which refuses."""
    from dockfence import engine, record
    from dockfence.inventory import Inventory
    from dockfence.stamp import Stamp

    path = write(tmp_path, POLICY.replace("port: 22/tcp\n      from: any",
                                          "port: 22/tcp\n      from: office"))
    monkeypatch.setattr(record, "DIRECTORY", tmp_path)
    st = Stamp("a" * 32, "b" * 32)
    record.save(st, record.decode(json.loads(_recorded(path))))
    assert engine._locks_out(st, Inventory(), "198.51.100.99 50000 203.0.113.1 22")
    assert not engine._locks_out(st, Inventory(), "203.0.113.3 50000 203.0.113.1 22")
    assert engine._locks_out(Stamp("c" * 32, "b" * 32), Inventory(),
                             "203.0.113.3 50000 203.0.113.1 22")  # nothing recorded
