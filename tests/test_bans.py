"""Bans: parsing, the record, and the nft commands. Pure (the lab proves them with fail2ban)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from dockfence import bans
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


def test_element_commands_renew_the_timeout_in_one_transaction() -> None:
    text = nft.ban_element_commands(ipaddress.ip_network("2001:db8:9::/64"), 600)
    assert text.splitlines() == [
        "add element inet dockfence bans_v6 { 2001:db8:9::/64 }",
        "delete element inet dockfence bans_v6 { 2001:db8:9::/64 }",
        "add element inet dockfence bans_v6 { 2001:db8:9::/64 timeout 600s }",
    ]
    assert "timeout" not in nft.ban_element_commands(ipaddress.ip_network("203.0.113.7"), None)
    carried = bans.elements([bans.Ban("203.0.113.7", 1100.0)], now=1000.0)
    assert carried.endswith("add element inet dockfence bans_v4 { 203.0.113.7 timeout 100s }\n")


def test_every_allow_list_refuses_bans_first() -> None:
    from test_nftables import ruleset

    table = nft.render(ruleset("scenario"))
    chains = table.split("\tchain ")[1:]
    allow = [c for c in chains if c.startswith("allow_")]
    assert allow and all(c.splitlines()[1].strip().startswith("ip saddr @bans_v4 counter drop")
                         for c in allow)
    assert " : accept" not in table  # `any` is a jump to allow_any, which refuses bans
