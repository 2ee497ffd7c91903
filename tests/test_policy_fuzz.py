"""Fuzzing the policy loader: whatever the bytes, the only outcomes are a valid policy or a
PolicyError naming a line of the file (exit 2). Never another exception, never a hang.

Hypothesis runs derandomized (a fixed seed per test, no example database), so a failure
reproduces on every run and every machine; the example counts keep the module to seconds.
A handful of hostile files also go through `dockfence check` as a process: exit 2, file:line
and the value on stderr, no traceback, within a generous subprocess timeout.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockfence import policy
from dockfence.errors import PolicyError

from helpers import POLICY

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = (REPO / "dockfence" / "examples" / "policy.yaml").read_text()

BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # YAML's line breaks
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def fuzz(examples: int) -> settings:
    """Seeded (derandomized), no example database, no per-example deadline (loaded CI)."""
    return settings(derandomize=True, database=None, deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(data: str | bytes) -> policy.Policy | PolicyError:
    """Parse; anything but a Policy or a PolicyError with a line in the file fails the test."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    lines = len(BREAKS.findall(text)) + 1
    try:
        return policy.parse(data, "fuzz.yaml")
    except PolicyError as exc:
        assert exc.path == "fuzz.yaml" and exc.exit_code == 2
        assert exc.line is not None and 1 <= exc.line <= lines, (exc.line, lines, str(exc))
        assert str(exc).startswith(f"fuzz.yaml:{exc.line}: ")
        return exc


# --- generated documents: the policy's shape, filled with anything ------------------------------

WORDS = ["any", "office", "branch", "deny", "allow", "tcp", "udp", "eth0", "wg*", "lo", "django",
         "22", "22/tcp", "8080/udp", "8000-8100/tcp", "70000", "203.0.113.0/28", "203.0.113.1/24",
         "2001:db8:1::/64", "198.51.100.7", "not-an-address", "<<", "*a", "&a", "!!str", "~", ""]
