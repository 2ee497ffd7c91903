"""Long runs of address items are read without libyaml's events (located_yaml's `_Cut`): the
result must be exactly libyaml's own reading of the whole text, data, lines and errors alike,
wherever such lines appear (in a list, a block scalar, a quoted string, a flow list, as keys).

Each document is loaded twice: with runs cut out from two lines on, and with no run ever cut
(MIN_RUN beyond any document). Hypothesis runs derandomized, as in test_policy_fuzz.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockfence import located_yaml

SEEDED = settings(derandomize=True, database=None, deadline=None, max_examples=1500,
                  suppress_health_check=[HealthCheck.too_slow])


def read(text: str, min_run: int) -> tuple[Any, Any]:
    """(data, lines) or (the error's line, message, value), with runs cut from `min_run` on."""
    old = located_yaml.MIN_RUN
    located_yaml.MIN_RUN = min_run
    try:
        doc = located_yaml.load(text)
        return doc.data, doc.lines
    except located_yaml.YAMLError as exc:
        return "error", (exc.line, str(exc), exc.value)
    finally:
        located_yaml.MIN_RUN = old


def cut_used(text: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the document was read with its runs cut out (no fallback to the whole text)."""
    used: list[bool] = []
    parse = located_yaml._parse

    def spy(text: str, cut: Any) -> Any:
        result = parse(text, cut)
        used.append(cut is not None)
        return result

    monkeypatch.setattr(located_yaml, "_parse", spy)
    monkeypatch.setattr(located_yaml, "MIN_RUN", 2)
    with contextlib.suppress(located_yaml.YAMLError):
        located_yaml.load(text)
    return used == [True]


VALUES = ["203.0.113.7", "198.51.100.0/24", "2001:db8::/64", "2001:db8::1", "2001:db8::",
          "::1", "1:20", "dead:beef", "1.2.3", "1.5", "10", "0x1f", "1e3", "2001:db8::/",
          '"2001:db8::/64"', "'198.51.100.1'", '"1:2"', "'1.5'", '"a b"', "'it''s'",
          '"2001:db8::/64', "2001:db8::/64 # office", "2001:db8::/64# no comment",
          "203.0.113.7\t", "2001:db8:: # key", "- 203.0.113.1", "&a 203.0.113.1",
          "!!str 1.2.3.4", "203.0.113.1: x", "[203.0.113.1]", "|", ">", ""]
OTHER = ["lists:", "big:", "  big:", "    big:", "key: |", "  key: >", "key: |-", 'key: "abc',
         '  "', "key: 'abc", "'", "key: abc", "key: [", "  [", "]", "key: {", "}", "# comment",
         "", "  ", "  continued", "    continued", "---", "...", "- - 203.0.113.1",
         "  - key: 203.0.113.1", "\t- 203.0.113.1", "key: &a", "  x: *a", "? complex",
         ": value", "%YAML 1.1"]


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):  # a run of items, often long enough to be cut out
            indent = " " * draw(st.sampled_from([0, 1, 2, 4, 6]))
            dash = "-" + " " * draw(st.integers(1, 2))
            for _ in range(draw(st.integers(1, 5))):
                lines.append(f"{indent}{dash}{draw(st.sampled_from(VALUES))}")
        else:
            lines.append(draw(st.sampled_from(OTHER)))
    text = "\n".join(lines)
    return text + "\n" if draw(st.booleans()) else text


GOOD = ["203.0.113.7", "198.51.100.0/24", "2001:db8::/64", '"2001:db8::1"', "'203.0.113.0/28'",
        "2001:db8::/64  # office"]


@st.composite
def policies(draw: st.DrawFn) -> str:
    """Mostly well-formed: named lists of addresses, now and then a line that is not."""
    lines = ["version: 1", "lists:"]
    for i in range(draw(st.integers(1, 4))):
        lines.append(f"  list{i}:")
        indent = draw(st.sampled_from(["  ", "    ", "      "]))
        for _ in range(draw(st.integers(0, 8))):
            if draw(st.integers(0, 9)) == 0:
                lines.append(draw(st.sampled_from(OTHER)))
            else:
                value = draw(st.sampled_from(GOOD if draw(st.integers(0, 5)) else VALUES))
                lines.append(f"{indent}- {value}")
    lines += ["containers:", "  allow:", "    - host_port: 80/tcp", "      from: [list0]"]
    return "\n".join(lines) + "\n"


@SEEDED
@given(st.one_of(documents(), policies()))
def test_cutting_runs_out_reads_as_libyaml_does(text: str) -> None:
    assert read(text, 2) == read(text, 10**9), text


def test_a_long_inline_list_is_cut_out_and_keeps_every_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    addresses = [f"2001:db8:{i:x}::/64" for i in range(200)]
    text = ("version: 1  # the policy\nlists:\n  big:\n"
            + "".join(f'    - "{a}"\n' if i % 3 else f"    - {a}  # site {i}\n"
                      for i, a in enumerate(addresses))
            + "  small:\n    - 198.51.100.1\n    - 198.51.100.2\n"
            + "containers:\n  allow:\n    - host_port: 80/tcp\n      from: [big]\n")
    assert cut_used(text, monkeypatch)
    doc = located_yaml.load(text)
    assert doc.data["lists"]["big"] == addresses
    assert doc.data["lists"]["small"] == ["198.51.100.1", "198.51.100.2"]
    assert doc.line(("lists", "big", 0)) == 4
    assert doc.line(("lists", "big", 199)) == 203
    assert doc.line(("lists", "small", 1)) == 206  # below two cut-out runs
    assert doc.line(("containers", "allow", 0, "from")) == 210
    assert read(text, 2) == read(text, 10**9)


@pytest.mark.parametrize("text", [
    "key: |\n  - 203.0.113.1\n  - 203.0.113.2\n",  # a block scalar's text
    'key: "x\n  - 203.0.113.1\n  - 203.0.113.2\n  "\n',  # a quoted string's lines
    "key: abc\n  - 203.0.113.1\n  - 203.0.113.2\n",  # a plain scalar's continuation
    "- 203.0.113.1\n- 203.0.113.2\n  more\n",  # the last item continues on the next line
    "key: [\n  - 203.0.113.1\n  - 203.0.113.2\n]\n",  # a flow list
])
def test_runs_anywhere_but_a_list_fall_back_to_libyaml(
        text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read(text, 2) == read(text, 10**9)
    assert not cut_used(text, monkeypatch)
