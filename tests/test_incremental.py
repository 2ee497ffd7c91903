"""Element updates turn the old table into exactly what a full render of the new one gives.

The kernel check runs in a throwaway network namespace: the old table is loaded, the update is
sent over netlink (and, separately, replayed as nft commands the way `restore` does), and both
listings must equal how the kernel lists a full render of the new ruleset.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockfence import addresses, policy
from dockfence.backends import netlink as nl
from dockfence.backends import nftables as nft
from dockfence.compile import compile_policy
from dockfence.incremental import element_update, list_update, verdict_of
from dockfence.inventory import Binding, Container, Inventory
from dockfence.model import Sources
from dockfence.stamp import Stamp, digest

from helpers import POLICY, container, scenario

REPO = Path(__file__).resolve().parent.parent


def stamp_in(listing: list[dict[str, object]]) -> Stamp | None:
    """The stamp of a table listing (`nft -j list table`), from its stamp set's element."""
    for obj in listing:
        s = obj.get("set", {})
        if isinstance(s, dict) and s.get("name") == nft.STAMP_SET:
            for elem in s.get("elem", []):
                if isinstance(elem, dict) and "elem" in elem:
                    return Stamp.parse(elem["elem"].get("comment", ""))
    return None
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"),
                                reason="needs root and nft for a throwaway network namespace")
PARSED = policy.parse(POLICY, "/etc/dockfence/policy.yaml")


def later() -> Inventory:
    """scenario() after churn: admin gone, django moved to 8083, a new port next to an old
    one (adjacent intervals), a routed container readdressed, a custom-named bridge."""
    inv = scenario()
    kept = [c for c in inv.containers if c.name not in ("admin", "django", "api")]
    kept.append(container("django", ("tcp", 8083, 8080), service="web",
                          addresses=("172.17.0.9",)))
    kept.append(container("extra", ("tcp", 5433, 5432), addresses=("172.17.0.10",)))
    kept.append(Container("api", "api" * 4, None,
                          (Binding("tcp", "::", None, 8443), Binding("tcp", "0.0.0.0", 8443, 8443)),
                          ("172.18.0.3", "2001:db8:78::3"), routed_addresses=("2001:db8:78::3",)))
    return Inventory(tuple(sorted(kept, key=lambda c: c.name)), (*inv.bridges, "lan-docker"))


def _one_by_one(add: bool, version: int, blocks: list[int],
                timeouts: list[int | None] | None) -> list[nl.Op]:
    """The ops of blocks made one interval Element at a time: what block_ops must send."""
    width = addresses.BITS[version] // 8
    elements: list[nl.Element] = []
    for i, b in enumerate(blocks):
        first, last = addresses.span(version, b)
        elements += nl.interval(first.to_bytes(width, "big"), last.to_bytes(width, "big"),
                                timeout_ms=None if timeouts is None else timeouts[i])
    step = nl.ELEMENTS_PER_MESSAGE
    return [nl.Op(add, "s", tuple(elements[i:i + step])) for i in range(0, len(elements), step)]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.sampled_from([4, 6]), st.lists(st.tuples(st.integers(0, 2**16), st.integers(16, 32),
                                                   st.sampled_from([None, 1000, 86400000])),
                                         max_size=40), st.booleans(), st.booleans())
def test_block_ops_encode_what_elements_encode(version: int,
                                               raw: list[tuple[int, int, int | None]],
                                               add: bool, timed: bool) -> None:
    """nl.block_ops (C loops) sends byte for byte what interval Elements encoded one by one
    send, timeouts where given; the family's top address is refused alike."""
    bits = addresses.BITS[version]
    blocks = [(n << (bits - plen)) % (1 << bits) << 8 | plen for n, plen, _ in raw]
    timeouts = [t for _, _, t in raw] if timed else None
    assert nl.batch("dockfence", nl.block_ops(add, "s", bits, blocks, timeouts), 9) == \
        nl.batch("dockfence", _one_by_one(add, version, blocks, timeouts), 9)
    with pytest.raises(ValueError, match="largest key"):
        nl.block_ops(add, "s", bits, [((1 << bits) - 1) << 8 | bits])


