"""dockfence.console writes short plain lines to a pipe itself: byte for byte what rich writes."""

from __future__ import annotations

import io
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.markup import escape as rich_escape

from dockfence import console

LINES = [
    "No changes.",
    "[green]No changes.[/] The live rules already match the policy.",
    "[green]+ published port tcp 8081 (web 8080/tcp): big (10 networks)[/]  "
    "[dim](/tmp/p.yaml:17)[/]",
    "[yellow]~ published port tcp 8081: a -> b  [adds 203.0.113.0/24; removes x][/]",
    "[bold green]ALLOWED[/]  2001:db8:ff::10 -> web 8080/tcp  (port 8081/tcp)",
    "[bold red]DENIED[/]  203.0.113.9 -> host port 22  (port 22/tcp)",
    "[bold red]error:[/] p.yaml:3: lists.a: expected a mapping or a list, got text (got 'x')",
    "[bold]NOT FILTERED[/]  x",
    "  decided by: /tmp/p.yaml:15 (containers.default: deny)",
    "[bold green]Applied[/] (7 change(s)) as one transaction.",
    "[red]- x[/]", "[dim]= kept[/]", "[bold red]unclosed", "closes nothing[/]", "[/bold]x",
    "[bold]a[/bold] b", "[bold]a[/red] b", "[link=https://example.com]x[/link]", "[@click]x[/]",
    "list [office] and [203.0.113.0/24]", "[Bold]x[/]", "a  b", "  leading", "trailing  ",
    "tab\there", "line\nbreak", "caf\u00e9", "back\\slash", "x" * 158, "x" * 159, "x" * 160,
    "word " * 40 + "end", "[green]" + "y" * 158 + "[/]", "", "[", "]", "[]", "[/]",
]


def _written(con: console.LazyConsole, text: str, markup: bool | None, forced: bool) -> str:
    buf = io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = buf
    try:
        kwargs = {} if markup is None else {"markup": markup}
        try:
            (con._rich().print if forced else con.print)(text, **kwargs)
        except Exception as exc:  # rich refuses bad markup: so must the fast path
            return f"raised {type(exc).__name__}"
    finally:
        sys.stdout, sys.stderr = old
    return buf.getvalue()


def _consoles() -> list[tuple[console.LazyConsole, console.LazyConsole]]:
    """(the fast one, one forced through rich) for stdout and stderr, as the CLI makes them."""
    def make(stderr: bool) -> console.LazyConsole:
        return console.LazyConsole(stderr=True, highlight=False, emoji=False, soft_wrap=True) \
            if stderr else console.LazyConsole(highlight=False, emoji=False)
    return [(make(e), make(e)) for e in (False, True)]


def _same(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in console._DRESSING:
        monkeypatch.delenv(var, raising=False)
    for markup in (None, True, False):
        for fast, slow in _consoles():  # new ones each time: a fallback keeps rich loaded
            assert _written(fast, text, markup, False) == _written(slow, text, markup, True), \
                (text, markup, fast._stderr)


@pytest.mark.parametrize("text", LINES)
def test_plain_lines_come_out_as_rich_writes_them(text: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _same(text, monkeypatch)


ALPHABET = st.sampled_from(["[", "]", "/", "\\", " ", "  ", "\t", "\n", "a", "Z", "0", ":", "=",
                            "@", "#", "\u00e9", "[bold]", "[/]", "[green]", "[/green]", "[dim",
                            "[link=x]", "x" * 70])


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(parts=st.lists(ALPHABET, max_size=12))
def test_any_text_comes_out_as_rich_writes_it(parts: list[str]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        _same("".join(parts), mp)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(text=st.text(alphabet=st.sampled_from("[]\\/abz@# =\u00e9"), max_size=20))
def test_escape_is_riches(text: str) -> None:
    assert console.escape(text) == rich_escape(text)


def test_short_plain_lines_need_no_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in console._DRESSING:
        monkeypatch.delenv(var, raising=False)
    fast, _ = _consoles()[0]
    assert _written(fast, LINES[1], None, False).startswith("No changes.")
    assert fast._console is None  # rich was not even loaded for it
