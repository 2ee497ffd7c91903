"""Rendering is golden-tested; the kernel round trip (throwaway namespace) needs root."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dockfence import policy
from dockfence.backends import nftables as nft
from dockfence.compile import compile_policy
from dockfence.inventory import Binding, Container, Inventory
from dockfence.stamp import Stamp, digest

from helpers import POLICY, scenario

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "scenario": (POLICY, scenario()),
    "interfaces_allow_default": (
        "version: 1\ninterfaces: [eth0, wg0]\ncontainers:\n  default: allow\n",
        scenario(),
    ),
    "empty_host": ("version: 1\n", Inventory()),
    # deny lists: `any except` refuses before it accepts; `office except` cuts the office; two
    # rules on one port with different excepts add up exactly; a host rule with an except
    "except": (
        "version: 1\nlists:\n  abusers: [198.51.100.66, '2001:db8:bad::/48']\n"
        "  office: [203.0.113.0/28]\nhost:\n  allow:\n"
        "    - {port: 22, from: office, except: 203.0.113.9}\ncontainers:\n  allow:\n"
        "    - {container: django, port: 8080, from: any, except: [abusers]}\n"
        "    - {container: postgres, port: 5432, from: [office, abusers], except: [abusers]}\n"
        "    - {container: postgres, port: 5432, from: 198.51.100.64/30, except: 198.51.100.65}\n",
        scenario(),
    ),
    # two containers on one port of two host addresses, both families, two allow-lists; one
    # that no rule names (the default, on its address); a bare host-port rule on every address
    "addressed": (
        "version: 1\nlists:\n  office: [203.0.113.0/28, '2001:db8:1::/64']\n"
        "containers:\n  allow:\n    - {container: a, port: 443, from: office}\n"
        "    - {container: b, port: 443, from: 198.51.100.7}\n"
        "    - {host_port: 53/udp, from: any}\n",
        Inventory(containers=(
            Container("a", "a", None, (Binding("tcp", "203.0.113.1", 443, 443),
                                       Binding("tcp", "2001:db8::1", 443, 443))),
            Container("b", "b", None, (Binding("tcp", "203.0.113.2", 443, 443),
                                       Binding("tcp", "2001:db8::2", 443, 443))),
            Container("c", "c", None, (Binding("tcp", "203.0.113.3", 443, 443),
                                       Binding("udp", "203.0.113.3", 53, 53))),
        )),
    ),
}
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("nft"),
    reason="needs root and nft for a throwaway network namespace",
)


def ruleset(name: str):
    text, inv = CASES[name]
    return compile_policy(policy.parse(text, "/etc/dockfence/policy.yaml"), inv)


@pytest.mark.parametrize("name", sorted(CASES))
def test_render_matches_golden(name: str) -> None:
    """Set UPDATE_GOLDEN=1 to rewrite the expected files after an intended change."""
    path = GOLDEN / f"{name}.nft"
    got = nft.render(ruleset(name))
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text()


def test_comments_never_carry_raw_user_text() -> None:
    assert nft.comment('x" ; flush ruleset', "a\nb") == '"x? ; flush ruleset | a?b"'
    assert len(nft.comment("a" * 500)) == 129


def test_unsafe_bridge_name_is_refused() -> None:
    from dockfence.errors import OperationalError

    inv = Inventory(bridges=('br"; flush',))
    with pytest.raises(OperationalError):
        nft.render(compile_policy(policy.parse("version: 1\n"), inv))


@needs_root
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_round_trip(name: str) -> None:
    """What the kernel lists back parses into the same decisions that were rendered."""
    rs = ruleset(name)
    listed = nft.canonical_of(nft.render(rs))
    back = nft.parse_live({"nftables": json.loads(listed)})
    assert back.container_gates == rs.container_gates
    assert back.host == rs.host
    assert back.unknown_published == rs.unknown_published
    assert back.outside == rs.outside
    assert sorted(back.docker_bridges) == sorted(rs.docker_bridges)
    assert set(back.direct) == set(rs.direct)
    assert back.loopback_guard and rs.loopback_guard


@needs_root
def test_lists_of_the_same_addresses_read_back_as_the_same_table() -> None:
    """Two lists that hold the same addresses (`office`, and `office except` someone outside
    it) share one set, whose comment names one of them: the table read back is still the one
    rendered, so `plan` sees no change and `apply --full` loads nothing."""
    rs = compile_policy(policy.parse(
        "version: 1\nlists:\n  office: [203.0.113.0/28, '2001:db8:1::/64']\n"
        "  abusers: [198.51.100.66]\nhost:\n  allow:\n    - {port: 22, from: office}\n"
        "containers:\n  allow:\n    - {container: django, port: 8080, from: office, "
        "except: abusers}\n", "/etc/dockfence/policy.yaml"), scenario())
    gates = (*rs.container_gates, *rs.host.gates)  # type: ignore[union-attr]
    assert {g.sources.names for g in gates if g.sources.names} == {
        ("office",), ("office except abusers",)}  # two names, one set
    back = nft.parse_live({"nftables": json.loads(nft.canonical_of(nft.render(rs)))})
    assert nft.same_table(back, rs)
    other = compile_policy(policy.parse(
        "version: 1\nlists:\n  office: [203.0.113.0/28, '2001:db8:1::/64']\nhost:\n  allow:\n"
        "    - {port: 22, from: office}\ncontainers:\n  allow:\n"
        "    - {container: django, port: 8080, from: [203.0.113.0/28, '2001:db8:1::/64']}\n",
        "/etc/dockfence/policy.yaml"), scenario())
    assert not nft.same_table(back, other)  # the same addresses, other names: a change


@needs_root
def test_table_without_loopback_guard_reads_back_without_it() -> None:
    """A table made before the guard existed says so, and every render has it again."""
    rs = dataclasses.replace(ruleset("scenario"), loopback_guard=False)
    text = nft.render(rs)
    assert "loopback_guard" not in text
    back = nft.parse_live({"nftables": json.loads(nft.canonical_of(text))})
    assert not back.loopback_guard


def test_loopback_guard_is_rendered_whatever_the_policy() -> None:
    for name in CASES:
        text = nft.render(ruleset(name))
        guard = text[text.index("chain loopback_guard"):]
        assert "hook prerouting priority raw;" in guard
        assert 'iifname != "lo" ip daddr 127.0.0.0/8 counter drop' in guard
        assert 'iifname != "lo" ip6 daddr ::1 counter drop' in guard


@needs_root
def test_large_lists_load() -> None:
    """20,000 CIDRs in one allow-list: they become one interval set, not 20,000 rules."""
    nets = [f'"2001:db8:{i:x}::/48"' for i in range(0, 40000, 2)]
    text = (
        "version: 1\nlists:\n  big: [" + ", ".join(nets) + "]\ncontainers:\n  allow:\n"
        "    - container: web\n      port: 80\n      from: [big]\n"
    )
    inv = Inventory(containers=(Container("web", "w", None, (Binding("tcp", "0.0.0.0", 80, 80),)),))
    rs = compile_policy(policy.parse(text, "big.yaml"), inv)
    rendered = nft.render(rs)
    # one set, tested by the port's own chain and by the list's shared chain (for watch)
    assert rendered.count("set allow_") == 1 and rendered.count("saddr @allow_") == 2
    back = nft.parse_live({"nftables": json.loads(nft.canonical_of(nft.render(rs)))})
    assert back.container_gates == rs.container_gates


def test_stamp_text_round_trips_and_rejects_other_text() -> None:
    s = Stamp(digest(b"policy"), digest(b"inventory"))
    assert Stamp.parse(s.text()) == s
    assert Stamp.parse(s.text().replace("dockfence/1", "dockfence/0")) is None
    assert Stamp.parse("managed by hand") is None
    assert digest(b"ab", b"c") != digest(b"a", b"bc")  # chunks cannot blur into each other


@needs_root
def test_stamp_is_read_back_and_replaced_in_one_transaction() -> None:
    """In a throwaway namespace: the stamp a table was loaded with is what live_stamp() reads,
    and replace_stamp() replaces it (over netlink) without touching anything else."""
    first, second = Stamp(digest(b"p1"), digest(b"i1")), Stamp(digest(b"p1"), digest(b"i2"))
    table = nft.transaction(nft.render(ruleset("scenario"), first))
    script = (
        "import sys\n"
        "from dockfence.backends import nftables as nft\n"
        "from dockfence.stamp import Stamp\n"
        "nft.apply_text(sys.argv[1])\n"
        "print(nft.live_stamp().text())\n"
        "before = nft.live_text().replace(sys.argv[2], sys.argv[3])\n"
        "nft.replace_stamp(Stamp.parse(sys.argv[3]))\n"
        "print(nft.live_stamp().text())\n"
        "print(before == nft.live_text())\n"
    )
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", script, table, first.text(),
         second.text()],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert proc.stdout.splitlines() == [first.text(), second.text(), "True"]


@needs_root
def test_bans_load_with_the_table_and_are_replaced_over_netlink() -> None:
    """In a throwaway namespace: overlapping bans load as disjoint pieces inside the table's
    transaction, with their timeouts; replace_bans() swaps one family's set in one netlink
    transaction (no nft: it would read every element of the table first) and leaves the
    other family alone."""
    from dockfence import bans

    now = 1000.0
    first = bans.pieces([bans.Ban("203.0.113.96/28", now + 600), bans.Ban("203.0.113.100", None),
                         bans.Ban("2001:db8:9::/64", now + 900)], now)
    second = bans.pieces([bans.Ban("203.0.113.100", now + 300)], now)
    table = nft.transaction(nft.with_bans(nft.render(ruleset("scenario")), first))
    script = (
        "import json, subprocess, sys\n"
        "from dockfence.backends import nftables as nft\n"
        "def show():\n"
        "    print(json.dumps([subprocess.run(['nft', '-j', 'list', 'set', 'inet', 'dockfence',\n"
        "        name], capture_output=True, text=True, check=True).stdout\n"
        "        for name in ('bans_v4', 'bans_v6')]))\n"
        "nft.apply_text(sys.argv[1])\n"
        "show()\n"
        "nft.replace_bans(4, json.loads(sys.argv[2]))\n"
        "show()\n"
        "nft.replace_bans(4, [])\n"
        "show()\n"
    )
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", script, table,
                           json.dumps(second[4])],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr

    def held(listing: str) -> list[list[object]]:
        (found,) = [o["set"] for o in json.loads(listing)["nftables"] if "set" in o]
        return [[nft._elem_text(e), e["elem"].get("timeout") if isinstance(e, dict) and
                 "elem" in e else None] for e in found.get("elem", [])]

    loaded, replaced, emptied = ([held(x) for x in json.loads(line)]
                                 for line in proc.stdout.splitlines())
    v6 = [["2001:db8:9::/64", 900]]
    assert loaded == [[["203.0.113.96/30", 600], ["203.0.113.100", None],
                       ["203.0.113.101", 600], ["203.0.113.102/31", 600],
                       ["203.0.113.104/29", 600]], v6]
    assert replaced == [[["203.0.113.100", 300]], v6]
    assert emptied == [[], v6]


@needs_root
def test_unban_lifts_a_ban_only_the_kernel_holds_and_knows_what_was_never_banned(
        tmp_path: Path) -> None:
    """In a throwaway namespace: a ban the kernel's set holds without a record (a lost state
    directory) is lifted; an address banned nowhere is answered False; the recorded ban beside
    them stays in both."""
    from dockfence import bans

    now = time.time()
    held = bans.pieces([bans.Ban("203.0.113.100", now + 600), bans.Ban("203.0.113.7", now + 600)],
                       now)
    table = nft.transaction(nft.with_bans(
        nft.render(ruleset("scenario"), Stamp(digest(b"p"), digest(b"i"))), held))
    script = (
        "import sys, time\n"
        "from dockfence import bans, banning\n"
        "from dockfence.backends import nftables as nft\n"
        "nft.apply_text(sys.argv[1])\n"
        "bans.save([bans.Ban('203.0.113.7', time.time() + 600)])\n"
        "print(banning.unban('203.0.113.100'), banning.unban('198.51.100.9'))\n"
        "print(sorted(nft.live_bans()), [b.network for b in bans.load()])\n"
    )
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", script, table],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                          env={**os.environ, "DOCKFENCE_STATE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True False", "['203.0.113.7'] ['203.0.113.7']"]


@needs_root
def test_a_netlink_transaction_of_many_messages_is_acknowledged_whole() -> None:
    """Every message of a batch is acknowledged: 2,000 of them overflow a netlink socket's
    default receive buffer (ENOBUFS after the kernel had applied them all). commit() makes room
    for every ack; the set then holds every element, as nft lists it. A batch of as many whose
    last message the kernel refuses changes nothing and says why."""
    script = (
        "import sys\n"
        "from dockfence.backends import netlink as nl, nftables as nft\n"
        "from dockfence.errors import OperationalError\n"
        "def ops(first, into='bans_v6'):\n"
        "    return [nl.Op(True, into, nl.interval(bytes(14) + i.to_bytes(2, 'big'),\n"
        "            bytes(14) + i.to_bytes(2, 'big'))) for i in range(first, first + 4000, 2)]\n"
        "nft.apply_text(sys.argv[1])\n"
        "nl.commit(nft.TABLE, ops(0x2000))\n"
        "try:\n"
        "    nl.commit(nft.TABLE, ops(0x8000) + ops(0x9000, 'no_such_set')[:1])\n"
        "except OperationalError as exc:\n"
        "    print(exc)\n"
    )
    table = nft.transaction(nft.render(ruleset("scenario")))
    proc = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", f'{sys.executable} -c "$1" "$2" && '
         "nft -j list set inet dockfence bans_v6", "sh", script, table],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    refused, listing = proc.stdout.split("\n", 1)
    assert refused == "the kernel refused the element update: No such file or directory"
    (listed,) = [o["set"] for o in json.loads(listing)["nftables"] if "set" in o]
    assert len(listed["elem"]) == 2000 and listed["elem"][0] == "::2000"
    assert listed["elem"][-1] == "::2f9e"


@needs_root
def test_a_rebuild_starts_the_counters_where_they_were() -> None:
    """watch's rebuild (same rules, each port its own chain) keeps what the counters counted:
    the kernel takes the start values, and the listing gives them back."""
    table = nft.render(ruleset("scenario"), counts={"tcp_ports_8081_refused": 42})
    script = "nft -f - && nft -j list counter inet dockfence tcp_ports_8081_refused"
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", script], input=table,
                          capture_output=True, text=True, check=True)
    (counter,) = [o["counter"] for o in json.loads(proc.stdout)["nftables"] if "counter" in o]
    assert counter["packets"] == 42


@needs_root
def test_stamp_and_counters_read_over_netlink_match_nft() -> None:
    """In a throwaway namespace: no table reads as absent; a table without a stamp set as
    present and unstamped; the named counters read over netlink (not nft, which would fetch
    every list first) equal what `nft list counters` says, another table's namesakes apart."""
    stamp = Stamp(digest(b"p1"), digest(b"i1"))
    table = nft.transaction(nft.render(ruleset("scenario"), stamp,
                                       counts={"tcp_ports_8081_allowed": 7, "banned": 3}))
    script = (
        "import json, subprocess, sys\n"
        "from dockfence.backends import nftables as nft\n"
        "print(nft.read_stamp(), nft.live_counters())\n"
        "subprocess.run(['nft', 'add', 'table', 'inet', 'dockfence'], check=True)\n"
        "print(nft.read_stamp())\n"
        "nft.apply_text(sys.argv[1])\n"
        "subprocess.run(['nft', 'add table inet other; add counter inet other banned;'\n"
        "                ' add counter inet other other_only'], check=True)\n"
        "listed = subprocess.run(['nft', '-j', 'list', 'counters', 'table', 'inet',\n"
        "                         'dockfence'], capture_output=True, text=True).stdout\n"
        "ref = {o['counter']['name']: o['counter']['packets']\n"
        "       for o in json.loads(listed)['nftables'] if 'counter' in o}\n"
        "got = nft.live_counters()\n"
        "print(nft.read_stamp()[1].text(), got == ref, len(got) > 10, got['banned'],\n"
        "      got['tcp_ports_8081_allowed'], 'other_only' in got)\n"
    )
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", script, table],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["(False, None) None", "(True, None)",
                                        f"{stamp.text()} True True 3 7 False"]