def test_block_ops_cut_long_updates_into_messages() -> None:
    blocks = [(0x20010DB8 << 96 | n << 64) << 8 | 64 for n in range(1500)]
    ops = nl.block_ops(True, "s", 128, blocks)
    assert [len(op.encoded) for op in ops] == [1024, 1024, 952]
    assert nl.batch("dockfence", ops, 9) == \
        nl.batch("dockfence", _one_by_one(True, 6, blocks, None), 9)


def test_verdict_of_matches_render_and_needs_no_hashing() -> None:
    rs = compile_policy(PARSED, scenario())
    chains = nft.allow_chains(rs)
    assert chains and all(verdict_of(s, chains) == f"jump {n}" for s, n in chains)
    assert verdict_of(Sources(any=True), chains) == "jump allow_any"  # bans first
    assert verdict_of(Sources(), chains) == "drop"
    unknown = Sources.of([__import__("ipaddress").ip_network("198.51.100.99/32")])
    assert verdict_of(unknown, chains) is None


def test_only_what_differs_is_updated() -> None:
    old, new = compile_policy(PARSED, scenario()), compile_policy(PARSED, later())
    up = element_update(old, new, nft.allow_chains(old))
    assert up is not None
    ops = {(op.add, op.set, op.elements[0].key) for op in up.ops}
    assert (False, "tcp_ports", nl.port_key(8081)) in ops
    assert (True, "tcp_ports", nl.port_key(8083)) in ops
    assert (True, "bridges", nl.ifname_key("lan-docker")) in ops
    assert not any(op.elements[0].key == nl.port_key(5432) for op in up.ops)  # postgres stays
    # the record gets each touched map's whole new content
    assert "flush map inet dockfence tcp_ports\n" in up.text and "5432 comment" in up.text
    assert '"lan-docker"' in up.text and "udp_ports" not in up.text
    assert element_update(old, old, nft.allow_chains(old)).ops == []  # type: ignore[union-attr]


def test_shape_changes_need_a_full_table() -> None:
    old = compile_policy(PARSED, scenario())
    other = policy.parse(POLICY.replace("default: deny\n  allow:\n    - container: django",
                                        "default: allow\n  allow:\n    - container: django"))
    assert element_update(old, compile_policy(other, scenario()), nft.allow_chains(old)) is None
    # a rule that selected no container at the last apply already has its chain
    lone = policy.parse(POLICY + "    - container: newcomer\n      port: 80/tcp\n"
                                 "      from: [198.51.100.99]\n")
    inv = scenario()
    grown = Inventory((*inv.containers, container("newcomer", ("tcp", 8088, 80))), inv.bridges)
    before = compile_policy(lone, inv)
    up = element_update(before, compile_policy(lone, grown), nft.allow_chains(before))
    assert up is not None and "8088 comment" in up.text
    # two rules on one port: their union is a new allow-list, so a new chain
    both = policy.parse(POLICY + "    - container: newcomer\n      port: 80/tcp\n"
                                 "      from: [198.51.100.99]\n"
                                 "    - host_port: 8088/tcp\n      from: [198.51.100.98]\n")
    before = compile_policy(both, inv)
    assert element_update(before, compile_policy(both, grown), nft.allow_chains(before)) is None


SCRIPT = """
import json, sys
from dockfence.backends import netlink, nftables as nft
from dockfence.incremental import ElementUpdate
old, ops_mode, update_text = sys.argv[1], sys.argv[2], sys.argv[3]
nft.apply_text(nft.transaction(old))
if ops_mode == "netlink":
    import pickle, base64
    netlink.commit(nft.TABLE, pickle.loads(base64.b64decode(sys.argv[4])))
else:  # as restore does: the table and the record's updates in one transaction
    nft.apply_text(nft.transaction(old + update_text + update_text))
print(nft.canonical(nft.live_json()))
"""


