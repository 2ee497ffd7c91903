"""watch's downloads thread, without a lab: one round at a time, a SIGHUP meanwhile means
another round after it, a round that fails is reported and the next one still runs; and a copy
is written only while the lock the caller passes is held. (The lab proves, with packets, that a
slow download does not hold up Docker's events: tests/test_sources.py.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from dockfence import listurls, watch
from dockfence.errors import OperationalError


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DOCKFENCE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


def test_one_round_at_a_time_and_a_failed_round_does_not_stop_the_next(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[bool] = []
    kept: list[object] = []

    def refresh_lists(path: str, force: bool = False, text: str | None = None,
                      keeping: listurls.Keeping | None = None) -> list[str]:
        asked.append(force)
        kept.append(keeping)
        if len(asked) == 1:
            raise RuntimeError("boom")
        return ["list 'cdn' from http://198.51.100.5/list: HTTP 404; the copy stays in force"]

    monkeypatch.setattr(watch.listurls, "refresh_lists", refresh_lists)
    said: list[str] = []
    w = watch.Watcher(str(state / "policy.yaml"), said.append, threading.Event())
    w.connected = True  # no guard yet: what a round kept waits for the next full apply
    threading.Thread(target=w._download, daemon=True).start()

    w.reload.set()  # SIGHUP
    w._ask_download()
    w.reload.set()  # again, while the round runs: no second round now...
    w._ask_download()
    first = w.events.get(timeout=30)
    assert isinstance(first, watch._Downloaded) and first.error == "RuntimeError: boom"
    assert w.rounds.empty() and asked == [True]
    w._step([first])
    assert "downloading lists failed: RuntimeError: boom; the saved copies stay in force" in said
    w._ask_download()  # ...but right after it, and the thread survived the failure
    second = w.events.get(timeout=30)
    assert isinstance(second, watch._Downloaded) and second.error is None
    assert asked == [True, True] and kept[1] is not None
    w._step([second])
    assert said[-1] == f"warning: {second.warnings[0]}"
    w._ask_download()  # nothing due, nothing asked
    assert w.rounds.empty() and not w.downloading


def test_a_copy_is_written_only_while_keeping_is_held(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lu = listurls.ListURL("cdn", "http://198.51.100.5/list")
    monkeypatch.setattr(listurls, "fetch", lambda url, **_: b"203.0.113.10\n")
    seen: list[bytes | None] = []

    @contextmanager
    def keeping() -> Iterator[None]:
        seen.append(listurls.saved(lu))
        yield
        seen.append(listurls.saved(lu))

    assert listurls.refresh(lu, keeping=keeping) is None
    assert seen == [None, b"203.0.113.10\n"]

    def busy() -> AbstractContextManager[object]:
        raise OperationalError("another dockfence is changing this host; try again")

    monkeypatch.setattr(listurls, "fetch", lambda url, **_: b"198.51.100.50\n")
    warning = listurls.refresh(lu, keeping=busy)
    assert warning == (f"{lu.label()}: the download is not kept: another dockfence is "
                       "changing this host; try again")
    assert listurls.saved(lu) == b"203.0.113.10\n"  # the last good copy stays
