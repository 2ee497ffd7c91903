"""The pure parts of the engine and discovery: plan diffs, conntrack revocation, lockout
protection, and reading Docker's JSON."""

from __future__ import annotations

from dataclasses import replace

from dockfence import policy
from dockfence.compile import compile_policy
from dockfence.discovery import (
    bindings_of,
    bridge_name,
    container_of,
    network_facts,
    routed_families,
)
from dockfence.engine import lockout
from dockfence.inventory import Binding, Inventory
from dockfence.plan import diff
from dockfence.revoke import flows_to_cut, parse_conntrack
from dockfence.status import _port_status, _stale_direct

from helpers import POLICY, scenario

LOCAL = {"203.0.113.1", "2001:db8:1::1", "172.17.0.1", "127.0.0.1"}


def compiled(text: str = POLICY):
    return compile_policy(policy.parse(text, "p.yaml"), scenario())


def test_plan_against_nothing_adds_everything() -> None:
    changes = diff(None, compiled())
    assert changes and all(c.kind == "add" for c in changes)
    assert any("tcp 8081 (django 8080/tcp)" in c.subject and c.after == "office, 198.51.100.7"
               for c in changes)


def test_plan_of_identical_rulesets_keeps_everything() -> None:
    assert all(c.kind == "keep" for c in diff(compiled(), compiled()))


def test_plan_shows_narrowed_list_as_change() -> None:
    narrower = POLICY.replace("from: [office, 198.51.100.7]", "from: [office]")
    changes = {c.subject: c for c in diff(compiled(), compiled(narrower)) if c.kind != "keep"}
    (subject, change), = changes.items()
    assert subject == "published port tcp 8081 (django 8080/tcp)" and change.kind == "change"
    assert (change.before, change.after) == ("office, 198.51.100.7", "office")
    assert (change.added, change.removed) == ([], ["198.51.100.7"])


def test_plan_removal() -> None:
    changes = diff(compiled(), None)
    assert all(c.kind == "remove" for c in changes)


CONNTRACK = """\
tcp      6 431999 ESTABLISHED src=203.0.113.100 dst=203.0.113.1 sport=40000 dport=8081 \
src=172.17.0.2 dst=203.0.113.100 sport=8080 dport=40000 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=203.0.113.5 dst=203.0.113.1 sport=40001 dport=8081 \
src=172.17.0.2 dst=203.0.113.5 sport=8080 dport=40001 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=198.51.100.99 dst=203.0.113.1 sport=40002 dport=22 \
src=203.0.113.1 dst=198.51.100.99 sport=22 dport=40002 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=172.17.0.2 dst=203.0.113.100 sport=40003 dport=5432 \
src=203.0.113.100 dst=203.0.113.1 sport=5432 dport=40003 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=2001:db8:9::10 dst=2001:db8:1::1 sport=40004 dport=5432 \
src=2001:db8:1::1 dst=2001:db8:9::10 sport=5432 dport=40004 [ASSURED] mark=0 use=1
udp      17 29 src=203.0.113.100 dst=203.0.113.1 sport=5000 dport=5353 \
src=172.17.0.5 dst=203.0.113.100 sport=53 dport=5000 mark=0 use=1
tcp      6 431999 ESTABLISHED src=2001:db8:9::10 dst=2001:db8:78::2 sport=40005 dport=8443 \
src=2001:db8:78::2 dst=2001:db8:9::10 sport=8443 dport=40005 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=2001:db8:1::10 dst=2001:db8:78::2 sport=40006 dport=8443 \
src=2001:db8:78::2 dst=2001:db8:1::10 sport=8443 dport=40006 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=203.0.113.5 dst=172.17.0.4 sport=40007 dport=5432 \
src=172.17.0.4 dst=203.0.113.5 sport=5432 dport=40007 [ASSURED] mark=0 use=1
tcp      6 100 TIME_WAIT src=203.0.113.100 dst=203.0.113.1 sport=40008 dport=8081 \
src=172.17.0.2 dst=203.0.113.100 sport=8080 dport=40008 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=203.0.113.100 dst=198.51.100.200 sport=40009 dport=80 \
src=198.51.100.200 dst=203.0.113.100 sport=80 dport=40009 [ASSURED] mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 6 flow entries have been shown.
"""


