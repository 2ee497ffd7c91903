"""Staged loads (dockfence.backends.staged): what they render and send, pure; what the kernel
then holds, in throwaway network namespaces (the functions named `_in_netns_*` run there, in a
process of their own, and print what the test compares)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dockfence import addresses, policy
from dockfence.backends import netlink, staged
from dockfence.backends import nftables as nft
from dockfence.compile import compile_policy
from dockfence.errors import OperationalError
from dockfence.model import Ruleset
from dockfence.run import run
from dockfence.stamp import Stamp, digest

from helpers import scenario

ROOT = Path(__file__).parent.parent
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft"),
    reason="needs root and nft for a throwaway network namespace",
)


def office(n: int, skip: int = 0) -> list[str]:
    """n IPv6 /64s no two of which touch (every other one), and two office addresses."""
    return ["203.0.113.5", "2001:db8:1::/64"] + [
        f"2001:db8:{(2 * i + 2 * skip) >> 16 | 0x100:x}:{(2 * i + 2 * skip) & 0xFFFF:x}::/64"
        for i in range(n)]


def ruleset(entries: list[str], abusers: list[str] | None = None) -> Ruleset:
    """postgres and SSH open to the office; django's 8080 to anyone but abusers."""
    lists = {"office": entries, "abusers": abusers or ["198.51.100.66"]}
    text = json.dumps({
        "version": 1, "lists": lists,
        "host": {"allow": [{"port": 22, "from": "office"}]},
        "containers": {"allow": [
            {"container": "postgres", "port": 5432, "from": "office"},
            {"container": "django", "port": 8080, "from": "any", "except": "abusers"}]}})
    return compile_policy(policy.parse(text, "/etc/dockfence/policy.yaml"), scenario())


def stamp(n: int) -> Stamp:
    return Stamp(digest(str(n).encode()), digest(b"inventory"))


# --- pure -------------------------------------------------------------------------------------

def test_a_staged_table_is_the_structure_under_generation_names() -> None:
    """Without its generation, the staged table is render()'s without elements, line for
    line; each staged set keeps the blocks of its list and a declaration without elements."""
    rs = ruleset(office(40), ["198.51.100.66", "2001:db8:bad::/48"])
    table, sets = nft.render_staged(rs, stamp(1), None, 7)
    assert nft.unstaged(table) == nft.render(rs, stamp(1), elements=False)
    assert sorted(sets) == ["allow_0_g7_v4", "allow_0_g7_v6", "deny_0_g7_v4", "deny_0_g7_v6"]
    allow = next(s for s in nft.chain_order(rs) if not s.any)
    assert sets["allow_0_g7_v6"][:2] == (6, allow.v6)
    anyone = next(s for s in nft.chain_order(rs) if s.any)
    assert sets["deny_0_g7_v4"][:2] == (4, anyone.deny_v4)
    assert all("elements" not in decl and decl.startswith(f"\tset {name} {{")
               for name, (_, _, decl) in sets.items())
    assert "@allow_0_g7_v6" in table and "@allow_0_v6" not in table


def test_names_of_staged_sets() -> None:
    assert nft.staged_name("allow_3", 6, None) == "allow_3_v6"
    assert nft.staged_name("allow_3", 6, 12) == "allow_3_g12_v6"
    assert nft.staged_generation("deny_0_g12_v4") == 12
    assert nft.staged_generation("deny_0_v4") is None
    assert nft.staged_generation("bans_v4") is None
    assert [nft.is_address_set(n) for n in ("allow_1_v4", "allow_1_g2_v6", "bans_v6",
                                            "tcp_ports", "allow_1")] == [
        True, True, False, False, False]
    # counters and chains named after lists keep their names
    assert nft.unstaged("allow_0_allowed allow_0_g3_v4 @deny_1_g9_v6 host_tcp_22") == \
        "allow_0_allowed allow_0_v4 @deny_1_v6 host_tcp_22"


