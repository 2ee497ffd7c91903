"""Where the CLI prints: rich, imported only when a line needs it.

rich costs ~25 ms of imports, more than a small `apply` or `explain` spends on its work. Piped
output (logs, CI, scripts) shows no colours, and a short line of plain characters comes out of
rich as exactly its text without the markup tags: such lines are written directly, everything
else (terminals, tables, long lines, escapes, anything unusual) goes through rich.
tests/test_console.py holds the two to the same output.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

PIPED_WIDTH = 160  # piped output: a wide fixed width instead of rich's 80 columns
# rich.markup's tag syntax (RE_TAGS) and escape (rich.markup.escape)
_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
# Printable ASCII but the backslash (escapes): no tabs, breaks or control characters.
_PLAIN = re.compile(r"[ -\[\]-~]*")
# Plain style words a tag may hold (the styles this CLI uses); anything else goes to rich.
_STYLE = re.compile(r"(?:(?:bold|dim|italic|red|green|yellow|blue|cyan|magenta)(?: |$))+")
# Environment that makes rich colour (or otherwise dress) output that is not a terminal.
_DRESSING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS",
             "JUPYTER_LINES")


def escape(text: str) -> str:
    """Text that rich prints as itself (rich.markup.escape, without importing rich)."""
    text = _ESCAPE.sub(lambda m: f"{m[1]}{m[1]}\\{m[2]}", text)
    if text.endswith("\\") and not text.endswith("\\\\"):
        return text + "\\"
    return text


def plain(text: str, markup: bool = True) -> str | None:
    """What rich prints for `text` when it is one short line of plain characters (its markup
    tags dropped, as rich does without colours), or None when only rich can tell."""
    if not _PLAIN.fullmatch(text) or text.endswith(" "):
        return None
    if markup and "[" in text:
        opened: list[str] = []  # open style tags, as rich matches closing tags to them
        parts: list[str] = []
        at = 0
        for m in _TAG.finditer(text):
            tag = m[3]
            if tag == "/" and opened:
                opened.pop()
            elif tag.startswith("/") and tag[1:] in opened:
                del opened[len(opened) - 1 - opened[::-1].index(tag[1:])]
            elif _STYLE.fullmatch(tag):
                opened.append(tag)
            else:  # a tag that closes nothing, a link, meta data, another style: rich's call
                return None
            parts.append(text[at:m.start()])
            at = m.end()
        text = "".join(parts) + text[at:]
    return text


class LazyConsole:
    """A rich Console made on first use; short plain lines to a pipe are written directly."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Any = None
        self._stderr = bool(options.get("stderr"))

    def _stream(self) -> Any:
        return sys.stderr if self._stderr else sys.stdout

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if len(objects) == 1 and isinstance(objects[0], str) and set(kwargs) <= {"markup"} \
                and self._console is None and not any(os.environ.get(v) for v in _DRESSING):
            stream = self._stream()
            text = plain(objects[0], kwargs.get("markup", True))
            # stderr soft-wraps (never wraps or crops); stdout wraps at its width
            if text is not None and (self._stderr or len(text) < PIPED_WIDTH) \
                    and not _isatty(stream):
                stream.write(text + "\n")
                stream.flush()
                return
        self._rich().print(*objects, **kwargs)

    def _rich(self) -> Any:
        if self._console is None:
            from rich.console import Console

            options = dict(self._options)
            if not options.pop("stderr", False):
                options.setdefault("width", None if sys.stdout.isatty() else PIPED_WIDTH)
            else:
                options["stderr"] = True
            self._console = Console(**options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rich(), name)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


out = LazyConsole(highlight=False, emoji=False)
err = LazyConsole(stderr=True, highlight=False, emoji=False, soft_wrap=True)