KEYS = ["version", "interfaces", "lists", "host", "containers", "default", "allow", "port",
        "host_port", "container", "from", "office"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from(WORDS), st.text(max_size=12),
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=4),
    max_leaves=6,
)


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The valid value or anything at all."""
    return st.one_of(valid, anything)


rule = st.fixed_dictionaries(
    {"from": maybe(st.sampled_from(WORDS) | st.lists(st.sampled_from(WORDS), max_size=3))},
    optional={"container": maybe(st.sampled_from(WORDS)), "port": maybe(st.sampled_from(WORDS)),
              "host_port": maybe(st.sampled_from(WORDS)), "extra": anything},
)
section = st.fixed_dictionaries(
    {}, optional={"default": maybe(st.sampled_from(["deny", "allow"])),
                  "allow": maybe(st.lists(rule, max_size=3))},
)
document = st.fixed_dictionaries(
    {"version": maybe(st.just(1))},
    optional={
        "interfaces": maybe(st.lists(st.sampled_from(WORDS), max_size=3)),
        "lists": maybe(st.dictionaries(st.sampled_from(WORDS),
                                       st.lists(st.sampled_from(WORDS), max_size=3), max_size=3)),
        "host": maybe(section),
        "containers": maybe(section),
    },
)


@fuzz(100)
@given(doc=document, flow=st.booleans(), unicode=st.booleans())
def test_generated_policies(doc: dict[str, Any], flow: bool, unicode: bool) -> None:
    outcome(yaml.dump(doc, Dumper=DUMPER, default_flow_style=flow, allow_unicode=unicode,
                      sort_keys=False))


ADDRESSES = ["203.0.113.0/28", "198.51.100.7", "2001:db8:1::/64", "2001:db8::1", "any"]
valid_rule = st.fixed_dictionaries({
    "container": st.sampled_from(["django", "web-1", "db.main"]),
    "port": st.integers(1, 65535).map(lambda p: f"{p}/tcp") | st.integers(1, 65535),
    "from": st.lists(st.sampled_from([*ADDRESSES, "office"]), min_size=1, max_size=4),
})
valid_document = st.fixed_dictionaries({
    "version": st.just(1),
    "lists": st.fixed_dictionaries({"office": st.lists(st.sampled_from(ADDRESSES[:4]),
                                                       max_size=4)}),
    "containers": st.fixed_dictionaries({"default": st.sampled_from(["deny", "allow"]),
                                         "allow": st.lists(valid_rule, max_size=5)}),
})


@fuzz(100)
@given(doc=valid_document, flow=st.booleans())
def test_valid_generated_policies_parse(doc: dict[str, Any], flow: bool) -> None:
    got = outcome(yaml.dump(doc, Dumper=DUMPER, default_flow_style=flow, sort_keys=False))
    assert isinstance(got, policy.Policy), got
    assert len(got.container_rules) == len(doc["containers"]["allow"])
    assert got.container_default == doc["containers"]["default"]


# --- mutated files: real policies with YAML's sharp edges spliced in ----------------------------

TOKENS = [
    b"&a ", b"*a", b"<<: ", b"!!str ", b"!!python/object:os.system ", b"!x ", b"---\n", b"...\n",
    b"%YAML 1.1\n", b"%TAG ! tag:x,2000:\n", b"[", b"]", b"{", b"}", b": ", b"- ", b"? ", b",",
    b"\"", b"'", b"#", b"|", b">", b"\t", b"\n", b"\r", b"\r\n", b"\x00", b"\x1b", b"\xff",
    b"\xc3", b"\xef\xbb\xbf", b"\xe2\x80\xa8", b"9" * 5000, b"1.0e+999", b"0x1F", b"0o17", b"22:30",
    b"2001-12-14", b"~", b"yes", b"  ", b"[" * 200, b"{a: " * 50,
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([POLICY, EXAMPLE])).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete", "byte"]))
        if op == "delete":
            del data[at: at + draw(st.integers(1, 8))]
        elif op == "byte":
            data[at:at] = bytes([draw(st.integers(0, 255))])
        else:
            token = draw(st.sampled_from(TOKENS))
            data[at: at + (len(token) if op == "replace" else 0)] = token
    return bytes(data)


@fuzz(500)
@given(data=mutated())
def test_mutated_policies(data: bytes) -> None:
    outcome(data)


@fuzz(500)
@given(text=st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    outcome(text)


# --- the command, as a process -------------------------------------------------------------------

def _bomb() -> bytes:
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    rows += [f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]"
             for i in range(1, 10)]
    return ("version: 1\n" + "\n".join(rows) + "\n").encode()


# file contents -> (line, text the message must contain)
COMMAND_CASES = {
    "alias_bomb": (_bomb(), 2, "(got '&a')"),
    "not_utf8": (b"version: 1\nlists:\n  office: [203.0.113.0/28, caf\xe9]\n", 3, "b'\\xe9'"),
    "nul": (b"version: 1\ncontainers:\n  default: de\x00ny\n", 3, "'\\x00'"),
    "deep": (b"version: 1\nlists: " + b"[" * 100_000 + b"\n", 2, "nested more than 32"),
    "merge": (b"version: 1\ncontainers:\n  <<: {default: allow}\n", 3, "(got '<<')"),
    "tag": (b"version: 1\nhost: !!python/object/apply:os.system [id]\n", 2,
            "(got '!!python/object/apply:os.system')"),
    "huge_number": (POLICY.replace("port: 22/tcp", "port: " + "9" * 5000).encode(), 7,
                    "number too large"),
}


@pytest.mark.parametrize("name", list(COMMAND_CASES))
def test_check_command_on_hostile_files(tmp_path: Path, name: str) -> None:
    data, line, shown = COMMAND_CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(data)
    # The timeout only proves "bounded"; speed is measured by scripts/bench_policy_check.py.
    proc = subprocess.run([sys.executable, "-m", "dockfence", "check", "--policy", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc
    assert f"{path}:{line}: " in proc.stderr and shown in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
