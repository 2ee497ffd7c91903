"""Container labels as allow rules, within `containers.labels.may_allow`. Pure."""

from __future__ import annotations

import ipaddress

import pytest

from dockfence import policy
from dockfence.compile import compile_policy
from dockfence.discovery import container_of
from dockfence.explain import explain
from dockfence.inventory import MAX_LABELS, Binding, Container, Inventory
from dockfence.labels import label_rules

POLICY = """\
version: 1
lists:
  office: [203.0.113.0/28, "2001:db8:1::/64"]
  vpn: [198.51.100.0/24]
  other: [198.51.100.128/25]
containers:
  default: deny
  labels:
    may_allow: [office, vpn]
  allow:
    - container: django
      port: 8080/tcp
      from: 203.0.113.200
"""


def web(labels: dict[str, str], name: str = "django") -> Container:
    return Container(name, "id", None, (Binding("tcp", "0.0.0.0", 8081, 8080),
                                        Binding("udp", "0.0.0.0", 5353, 53)),
                     labels=tuple(sorted(labels.items())))


def compiled(labels: dict[str, str], text: str = POLICY):
    inv = Inventory(containers=(web(labels),))
    return compile_policy(policy.parse(text, "p.yaml"), inv), inv


def admits(rs, inv, source: str, port: int = 8081, proto: str = "tcp") -> bool:
    return explain(rs, inv, ipaddress.ip_address(source), port, proto).verdict == "allow"  # type: ignore[arg-type]


def test_a_label_adds_to_the_policy_rules_and_says_so() -> None:
    rs, inv = compiled({"dockfence.allow.8080/tcp": "office, 198.51.100.7"})
    assert admits(rs, inv, "203.0.113.1") and admits(rs, inv, "198.51.100.7")
    assert admits(rs, inv, "203.0.113.200")  # the policy's own rule still counts
    assert not admits(rs, inv, "198.51.100.8")
    gate = rs.container_gates[0]
    assert "label on django (dockfence.allow.8080/tcp)" in gate.origin and "p.yaml:" in gate.origin
    assert not rs.warnings


def test_what_exceeds_may_allow_grants_nothing_of_that_part() -> None:
    rs, inv = compiled({"dockfence.allow.8080": "office, 203.0.113.128/25, any, other, nolist"})
    assert admits(rs, inv, "203.0.113.1")
    assert not admits(rs, inv, "203.0.113.129")
    assert not admits(rs, inv, "203.0.113.250")
    warnings = "\n".join(rs.warnings)
    assert "container django: label 'dockfence.allow.8080' = " in warnings
    assert "'203.0.113.128/25': more than may_allow" in warnings
    assert "'any': `any` is more than may_allow" in warnings
    assert "'nolist': unknown list name" in warnings
    # a list inside may_allow's networks is fine even when may_allow does not name it
    assert "'other'" not in warnings and admits(rs, inv, "198.51.100.200")


def test_labels_are_ignored_unless_the_policy_opts_in() -> None:
    text = POLICY.replace("  labels:\n    may_allow: [office, vpn]\n", "")
    rs, inv = compiled({"dockfence.allow.8080/tcp": "office"}, text)
    assert not admits(rs, inv, "203.0.113.1") and not rs.warnings


def test_may_allow_any_lets_labels_open_a_port_to_everyone() -> None:
    text = POLICY.replace("may_allow: [office, vpn]", "may_allow: any")
    rs, inv = compiled({"dockfence.allow.53/udp": "any"}, text)
    assert admits(rs, inv, "203.0.113.250", 5353, "udp")


@pytest.mark.parametrize("key, value, problem", [
    ("dockfence.allow.8080/tcp", 'office"; drop', "not a list name"),
    ("dockfence.allow.8080/tcp", "office}\n{", "not a list name"),
    ("dockfence.allow.8080/tcp", "\u043effice", "not a list name"),  # Cyrillic o
    ("dockfence.allow.8080/tcp", "203.0.113.5/24", "did you mean 203.0.113.0/24"),
    ("dockfence.allow.8080/tcp", "x" * 10_000, "longer than 4096"),
    ("dockfence.allow.8080/tcp", ",".join(["office"] * 300), "more than 256 entries"),
    ("dockfence.allow.80800/tcp", "office", "ports are 1 to 65535"),
    ("dockfence.allow.8080/sctp", "office", "a port is written"),
    ("dockfence.deny.8080", "office", "unknown dockfence label"),
])
def test_hostile_labels_grant_nothing_and_are_named(key: str, value: str, problem: str) -> None:
    rs, inv = compiled({key: value})
    assert not admits(rs, inv, "203.0.113.1")
    assert len(rs.warnings) == 1 and problem in rs.warnings[0], rs.warnings
    assert "container django" in rs.warnings[0] and len(rs.warnings[0]) < 400
    assert "\n" not in rs.warnings[0]


def test_thousands_of_labels_are_refused_as_a_whole_and_cost_little() -> None:
    attrs = {"Name": "/django", "Id": "id", "Config": {"Labels": {
        **{f"dockfence.allow.{p}": "office" for p in range(1, 5000)}, "other": "x"}},
        "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8081"}]}}}
    c = container_of(attrs)
    assert c is not None and len(c.labels) == MAX_LABELS + 1
    rules, warnings = label_rules(policy.parse(POLICY, "p.yaml"), c)
    assert rules == [] and "all ignored" in warnings[0]


def test_a_label_for_a_port_the_container_does_not_publish_is_reported() -> None:
    rs, _ = compiled({"dockfence.allow.9999/tcp": "office"})
    assert "does not publish 9999/tcp" in "\n".join(rs.warnings)


def test_label_origin_is_safe_in_the_rendered_table() -> None:
    from dockfence.backends import nftables as nft

    rs, _ = compiled({"dockfence.allow.8080/tcp": "office"})
    table = nft.render(rs)
    assert 'label on django (dockfence.allow.8080/tcp)' in table
