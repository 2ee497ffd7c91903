"""Policy + inventory -> ruleset, and the verdicts that ruleset gives."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from dockfence import policy
from dockfence.compile import compile_policy
from dockfence.errors import OperationalError
from dockfence.explain import explain
from dockfence.inventory import Binding, Container, Inventory

from helpers import POLICY, container, scenario


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def rules(text: str = POLICY, inv: Inventory | None = None):
    inv = inv or scenario()
    return compile_policy(policy.parse(text, "p.yaml"), inv), inv


def gate(rs, proto: str, port: int):
    return next(g for g in rs.container_gates if g.proto == proto and port in g.ports)


def test_rules_key_on_host_port_so_shared_container_ports_stay_apart() -> None:
    rs, _ = rules()
    django, admin = gate(rs, "tcp", 8081), gate(rs, "tcp", 8082)
    assert django.label == "django 8080/tcp" and django.origin == "p.yaml:12"
    assert django.sources.admits(ip("203.0.113.1"))
    assert admin.label == "admin 8080/tcp" and admin.sources.nobody
    assert "containers.default" in admin.origin


def test_loopback_only_ports_are_not_gated_and_udp_is() -> None:
    rs, _ = rules()
    assert not any(9000 in g.ports for g in rs.container_gates)
    assert gate(rs, "udp", 5353).sources.any


def test_default_allow_opens_unnamed_ports() -> None:
    rs, _ = rules(
        POLICY.replace(
            "  default: deny\n  allow:\n    - container",
            "  default: allow\n  allow:\n    - container",
        )
    )
    assert gate(rs, "tcp", 5432).sources.any
    assert rs.unknown_published == "allow"
    assert not gate(rs, "tcp", 8081).sources.admits(ip("203.0.113.99"))


def test_rules_add_up_and_bare_host_port_ranges_gate_the_port_itself() -> None:
    text = POLICY + (
        "    - host_port: 8000-8100/tcp\n      from: [198.51.100.50]\n"
        "    - container: web\n      port: 8080\n      from: 198.51.100.8\n"
    )
    rs, _ = rules(text)
    django = gate(rs, "tcp", 8081)
    for addr in ("203.0.113.1", "198.51.100.7", "198.51.100.8", "198.51.100.50"):
        assert django.sources.admits(ip(addr)), addr
    # the range gate covers ports nobody publishes yet, split around 8081 and 8082
    spans = [(g.ports.first, g.ports.last) for g in rs.container_gates if g.proto == "tcp"]
    assert spans == [(5432, 5432), (8000, 8080), (8081, 8081), (8082, 8082), (8083, 8100),
                     (8443, 8443)]
    assert gate(rs, "tcp", 8050).sources.admits(ip("198.51.100.50"))
    assert gate(rs, "tcp", 8082).sources.admits(ip("198.51.100.50"))  # admin, via the range


def test_rule_selecting_nothing_is_a_warning() -> None:
    rs, _ = rules(POLICY + "    - container: ghost\n      port: 80\n      from: any\n")
    assert any("p.yaml:21" in w and "ghost" in w for w in rs.warnings)


def test_host_section_and_overlap_warning() -> None:
    text = POLICY.replace("    - port: 22/tcp\n", "    - port: 5432/tcp\n")
    rs, _ = rules(text)
    assert rs.host is not None and rs.host.default == "deny"
    assert any("also a published container port" in w for w in rs.warnings)


def test_no_host_section_leaves_host_alone() -> None:
    rs, inv = rules(
        POLICY.replace(
            "host:\n  default: deny\n  allow:\n    - port: 22/tcp\n      from: any\n", ""
        )
    )
    assert rs.host is None
    assert explain(rs, inv, ip("198.51.100.99"), 22).verdict is None


def test_one_host_port_two_host_addresses_two_allow_lists() -> None:
    """Keyed on host address and port when Docker published on one address (more in
    test_addressed.py); on every address of a family, one allow-list per port."""
    inv = Inventory(
        containers=(
            Container("a", "a", None, (Binding("tcp", "203.0.113.1", 8081, 80),)),
            Container("b", "b", None, (Binding("tcp", "198.51.100.1", 8081, 80),)),
        )
    )
    text = (
        "version: 1\ncontainers:\n  allow:\n    - container: a\n      port: 80\n      from: any\n"
    )
    rs = compile_policy(policy.parse(text, "p.yaml"), inv)
    assert [(str(g.host), g.sources.any) for g in rs.container_gates] == [
        ("198.51.100.1", False), ("203.0.113.1", True)]
    wildcard = Inventory(
        containers=(
            Container("a", "a", None, (Binding("tcp", "0.0.0.0", 8081, 80),)),
            Container("b", "b", None, (Binding("tcp", "::", 8081, 80),)),
        )
    )
    with pytest.raises(OperationalError, match="host port 8081/tcp"):
        compile_policy(policy.parse(text, "p.yaml"), wildcard)
    same = text + "    - container: b\n      port: 80\n      from: any\n"
    rs = compile_policy(policy.parse(same, "p.yaml"), wildcard)
    assert gate(rs, "tcp", 8081).sources.any


def test_interfaces_and_bridges() -> None:
    rs, _ = rules("version: 1\ninterfaces: [eth0, docker0]\n")
    assert rs.outside == ("docker0", "eth0")
    assert any("docker0 is a Docker bridge" in w for w in rs.warnings)


@pytest.mark.parametrize(
    "src, port, proto, to, verdict, decided",
    [
        ("203.0.113.5", 8081, "tcp", None, "allow", "p.yaml:12"),
        ("2001:db8:1::5", 8081, "tcp", None, "allow", "p.yaml:12"),
        ("203.0.113.20", 8081, "tcp", None, "deny", "p.yaml:12"),
        ("2001:db8:2::5", 8081, "tcp", None, "deny", "p.yaml:12"),
        ("203.0.113.5", 8082, "tcp", None, "deny", "containers.default"),
        ("203.0.113.5", 5432, "tcp", None, "deny", "containers.default"),
        ("203.0.113.5", 5353, "udp", None, "allow", "p.yaml:15"),
        ("203.0.113.5", 5353, "tcp", None, "deny", "host.default"),
        ("198.51.100.99", 22, "tcp", None, "allow", "p.yaml:7"),
        ("198.51.100.99", 23, "tcp", None, "deny", "host.default"),
        # direct routing: only to routed-mode addresses, with the port's allow-list
        ("203.0.113.5", 8080, "tcp", "172.17.0.2", "deny", "direct routing"),  # NAT network
        ("203.0.113.5", 8443, "tcp", "172.18.0.2", "deny", "direct routing"),  # api's v4: NAT
        ("2001:db8:1::5", 8443, "tcp", "2001:db8:78::2", "allow", "p.yaml:18"),
        ("2001:db8:9::5", 8443, "tcp", "2001:db8:78::2", "deny", "p.yaml:18"),
        ("2001:db8:1::5", 8080, "tcp", "2001:db8:78::2", "deny", "direct routing"),
        ("203.0.113.5", 8443, "tcp", None, "allow", "p.yaml:18"),  # api's NATed IPv4
        # a loopback destination from outside: dropped whatever the port and the allow-list
        ("203.0.113.20", 9000, "tcp", "127.0.0.1", "deny", "loopback addresses from outside"),
        ("203.0.113.5", 8081, "tcp", "127.0.0.1", "deny", "loopback addresses from outside"),
        ("203.0.113.5", 5353, "udp", "127.0.0.2", "deny", "loopback addresses from outside"),
        ("2001:db8:1::5", 8081, "tcp", "::1", "deny", "loopback addresses from outside"),
        # the same port on the host's address is the host's own
        ("203.0.113.20", 9000, "tcp", None, "deny", "host.default"),
    ],
)
def test_explain(
    src: str, port: int, proto: str, to: str | None, verdict: str, decided: str
) -> None:
    rs, inv = rules()
    ex = explain(rs, inv, ip(src), port, proto, ip(to) if to else None)  # type: ignore[arg-type]
    assert ex.verdict == verdict
    assert decided in ex.decided_by


def test_explain_loopback_destination_names_what_docker_would_forward_to() -> None:
    rs, inv = rules("version: 1\ncontainers:\n  default: allow\n")
    ex = explain(rs, inv, ip("203.0.113.20"), 9000, "tcp", ip("127.0.0.1"))
    assert (ex.verdict, ex.target) == ("deny", "local 9000/tcp (published on 127.0.0.1:9000)")
    assert "before 28.0" in ex.reason and "moby#45610" in ex.reason
    ex = explain(rs, inv, ip("203.0.113.20"), 8081, "tcp", ip("127.0.0.1"))
    assert ex.target == "django 8080/tcp (published on 0.0.0.0:8081)"
    # from outside to the host's address, the loopback-only port is not what answers
    ex = explain(rs, inv, ip("203.0.113.20"), 9000)
    assert ex.verdict is None
    assert ex.target == ("host port 9000/tcp (local 9000/tcp is published on loopback only: "
                         "packets from outside to loopback addresses are dropped)")


def test_explain_of_a_table_without_the_loopback_guard_tells_what_it_let_in() -> None:
    """A table made before the guard (read back from the kernel): Docker < 28 DNATs the
    packet to the loopback-published container, and containers.default decides."""
    rs, inv = rules("version: 1\ncontainers:\n  default: allow\n")
    old = replace(rs, loopback_guard=False)
    ex = explain(old, inv, ip("203.0.113.20"), 9000, "tcp", ip("127.0.0.1"))
    assert (ex.verdict, ex.target) == ("allow", "local 9000/tcp")
    assert "containers.default" in ex.decided_by


def test_same_inputs_same_ruleset() -> None:
    assert rules()[0] == rules()[0]


def test_container_restart_with_new_address_changes_nothing() -> None:
    rs1, _ = rules()
    moved = tuple(c if c.name != "django" else container(
        "django", ("tcp", 8081, 8080), service="web", addresses=("172.17.0.9",))
        for c in scenario().containers)
    rs2, _ = rules(inv=Inventory(containers=moved, bridges=scenario().bridges))
    assert rs1 == rs2


def test_direct_routes_only_on_routed_networks_with_the_rules_allow_list() -> None:
    rs, _ = rules()
    direct = {(str(d.address), d.proto, d.port): d for d in rs.direct}
    assert set(direct) == {("2001:db8:78::2", "tcp", 8443)}
    api = direct[("2001:db8:78::2", "tcp", 8443)]
    assert api.origin == "p.yaml:18" and api.label == "api 8443/tcp"
    assert api.sources == gate(rs, "tcp", 8443).sources
    # without a rule, a routed port gets the default: nobody, so no allowance at all
    rs, _ = rules(POLICY.replace("    - container: api\n", "    - container: apx\n"))
    assert rs.direct == ()
    allow_all = POLICY.replace("    - container: api\n", "    - container: apx\n").replace(
        "containers:\n  default: deny", "containers:\n  default: allow")
    rs, _ = rules(allow_all)
    assert [(str(d.address), d.sources.any) for d in rs.direct] == [("2001:db8:78::2", True)]