def test_canonical_compares_declarations_as_a_set_and_rules_in_order() -> None:
    def doc(*items: dict[str, object]) -> dict[str, object]:
        return {"nftables": [{"metainfo": {}}, *items]}

    a = {"set": {"name": "allow_0_g2_v4", "handle": 4}}
    b = {"counter": {"name": "c", "packets": 3}}
    r1 = {"rule": {"chain": "x", "expr": [1], "handle": 9}}
    r2 = {"rule": {"chain": "x", "expr": [2]}}
    r3 = {"rule": {"chain": "y", "expr": [3]}}
    same = nft.canonical(doc(a, b, r1, r2, r3))
    assert same == nft.canonical(doc(b, r3, {"set": {"name": "allow_0_v4"}}, r1, r2))
    assert same != nft.canonical(doc(a, b, r2, r1, r3))  # a chain's rules keep their order
    assert json.loads(same or "")[0] == {"counter": {"name": "c"}}


def test_deletions_empty_the_chains_first_and_keep_the_staged_sets() -> None:
    live = [("chain", "forward"), ("set", "allow_0_g1_v4"), ("map", "tcp_ports"),
            ("counter", "banned"), ("set", "allow_0_g2_v4"), ("limit", "refusal_log"),
            ("chain", "allow_0"), ("quota", "q")]
    text = staged._deletions(live, {"allow_0_g2_v4"})
    t = "inet dockfence"
    assert text.splitlines() == [
        f"flush chain {t} forward", f"flush chain {t} allow_0", f"delete map {t} tcp_ports",
        f"delete set {t} allow_0_g1_v4", f"delete chain {t} forward",
        f"delete chain {t} allow_0", f"delete counter {t} banned",
        f"delete limit {t} refusal_log", f"delete quota {t} q"]


@pytest.mark.parametrize("live", [[("ct helper", "ftp")], [("object 10", "syn")],
                                  [("chain", "in put")], [("set", "x;flush ruleset")]])
def test_what_a_staged_load_cannot_delete_makes_it_a_whole_load(
        live: list[tuple[str, str]]) -> None:
    with pytest.raises(staged.NotStaged):
        staged._deletions(live, set())


def test_small_tables_and_the_last_address_are_loaded_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Told before the kernel is asked anything."""
    def no_kernel(*_: object) -> None:
        raise AssertionError("asked the kernel")

    monkeypatch.setattr(netlink, "table_objects", no_kernel)
    small = ruleset(office(staged.STAGE_MIN - 10))
    assert staged.blocks_in(small) == staged.STAGE_MIN - 10 + 2 + 1
    with pytest.raises(staged.NotStaged, match="small"):
        staged.begin(small, stamp(1), None)
    monkeypatch.setattr(staged, "STAGE_MIN", 3)
    for last in ("255.255.255.255", "ffff::/16", "::/0"):
        with pytest.raises(staged.NotStaged, match="last address"):
            staged.begin(ruleset([*office(3), last]), stamp(1), None)


def test_element_updates_are_aimed_at_the_live_generation(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def live(table: str) -> list[tuple[str, str]]:
        asked.append(table)
        return [("set", "allow_0_g4_v4"), ("set", "allow_1_v6"), ("map", "tcp_ports"),
                ("set", "deny_0_g4_v6"), ("set", "deny_0_g5_v6")]

    monkeypatch.setattr(netlink, "table_objects", live)
    ops = [netlink.Op(True, "tcp_ports", ()), netlink.Op(False, "stamp", (), flush=True)]
    assert staged.aimed(ops) is ops and asked == []  # no address set: nothing to ask
    ops += [netlink.Op(True, "allow_0_v4", ()), netlink.Op(False, "allow_1_v6", ())]
    assert [op.set for op in staged.aimed(ops)] == [
        "tcp_ports", "stamp", "allow_0_g4_v4", "allow_1_v6"]
    with pytest.raises(OperationalError, match="deny_0_g4_v6 and deny_0_g5_v6"):
        staged.aimed([netlink.Op(True, "deny_0_v6", ())])


# --- in a throwaway network namespace ---------------------------------------------------------

def in_netns(scenario_name: str, *args: str) -> list[object]:
    """Run `_in_netns_<scenario_name>(*args)` of this module in a new network namespace; what
    it printed, one JSON value per line."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    code = f"import test_staged as t, sys; t._in_netns_{scenario_name}(*sys.argv[1:])"
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", code, *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _report(rs: Ruleset, st: Stamp) -> None:
    """What the live table holds, against what a whole-table load of `rs` would list."""
    live = nft.live_json()
    sets = sorted(n for k, n in netlink.table_objects(nft.TABLE) or () if k == "set")
    print(json.dumps({
        "sets": sets,
        "same listing": nft.canonical(live) == nft.canonical_of(nft.render(rs, st)),
        "same rules": nft.same_table(nft.parse_live(live or {}), rs),
        "stamp": nft.live_stamp() == st,
    }))