def test_conntrack_parsing_takes_the_original_direction() -> None:
    flows = parse_conntrack(CONNTRACK)
    assert len(flows) == 11
    assert (flows[0].src, flows[0].dst, flows[0].dport) == ("203.0.113.100", "203.0.113.1", 8081)
    assert [f.live for f in flows].count(False) == 1  # TIME_WAIT carries nothing


def test_revocation_cuts_only_newly_denied_flows_to_container_ports() -> None:
    flows = parse_conntrack(CONNTRACK)
    cut = flows_to_cut(flows, None, compiled(), scenario(), LOCAL)
    # denied now: 203.0.113.100 -> django, 2001:db8:9::10 -> postgres (via docker-proxy), the
    # stranger routed straight to api's routed address, anyone routed straight to postgres' NAT
    # address, and the closed TIME_WAIT entry. Kept: the allowed office clients (also api's
    # routed address), the SSH session (a host port, never cut), the flow a container opened,
    # udp 5353 (allowed from anyone) and traffic routed elsewhere.
    assert [(f.src, f.dst, f.dport) for f in cut] == [
        ("203.0.113.100", "203.0.113.1", 8081), ("2001:db8:9::10", "2001:db8:1::1", 5432),
        ("2001:db8:9::10", "2001:db8:78::2", 8443), ("203.0.113.5", "172.17.0.4", 5432),
        ("203.0.113.100", "203.0.113.1", 8081)]
    # applying the same rules again cuts nothing: those flows were already denied
    assert flows_to_cut(flows, compiled(), compiled(), scenario(), LOCAL) == []


def test_lockout_protection() -> None:
    locked = POLICY.replace("    - port: 22/tcp\n      from: any\n",
                            "    - port: 22/tcp\n      from: [office]\n")
    rs = compiled(locked)
    msg = lockout(rs, scenario(), "198.51.100.99 50000 203.0.113.1 22")
    assert msg and "lock you out" in msg
    assert lockout(rs, scenario(), "203.0.113.3 50000 203.0.113.1 22") is None
    assert lockout(compiled(), scenario(), "198.51.100.99 50000 203.0.113.1 22") is None
    assert lockout(rs, scenario(), None) is None


def test_docker_port_json() -> None:
    ports = {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8081"},
                          {"HostIp": "::", "HostPort": "8081"}],
             "53/udp": [{"HostIp": "", "HostPort": "5353"}],
             "9000/tcp": None, "7/sctp": [{"HostIp": "0.0.0.0", "HostPort": "7"}],
             "1/tcp": [{"HostIp": "not-an-ip", "HostPort": "1"}]}
    got = {(b.proto, b.host_ip, b.host_port, b.container_port) for b in bindings_of(ports)}
    assert got == {("tcp", "0.0.0.0", 8081, 8080), ("tcp", "::", 8081, 8080),
                   ("udp", "0.0.0.0", 5353, 53), ("sctp", "0.0.0.0", 7, 7)}
    assert bindings_of(None) == ()


def test_container_json_engine_29_shape_and_odd_labels() -> None:
    attrs = {"Id": "abc", "Name": "/web-1",
             "Config": {"Labels": {"com.docker.compose.service": "web\"; drop"}},
             "NetworkSettings": {"Ports": {}, "Networks": {
                 "a": {"IPAddress": "172.18.0.2", "GlobalIPv6Address": "2001:db8:ac::2"}}}}
    c = container_of(attrs)
    assert c is not None and c.name == "web-1" and c.service is None
    assert c.addresses == ("172.18.0.2", "2001:db8:ac::2")
    assert container_of({"Name": "/bad name"}) is None


def test_bridge_names() -> None:
    assert bridge_name({"Driver": "bridge", "Id": "0123456789abcdef",
                        "Options": {"com.docker.network.bridge.name": "docker0"}}) == "docker0"
    assert bridge_name({"Driver": "bridge", "Id": "0123456789abcdef"}) == "br-0123456789ab"
    assert bridge_name({"Driver": "host", "Id": "x"}) is None


