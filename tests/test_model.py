"""The data model's own arithmetic: collapsing networks and describing allow-lists."""

from __future__ import annotations

import ipaddress
import random

import pytest

from dockfence.model import Sources, collapse


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


@pytest.mark.parametrize("seed", range(20))
def test_collapse_matches_the_standard_library(seed: int) -> None:
    rng = random.Random(seed)
    nets = []
    for _ in range(rng.randint(1, 60)):
        if rng.random() < 0.5:
            nets.append(ipaddress.ip_network(  # inside 203.0.113.0/24
                (0xCB007100 | rng.randrange(0, 256), rng.randint(26, 32)), strict=False))
        else:
            nets.append(ipaddress.ip_network(
                (0x20010DB8 << 96 | rng.randrange(0, 64) << 64, rng.randint(58, 66)),
                strict=False))
    want = [*ipaddress.collapse_addresses(n for n in nets if n.version == 4),
            *ipaddress.collapse_addresses(n for n in nets if n.version == 6)]
    assert list(collapse(nets)) == want


def test_collapse_cases() -> None:
    assert collapse([net("203.0.113.0/25"), net("203.0.113.128/25")]) == (net("203.0.113.0/24"),)
    assert collapse([net("203.0.113.7"), net("203.0.113.0/24")]) == (net("203.0.113.0/24"),)
    assert collapse([net("2001:db8::/64"), net("198.51.100.7"), net("198.51.100.7")]) == (
        net("198.51.100.7/32"), net("2001:db8::/64"))


def test_sources_describe_stays_short() -> None:
    many = Sources.of([net(f"2001:db8:{i:x}::/48") for i in range(0, 2000, 2)],
                      names=("office", "blocklist"))
    assert many.describe() == "office, blocklist (1,000 networks)"
    unnamed = Sources(v4=many.v4, v6=many.v6)
    assert unnamed.describe(limit=2) == "2001:db8::/48, 2001:db8:2::/48 and 998 more"
    assert str(Sources(any=True)) == "anyone" and str(Sources()) == "nobody"
    assert str(Sources.of([net("198.51.100.7")], names=("198.51.100.7",))) == "198.51.100.7"


def test_union_and_equality_ignore_names() -> None:
    a = Sources.of([net("198.51.100.0/25")], names=("a",))
    b = Sources.of([net("198.51.100.128/25")], names=("b",))
    u = a.union(b)
    assert u.networks == (net("198.51.100.0/24"),) and u.names == ("a", "b")
    assert Sources.of([net("198.51.100.0/24")], names=("x",)) == u
    assert a.union(a).names == ("a",)
    assert a.union(Sources(any=True)).any


def test_detail_shows_what_a_name_stands_for() -> None:
    office = Sources.of([net("203.0.113.0/28"), net("2001:db8:1::/64")], names=("office",))
    assert office.detail() == "office (203.0.113.0/28, 2001:db8:1::/64)"
    plain = Sources.of([net("198.51.100.7")], names=("198.51.100.7",))
    assert plain.detail() == "198.51.100.7"
