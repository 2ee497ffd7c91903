"""Error types. Each maps to one exit code of the command-line contract."""

from __future__ import annotations


class DockfenceError(Exception):
    exit_code = 1


class OperationalError(DockfenceError):
    """Docker unreachable, the kernel refused, a lock is held: nothing was changed."""

    exit_code = 1


class UsageError(DockfenceError):
    """A bad command-line argument."""

    exit_code = 2


class PolicyError(DockfenceError):
    """An invalid policy, pointing at the file, line and offending value."""

    exit_code = 2

    def __init__(self, path: str, line: int | None, message: str, value: object = None) -> None:
        self.path, self.line, self.message, self.value = path, line, message, value
        where = f"{path}:{line}" if line else path
        shown = f" (got {_short(value)})" if value is not None else ""
        super().__init__(f"{where}: {message}{shown}")


def _short(value: object, limit: int = 100) -> str:
    """repr, cut short: the offending value may be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
