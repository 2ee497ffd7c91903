"""Bans: parsing, the record, and the nft commands. Pure (the lab proves them with fail2ban)."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockfence import addresses, bans
from dockfence.backends import nftables as nft
from dockfence.errors import OperationalError, UsageError


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600),
                                           ("1h", 3600), ("2d", 172800), ("1w", 604800),
                                           ("-1", None), ("forever", None)])
def test_durations(text: str, seconds: int | None) -> None:
    assert bans.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "1y", "-5", "1h30m", "", "9" * 12, "1.5h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="not a duration"):
        bans.parse_duration(text)


@pytest.mark.parametrize("text", ["127.0.0.1", "::1", "0.0.0.0/0", "::/0", "224.0.0.1",
                                  "203.0.113.5/24", "203.0.113.x", "1.2.3.4; flush ruleset"])
def test_refused_targets(text: str) -> None:
    with pytest.raises(UsageError):
        bans.parse_target(text)


def test_record_round_trip_drops_expired_and_refuses_damage(tmp_path: Path) -> None:
    path = tmp_path / "bans.json"
    assert bans.load(path) == []
    kept = bans.Ban("203.0.113.100", 2000.0, "fail2ban sshd")
    forever = bans.Ban("2001:db8:9::/64", None)
    bans.save([bans.Ban("203.0.113.101", 500.0), kept, forever], path)
    assert bans.load(path, now=1000.0) == [kept, forever]
    path.write_text('{"bans": [{"network": "not an address"}]}')
    with pytest.raises(OperationalError, match="damaged ban record"):
        bans.load(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(OperationalError, match="cannot read the ban record"):
        bans.load(path)


def test_with_ban_replaces_the_same_network() -> None:
    old = [bans.Ban("203.0.113.100", 10.0), bans.Ban("203.0.113.101", None)]
    new = bans.with_ban(old, bans.Ban("203.0.113.100", 99.0))
    assert sorted((b.network, b.expires) for b in new) == [("203.0.113.100", 99.0),
                                                          ("203.0.113.101", None)]
    assert bans.without(new, "203.0.113.101") == [bans.Ban("203.0.113.100", 99.0)]


def test_a_ban_alone_is_its_own_network_with_its_time_left() -> None:
    held = bans.pieces([bans.Ban("203.0.113.7", 1100.0), bans.Ban("2001:db8:9::/64", None),
                        bans.Ban("198.51.100.9", 900.0)], now=1000.0)  # the last expired
    assert _shown(held) == {4: [("203.0.113.7", 100)], 6: [("2001:db8:9::/64", None)]}


def test_overlapping_bans_become_disjoint_pieces_with_the_longest_time() -> None:
    """A /28 for a minute and one of its hosts for an hour: the kernel's interval set refuses
    overlapping elements, and the host must stay banned after the /28 expires."""
    held = bans.pieces([bans.Ban("203.0.113.96/28", 1060.0),
                        bans.Ban("203.0.113.100", 4600.0)], now=1000.0)
    assert _shown(held)[4] == [("203.0.113.96/30", 60), ("203.0.113.100", 3600),
                               ("203.0.113.101", 60), ("203.0.113.102/31", 60),
                               ("203.0.113.104/29", 60)]
    # for ever wins over any time; a host under a longer ban adds nothing
    held = bans.pieces([bans.Ban("203.0.113.96/28", None), bans.Ban("203.0.113.100", 1060.0)],
                       now=1000.0)
    assert _shown(held)[4] == [("203.0.113.96/28", None)]
    # the limited broadcast address cannot be an interval's start: left out
    held = bans.pieces([bans.Ban("255.255.255.254/31", None)], now=1000.0)
    assert _shown(held)[4] == [("255.255.255.254", None)]


Pieces = dict[int, list[tuple[int, int | None]]]


def _shown(held: Pieces) -> dict[int, list[tuple[str, int | None]]]:
    return {v: [(addresses.show(v, b), left) for b, left in items] for v, items in held.items()}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32),
                          st.one_of(st.none(), st.integers(1, 5))), max_size=8))
def test_pieces_hold_every_address_with_its_longest_ban(raw: list[tuple[int, int, int | None]],
                                                        ) -> None:
    """Against brute force over 203.0.113.0/24: every address is held exactly when a ban
    covers it, with the time left of the longest one (None: for ever); pieces are disjoint."""
    now = 1000.0
    listed = []
    for host, plen, minutes in raw:
        net = ipaddress.ip_network(f"203.0.113.{host}/{plen}", strict=False)
        listed.append(bans.Ban(str(net), None if minutes is None else now + 60 * minutes))
    held = bans.pieces(listed, now)
    seen: dict[int, int | None] = {}
    for block, left in held[4]:
        first, last = addresses.span(4, block)
        for a in range(first, last + 1):
            assert a not in seen, "pieces overlap"
            seen[a] = left
    for a in range(int(ipaddress.ip_address("203.0.113.0")),
                   int(ipaddress.ip_address("203.0.113.255")) + 1):
        covering = [b for b in listed if ipaddress.ip_address(a) in ipaddress.ip_network(
            b.network)]
        if not covering:
            assert a not in seen
        elif any(b.expires is None for b in covering):
            assert seen[a] is None
        else:
            assert seen[a] == int(max(b.expires for b in covering if b.expires) - now)


def test_bans_are_written_into_the_table_they_are_loaded_with() -> None:
    """No `add element` after the table: nft 1.0.6 would read every element of the table it
    replaces first. A table without ban sets is refused, not loaded without its bans."""
    from test_nftables import ruleset

    table = nft.render(ruleset("scenario"))
    held = bans.pieces([bans.Ban("203.0.113.96/28", 1060.0), bans.Ban("203.0.113.100", None),
                        bans.Ban("2001:db8:9::/64", None)], now=1000.0)
    loaded = nft.with_bans(table, held)
    assert "add element" not in loaded and loaded.count("elements = { 203.0.113.96/30 ") == 1
    assert "\t\telements = { 2001:db8:9::/64 }\n" in loaded
    assert "203.0.113.100, 203.0.113.101 timeout 60s" in loaded
    assert nft.with_bans(table, bans.pieces([], 1000.0)) == table
    with pytest.raises(OperationalError, match="no set bans_v6"):
        nft.with_bans(table.replace("bans_v6", "other_v6"), held)


def test_covered_tells_whether_the_kernel_holds_a_whole_ban() -> None:
    live = bans.held(["203.0.113.96/30", "203.0.113.100", "203.0.113.101", "203.0.113.102/31",
                      "203.0.113.104/29", "2001:db8:9::/64"])
    assert bans.covered("203.0.113.96/28", live) and bans.covered("203.0.113.100", live)
    assert not bans.covered("203.0.113.96/27", live)
    assert bans.covered("2001:db8:9::5", live) and not bans.covered("2001:db8:8::5", live)
    assert not bans.covered("203.0.113.95", live) and not bans.covered("203.0.113.112", live)
    assert not bans.covered("198.51.100.1", bans.held([]))


def test_every_gate_that_admits_anyone_refuses_bans_first() -> None:
    from test_nftables import ruleset

    table = nft.render(ruleset("scenario"))
    chains = [c for c in table.split("\tchain ")[1:] if "_allowed accept" in c]
    assert len(chains) >= 3  # office lists, and `any` (udp 5353)
    for chain in chains:
        body = [line.strip() for line in chain.splitlines()[1:]]
        assert body[0].startswith("ip saddr @bans_v4 counter name"), chain
        assert body[1] == 'ip saddr @bans_v4 drop comment "banned"', chain
        assert body[3] == 'ip6 saddr @bans_v6 drop comment "banned"', chain
    allow_default = nft.render(ruleset("interfaces_allow_default"))
    assert 'ct status dnat ip saddr @bans_v4 drop comment "banned"' in allow_default


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(26, 32),
                          st.sampled_from([None, 1, 2])), max_size=12))
def test_disjoint_bans_skip_the_sweep_with_the_same_pieces(
        raw: list[tuple[int, int, int | None]]) -> None:
    """pieces() leaves out the sweep when no two bans overlap: what it does instead must give
    what the sweep gives (touching neighbours that expire together joined, the rest apart)."""
    items: list[tuple[int, int, float]] = []
    for host, plen, minutes in raw:
        net = ipaddress.ip_network(f"203.0.113.{host}/{plen}", strict=False)
        start = int(net.network_address)
        items.append((start, start + net.num_addresses,
                      math.inf if minutes is None else 60.0 * minutes))
    disjoint: list[tuple[int, int, float]] = []
    for span in sorted(items):
        if not disjoint or span[0] >= disjoint[-1][1]:
            disjoint.append(span)
    assert bans._joined(disjoint) == bans._swept(disjoint)