@needs_root
@pytest.mark.parametrize("mode", ["netlink", "nft"])
def test_kernel_ends_with_the_new_tables_decisions(mode: str) -> None:
    import base64
    import pickle

    stamp_old = Stamp(digest(b"p"), digest(b"i1"))
    stamp_new = Stamp(digest(b"p"), digest(b"i2"))
    old, new = compile_policy(PARSED, scenario()), compile_policy(PARSED, later())
    up = element_update(old, new, nft.allow_chains(old), stamp_new)
    assert up
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", SCRIPT, nft.render(old, stamp_old), mode,
         up.text, base64.b64encode(pickle.dumps(up.ops)).decode()],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    # The same decisions as a full render of the new ruleset (a full apply gives each port a
    # chain with its counters; an element update jumps to the allow-list's shared chain).
    got = json.loads(proc.stdout)
    assert nft.same_table(nft.parse_live({"nftables": got}), new)
    assert stamp_in(got) == stamp_new


def _office(entries: str) -> policy.Policy:
    return policy.parse(POLICY.replace('office: [203.0.113.0/28, "2001:db8:1::/64"]',
                                       f"office: [{entries}]"), "/etc/dockfence/policy.yaml")


# every other /48, so that nothing collapses
BIG_OLD = ", ".join(f'"2001:db8:{2 * i:x}::/48"' for i in range(3000)) + ", 203.0.113.0/28"
BIG_NEW = ", ".join(f'"2001:db8:{2 * i:x}::/48"' for i in range(1500, 4500)) + \
    ", 203.0.113.16/28"


def test_a_refreshed_list_changes_only_its_sets() -> None:
    old = compile_policy(PARSED, scenario())
    new = compile_policy(_office('203.0.113.0/29, 198.51.100.64/26, "2001:db8:2::/64"'),
                         scenario())
    up = list_update(old, new, Stamp(digest(b"p2"), digest(b"i")))
    assert up is not None
    touched = {op.set for op in up.ops}
    # office's own sets, the union with 198.51.100.7 (django), the stamp; nothing else
    assert touched == {"allow_0_v4", "allow_0_v6", "allow_1_v4", "allow_1_v6", "stamp"}, touched
    assert "flush set inet dockfence allow_0_v4\n" in up.text
    assert "203.0.113.0/29, 198.51.100.64/26" not in up.text  # sorted, as render() writes them
    assert "198.51.100.64/26, 203.0.113.0/29" in up.text
    assert list_update(old, old).ops == []  # type: ignore[union-attr]
    # a list that loses its last IPv6 entry loses a set: the table's structure changes
    assert list_update(old, compile_policy(_office("203.0.113.0/29"), scenario())) is None
    # so does one that becomes equal to another list's union
    assert list_update(old, compile_policy(_office("198.51.100.7"), scenario())) is None


LIST_SCRIPT = """
import sys, pickle
from dockfence.backends import netlink, nftables as nft
old, mode, text, ops = pickle.load(sys.stdin.buffer)
nft.apply_text(nft.transaction(old))
if mode == "netlink":
    netlink.commit(nft.TABLE, ops)
else:
    nft.apply_text(nft.transaction(old + text))
print(nft.canonical(nft.live_json()))
"""


@needs_root
@pytest.mark.parametrize("mode", ["netlink", "nft"])
def test_kernel_holds_the_refreshed_lists(mode: str) -> None:
    """3,000 networks replaced by 3,000 others (half shared): more elements than one netlink
    message holds and a batch larger than the default send buffer."""
    import pickle

    old = compile_policy(_office(BIG_OLD), scenario())
    new = compile_policy(_office(BIG_NEW), scenario())
    stamp = Stamp(digest(b"p2"), digest(b"i"))
    up = list_update(old, new, stamp)
    assert up is not None and len(nl.batch(nft.TABLE, up.ops)[0]) > 256 << 10
    args = (nft.render(old, Stamp(digest(b"p1"), digest(b"i"))), mode, up.text, up.ops)
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, "-c", LIST_SCRIPT],
                          input=pickle.dumps(args), capture_output=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    assert nft.same_table(nft.parse_live({"nftables": got}), new)
    assert not nft.same_table(nft.parse_live({"nftables": got}), old)
    assert stamp_in(got) == stamp