def test_routed_mode_ports_and_networks() -> None:
    ports = {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": ""}, {"HostIp": "::", "HostPort": ""}]}
    assert [(b.host_ip, b.host_port, b.family) for b in bindings_of(ports)] == [
        ("0.0.0.0", None, 4), ("::", None, 6)]
    net = {"Id": "n1", "Driver": "bridge", "Options": {
        "com.docker.network.bridge.gateway_mode_ipv4": "nat",
        "com.docker.network.bridge.gateway_mode_ipv6": "routed"}}
    assert routed_families(net) == {6}
    net_settings = {"NetworkID": "n1", "IPAddress": "172.18.0.2",
                    "GlobalIPv6Address": "2001:db8:78::2"}
    attrs = {"Id": "c", "Name": "/api",
             "NetworkSettings": {"Ports": ports, "Networks": {"n": net_settings}}}
    bridges, routed = network_facts([net, {"Id": "h1", "Driver": "host"}])
    assert (bridges, routed) == (["br-n1"], {"n1": {6}, "h1": set()})
    c = container_of(attrs, routed)
    assert c is not None and c.routed_addresses == ("2001:db8:78::2",)


def test_stale_direct_allowances_are_reported() -> None:
    rs = compiled()
    assert _stale_direct(rs, scenario()) == []
    moved = Inventory(containers=tuple(
        replace(c, routed_addresses=("2001:db8:78::3",)) if c.name == "api" else c
        for c in scenario().containers))
    (warning,) = _stale_direct(rs, moved)
    assert "2001:db8:78::2 port 8443/tcp (api 8443/tcp)" in warning


def test_loopback_published_port_status_says_who_keeps_outside_packets_out() -> None:
    local = next(c for c in scenario().containers if c.name == "local")
    v4 = Binding("tcp", "127.0.0.1", 9000, 9000)
    v6 = Binding("tcp", "::1", 9000, 9000)
    old = Inventory(docker_version="20.10.24+dfsg1")
    new = Inventory(docker_version="28.5.2+dfsg4")
    guarded, unguarded = compiled(), replace(compiled(), loopback_guard=False)

    def status(b: Binding, live, inv: Inventory) -> tuple[str, str, bool]:
        s = _port_status(local, b, live, inv)
        return s.who, s.decided_by, s.warning is not None

    only = "this host only (loopback)"
    # Docker 20.10 DNATs packets from outside addressed to 127.0.0.1 (moby#45610)
    who, by, warned = status(v4, None, old)
    assert "neighbours" in who and by == "Docker 20.10.24+dfsg1" and warned
    assert status(v4, unguarded, old)[2]
    assert status(v4, guarded, old) == (only, "dockfence: loopback addresses from outside", False)
    assert status(v4, None, new) == (only, "Docker", False)
    assert status(v4, guarded, new)[1].startswith("dockfence")
    assert status(v4, None, Inventory())[2]  # version unknown: the worse is assumed
    assert status(v6, None, old) == (only, "the kernel", False)


def test_revocation_cuts_flows_that_came_in_through_a_loopback_destination() -> None:
    leaked = parse_conntrack(
        "tcp      6 431999 ESTABLISHED src=203.0.113.100 dst=127.0.0.1 sport=40010 dport=9000 "
        "src=172.17.0.9 dst=203.0.113.100 sport=9000 dport=40010 [ASSURED] mark=0 use=1\n"
        "tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40011 dport=9000 "
        "src=127.0.0.1 dst=127.0.0.1 sport=9000 dport=40011 [ASSURED] mark=0 use=1\n")
    # under containers.default: allow, a table without the guard let them in (Docker 20.10)
    rs = compiled("version: 1\ncontainers:\n  default: allow\n")
    before = replace(rs, loopback_guard=False)
    cut = flows_to_cut(leaked, before, rs, scenario(), LOCAL)
    assert [(f.src, f.dport) for f in cut] == [("203.0.113.100", 9000)]  # the host's own: kept
    assert flows_to_cut(leaked, None, rs, scenario(), LOCAL) == cut
    assert flows_to_cut(leaked, rs, rs, scenario(), LOCAL) == []  # already dropped
    # under deny, the old table dropped them already (the DNATed packet fell to the default)
    deny = compiled()
    assert flows_to_cut(leaked, replace(deny, loopback_guard=False), deny, scenario(),
                        LOCAL) == []