def _in_netns_loads(n: str) -> None:
    big, bigger = ruleset(office(int(n))), ruleset(office(int(n) + 5, skip=3))
    nft.apply_text(nft.transaction(nft.render(ruleset(office(3)), stamp(0))))
    handle = nft.live_generation()
    held = {4: [(addresses.parse("198.51.100.9")[1], 600)], 6: []}
    staged.begin(big, stamp(1), None).switch(held)
    _report(big, stamp(1))
    bans = json.loads(run(["nft", "-j", "list", "set", "inet", "dockfence", "bans_v4"]).stdout)
    print(json.dumps([e["elem"]["val"] for o in bans["nftables"] if "set" in o
                      for e in o["set"].get("elem", [])]))
    staged.begin(bigger, stamp(2), None).switch({4: [], 6: []})
    _report(bigger, stamp(2))
    # the handle stays: the stamp tells the load apart
    now = nft.live_generation()
    print(json.dumps([now[0] == handle[0], now != handle]))  # type: ignore[index]
    nft.apply_text(nft.transaction(nft.render(big, stamp(3))))
    _report(big, stamp(3))


@needs_root
def test_staged_loads_list_as_whole_loads_would() -> None:
    """A table over the threshold, staged over a whole-loaded one, over a staged one, then
    loaded whole again: each time the kernel lists what a whole load lists (but for set names),
    reads back as the same rules and carries the new stamp; the bans come along; the sets of
    the generation before are gone."""
    n = staged.STAGE_MIN + 100
    first, bans, second, handle, whole = in_netns("loads", str(n))
    assert first == {"sets": ["allow_0_g1_v4", "allow_0_g1_v6", "bans_v4", "bans_v6", "bridges",
                              "deny_0_g1_v4", "stamp"],
                     "same listing": True, "same rules": True, "stamp": True}
    assert bans == ["198.51.100.9"]
    assert second == {**first, "sets": [s.replace("_g1_", "_g2_") for s in first["sets"]]}
    assert handle == [True, True]
    assert whole == {**first, "sets": [s.replace("_g1", "") for s in first["sets"]]}


def _in_netns_refused(what: str) -> None:
    staged.STAGE_MIN = 3
    old, new = ruleset(office(5)), ruleset(office(7))
    nft.apply_text(nft.transaction(nft.render(old, stamp(0))))
    before = nft.canonical(nft.live_json())
    if what == "fill":  # the kernel refuses the second batch of the fill
        fill, batches = staged._commit, []

        def refused(name: str, ops: list[netlink.Op]) -> None:
            batches.append(name)
            if len(batches) > 1:
                raise OperationalError(f"cannot fill set {name}: refused")
            fill(name, ops)
        staged._commit = refused
    load = staged.begin(new, stamp(1), None)
    if what == "switch":
        load.table += "\nadd rule inet dockfence no_such_chain drop\n"
    try:
        load.switch({4: [], 6: []})
    except OperationalError as exc:
        print(json.dumps(str(exc)[:200]))
    print(json.dumps(nft.canonical(nft.live_json()) == before))
    print(json.dumps(sorted(n for k, n in netlink.table_objects(nft.TABLE) or ()
                            if k == "set" and nft.staged_generation(n))))


@needs_root
@pytest.mark.parametrize("what", ["switch", "fill"])
def test_a_refused_load_leaves_the_live_rules_and_no_staged_set(what: str) -> None:
    error, unchanged, left = in_netns("refused", what)
    assert ("no_such_chain" if what == "switch" else "refused") in error, error
    assert unchanged is True
    assert left == []


def _in_netns_interrupted() -> None:
    staged.STAGE_MIN = 3
    old, new = ruleset(office(5)), ruleset(office(7))
    nft.apply_text(nft.transaction(nft.render(old, stamp(0))))
    staged.begin(new, stamp(1), None).filled()  # then the process "dies": no switch
    print(json.dumps(nft.same_table(nft.parse_live(nft.live_json() or {}), old)))
    try:
        staged.aimed([netlink.Op(True, "allow_0_v6", ())])
    except OperationalError as exc:
        print(json.dumps(str(exc)))
    staged.begin(new, stamp(2), None).switch({4: [], 6: []})
    _report(new, stamp(2))


