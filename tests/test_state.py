"""The record of what was applied: written atomically, read back exactly, damage refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockfence.state import JOURNAL_FILE, TABLE_FILE, Record, StateError

TABLE = "table inet dockfence {\n\tset stamp {\n\t\ttype inet_service\n\t}\n}\n"
UPDATE = ("flush map inet dockfence tcp_ports\n"
          "add element inet dockfence tcp_ports { 9090 : drop }\n")
BRIDGES = 'flush set inet dockfence bridges\nadd element inet dockfence bridges { "docker0" }\n'


def test_nothing_recorded(tmp_path: Path) -> None:
    assert Record(tmp_path / "none").load() is None


def test_table_and_journal_round_trip(tmp_path: Path) -> None:
    rec = Record(tmp_path)
    rec.save_table(TABLE)
    rec.append(UPDATE)
    rec.append(BRIDGES)
    rec.append(UPDATE.replace("9090", "9091"))
    generation, text = Record(tmp_path).load()  # type: ignore[misc]
    # only the last content of each map counts, in the order of the last updates
    assert text == TABLE + BRIDGES + UPDATE.replace("9090", "9091")
    assert len(generation) == 16
    assert (tmp_path / TABLE_FILE).stat().st_mode & 0o777 == 0o600


def test_a_new_table_starts_a_new_generation(tmp_path: Path) -> None:
    rec = Record(tmp_path)
    rec.save_table(TABLE)
    rec.append(UPDATE)
    journal = (tmp_path / JOURNAL_FILE).read_bytes()
    rec.save_table(TABLE + "# second\n")
    # even if the old journal survived (a crash between the two writes), it is not replayed
    (tmp_path / JOURNAL_FILE).write_bytes(journal)
    assert Record(tmp_path).load()[1] == TABLE + "# second\n"  # type: ignore[index]


def test_undo_puts_the_previous_record_back(tmp_path: Path) -> None:
    rec = Record(tmp_path)
    rec.save_table(TABLE)
    undo_append = rec.append(UPDATE)
    undo_append()
    assert rec.load()[1] == TABLE  # type: ignore[index]
    rec.append(UPDATE)
    undo_table = rec.save_table("table inet dockfence {\n}\n")
    undo_table()
    assert rec.load()[1] == TABLE + UPDATE  # type: ignore[index]
    first = Record(tmp_path / "fresh")
    first.save_table(TABLE)()
    assert first.load() is None


def test_an_entry_cut_short_was_never_applied(tmp_path: Path) -> None:
    rec = Record(tmp_path)
    rec.save_table(TABLE)
    rec.append(UPDATE)
    rec.append(BRIDGES)
    journal = tmp_path / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-5])
    assert rec.load()[1] == TABLE + UPDATE  # type: ignore[index]


@pytest.mark.parametrize("where", ["table", "journal", "binary"])
def test_damage_is_refused(tmp_path: Path, where: str) -> None:
    rec = Record(tmp_path)
    rec.save_table(TABLE)
    rec.append(UPDATE)
    path = tmp_path / (TABLE_FILE if where == "table" else JOURNAL_FILE)
    if where == "binary":
        path = tmp_path / TABLE_FILE
        path.write_bytes(b"\xff\xfe" + path.read_bytes())
    else:
        path.write_text(path.read_text().replace("9090", "9099").replace("stamp", "stomp"))
    with pytest.raises(StateError, match="damaged"):
        Record(tmp_path).load()


def test_unwritable_directory_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError, match="cannot record"):
        Record(blocker / "state").save_table(TABLE)


def test_a_later_process_appends_under_the_recorded_generation(tmp_path: Path) -> None:
    """watch's Record after a full sync: the generation comes from the header line; a record
    whose header is damaged takes no updates."""
    Record(tmp_path).save_table(TABLE)
    later = Record(tmp_path)
    later.append(UPDATE)
    assert Record(tmp_path).load()[1] == TABLE + UPDATE  # type: ignore[index]
    (tmp_path / TABLE_FILE).write_text("# not a dockfence record\n" + TABLE)
    with pytest.raises(StateError):
        Record(tmp_path).append(BRIDGES)
