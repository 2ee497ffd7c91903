"""Deny lists (`except:`): parsing, and the exact union of rules with different excepts,
checked against a brute-force model on a small address space."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockfence import addresses, policy
from dockfence.compile import compile_policy
from dockfence.errors import PolicyError
from dockfence.explain import explain
from dockfence.model import Sources

from helpers import scenario

BASE = int(ipaddress.IPv4Address("198.51.100.0"))
SPACE = 32  # 198.51.100.0/27, and the addresses around it
PROBES = [ipaddress.IPv4Address(BASE + i) for i in range(-2, SPACE + 2)]

# a network inside the space: (offset, prefix length), aligned
nets = st.integers(27, 32).flatmap(
    lambda p: st.integers(0, SPACE // (1 << (32 - p)) - 1).map(
        lambda i: (BASE + i * (1 << (32 - p))) << 8 | p))
rules = st.tuples(st.booleans(), st.lists(nets, max_size=4), st.lists(nets, max_size=4))


def build(rule: tuple[bool, list[int], list[int]]) -> Sources:
    any_, admit, deny = rule
    s = Sources.of_blocks(admit, [], any_)
    return s.excepting(deny, [], ("x",)) if deny else s


def model(rule: tuple[bool, list[int], list[int]], a: ipaddress.IPv4Address) -> bool:
    def inside(blocks: list[int]) -> bool:
        return any(addresses.contains(4, (b,), int(a)) for b in blocks)
    any_, admit, deny = rule
    return (any_ or inside(admit)) and not inside(deny)


@settings(max_examples=400, deadline=None)
@given(st.lists(rules, min_size=1, max_size=4))
def test_union_of_rules_is_exact(many: list[tuple[bool, list[int], list[int]]]) -> None:
    union = Sources.union_of(build(r) for r in many)
    for a in PROBES:
        assert union.admits(a) == any(model(r, a) for r in many), a
    # the refused blocks lie inside what the union covers (the kernel refuses them first)
    for b in union.deny_v4:
        first, last = addresses.span(4, b)
        assert union.covers(ipaddress.IPv4Address(first))
        assert union.covers(ipaddress.IPv4Address(last))


@settings(max_examples=300, deadline=None)
@given(st.lists(nets, max_size=5), st.lists(nets, max_size=5))
def test_intersect_and_subtract_are_exact(a: list[int], b: list[int]) -> None:
    ca, cb = addresses.collapse(4, a), addresses.collapse(4, b)
    both, only = addresses.intersect(4, ca, cb), addresses.subtract(4, ca, cb)
    for x in PROBES:
        ina, inb = (addresses.contains(4, c, int(x)) for c in (ca, cb))
        assert addresses.contains(4, both, int(x)) == (ina and inb)
        assert addresses.contains(4, only, int(x)) == (ina and not inb)
    assert addresses.collapse(4, both) == both and addresses.collapse(4, only) == only


POLICY = """\
version: 1
lists:
  abusers: [198.51.100.66, "2001:db8:bad::/48"]
  office: [203.0.113.0/28]
host:
  allow:
    - {port: 22, from: office, except: 203.0.113.9}
containers:
  allow:
    - container: django
      port: 8080
      from: any
      except: [abusers]
"""


def test_except_parses_in_the_policys_words() -> None:
    p = policy.parse(POLICY, "p.yaml")
    web = p.container_rules[0].sources
    assert str(web) == "any except abusers"
    assert not web.admits(ipaddress.ip_address("198.51.100.66"))
    assert not web.admits(ipaddress.ip_address("2001:db8:bad::1"))
    assert web.admits(ipaddress.ip_address("198.51.100.67"))
    ssh = p.host_rules[0].sources
    assert str(ssh) == "office except 203.0.113.9"
    assert ssh.admits(ipaddress.ip_address("203.0.113.8"))
    assert not ssh.admits(ipaddress.ip_address("203.0.113.9"))


def test_except_outside_from_changes_nothing() -> None:
    p = policy.parse(POLICY.replace("except: 203.0.113.9", "except: 198.51.100.1"), "p.yaml")
    assert p.host_rules[0].sources == policy.parse(
        POLICY.replace(", except: 203.0.113.9", ""), "p.yaml").host_rules[0].sources


def test_explain_says_an_except_decided() -> None:
    rs = compile_policy(policy.parse(POLICY, "p.yaml"), scenario())
    ex = explain(rs, scenario(), ipaddress.ip_address("198.51.100.66"), 8081)
    assert ex.verdict == "deny"
    assert ex.reason == "refused by an except: any except abusers"
    ok = explain(rs, scenario(), ipaddress.ip_address("198.51.100.65"), 8081)
    assert ok.verdict == "allow"
    host = explain(rs, scenario(), ipaddress.ip_address("203.0.113.9"), 22)
    assert host.verdict == "deny" and "except" in host.reason


@pytest.mark.parametrize(("rule", "line", "words"), [
    ("{container: django, port: 8080, from: any, except: [nosuch]}", 6, "unknown list name"),
    ("{container: django, port: 8080, from: any, except: [198.51.100.1/24]}", 6,
     "host bits set"),
    ("{container: django, port: 8080, from: any, except: any}", 6, "`except: any`"),
    ("{container: django, port: 8080, from: any, except: {a: 1}}", 6, "except"),
])
def test_bad_except_names_file_line_and_value(rule: str, line: int, words: str) -> None:
    text = f"version: 1\nlists:\n  a: [198.51.100.1]\ncontainers:\n  allow:\n    - {rule}\n"
    with pytest.raises(PolicyError) as err:
        policy.parse(text, "p.yaml")
    assert err.value.path == "p.yaml" and err.value.line == line
    assert words in str(err.value)


def test_schema_knows_except() -> None:
    schema = policy.json_schema()
    assert "except" in str(schema)


def test_plan_names_the_addresses_an_except_shuts_out() -> None:
    from dockfence.plan import diff

    before = policy.parse(POLICY.replace(", except: 203.0.113.9", ""), "p.yaml")
    after = policy.parse(POLICY, "p.yaml")
    changed = [c for c in diff(compile_policy(before, scenario()),
                               compile_policy(after, scenario())) if c.kind == "change"]
    assert [(c.before, c.after, c.added, c.removed) for c in changed] == [
        ("office", "office except 203.0.113.9", [], ["203.0.113.9"])]


def test_watch_gives_a_new_port_its_excepting_chain_not_allow_any() -> None:
    """watch adds a port as a map element jumping to its allow-list's shared chain: `any
    except abusers` has one of its own (refusing the abusers), never the plain `any` chain."""
    from dockfence.backends import nftables as nft
    from dockfence.incremental import verdict_of

    rs = compile_policy(policy.parse(POLICY, "p.yaml"), scenario())
    chains = nft.allow_chains(rs)
    web = policy.parse(POLICY, "p.yaml").container_rules[0].sources
    verdict = verdict_of(web, chains)
    assert verdict is not None and verdict != f"jump {nft.ALLOW_ANY}"
    name = verdict.removeprefix("jump ")
    table = nft.render(rs)
    chain = table[table.index(f"chain {name} {{"):]
    chain = chain[:chain.index("\t}")]
    assert "saddr @deny_" in chain and chain.index("drop") < chain.index("accept")