@needs_root
def test_an_interrupted_load_changes_no_rule_and_the_next_one_deletes_its_sets() -> None:
    old_rules, ambiguous, after = in_netns("interrupted")
    assert old_rules is True
    assert "allow_0_g1_v6 and allow_0_v6" in ambiguous  # watch resyncs instead of guessing
    assert after["sets"] == ["allow_0_g2_v4", "allow_0_g2_v6", "bans_v4", "bans_v6", "bridges",
                             "deny_0_g2_v4", "stamp"]
    assert after["same listing"] and after["same rules"] and after["stamp"]


def _in_netns_list_update() -> None:
    from dockfence.incremental import list_update

    staged.STAGE_MIN = 3
    old = ruleset(office(20))
    new = ruleset([*office(20)[:-2], "2001:db8:ffff::/64"], ["198.51.100.67"])
    staged.begin(old, stamp(1), None).switch({4: [], 6: []})
    update = list_update(old, new, stamp(2))
    assert update is not None
    print(json.dumps(sorted({op.set for op in update.ops})))
    netlink.commit(nft.TABLE, staged.aimed(update.ops))
    _report(new, stamp(2))


@needs_root
def test_a_refreshed_list_updates_the_staged_sets_element_by_element() -> None:
    """What watch does when a downloaded list changes: the update names render()'s sets and
    lands in the live generation's."""
    names, after = in_netns("list_update")
    assert names == ["allow_0_v6", "deny_0_v4", "stamp"]
    assert after["sets"] == ["allow_0_g1_v4", "allow_0_g1_v6", "bans_v4", "bans_v6", "bridges",
                             "deny_0_g1_v4", "stamp"]
    assert after["same rules"] and after["stamp"]


def _in_netns_engine(workdir: str) -> None:
    from dockfence import engine

    folder = Path(workdir)
    os.environ["DOCKFENCE_STATE_DIR"] = str(folder / "state")
    listing = folder / "office.txt"
    path = folder / "policy.yaml"
    path.write_text("version: 1\nlists:\n  office: {file: office.txt}\ncontainers:\n  allow:\n"
                    "    - {container: django, port: 8080, from: office}\n")

    def apply(entries: list[str]) -> None:
        listing.write_text("\n".join(entries) + "\n")
        plan, _ = engine.apply(str(path), force=True, inventory=scenario)
        sets = sorted(n for k, n in netlink.table_objects(nft.TABLE) or () if k == "set"
                      and nft.is_address_set(n))
        print(json.dumps({"warnings": plan.warnings, "sets": sets,
                          "stamp": nft.live_stamp() == plan.stamp}))

    n = staged.STAGE_MIN + 50
    apply(office(n))
    switch = staged.Staged.switch

    def refused(self: staged.Staged, held: dict[int, list[tuple[int, int | None]]]) -> None:
        self.table += "\nadd rule inet dockfence no_such_chain drop\n"
        switch(self, held)

    staged.Staged.switch = refused  # type: ignore[method-assign]
    apply(office(n, skip=1))
    staged.Staged.switch = switch  # type: ignore[method-assign]
    apply(office(n, skip=2))
    # what the next boot loads: the whole table, as a whole load of the same rules lists it
    before = nft.canonical(nft.live_json())
    nft.apply_text(nft.removal())
    print(json.dumps([engine.restore(), nft.canonical(nft.live_json()) == before]))


@needs_root
def test_apply_stages_a_big_table_and_loads_it_whole_when_the_kernel_refuses(
        tmp_path: Path) -> None:
    """engine.apply: a big list is staged; a refused switch is reported and the table loaded
    whole instead (new rules, no staged set left); `restore` brings a staged table back."""
    first, refused, again, restored = in_netns("engine", str(tmp_path))
    assert first == {"warnings": [], "sets": ["allow_0_g1_v4", "allow_0_g1_v6"], "stamp": True}
    assert len(refused["warnings"]) == 1
    assert "staged load was refused" in refused["warnings"][0]
    assert "no_such_chain" in refused["warnings"][0]
    assert refused["sets"] == ["allow_0_v4", "allow_0_v6"] and refused["stamp"]
    assert again == {"warnings": [], "sets": ["allow_0_g1_v4", "allow_0_g1_v6"], "stamp": True}
    assert restored == [True, True]
