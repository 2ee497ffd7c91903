"""The pure parts of the engine and discovery: plan diffs, conntrack revocation, lockout
protection, and reading Docker's JSON."""

from __future__ import annotations

from dockfence import policy
from dockfence.compile import compile_policy
from dockfence.discovery import bindings_of, bridge_name, container_of
from dockfence.engine import flows_to_cut, lockout, parse_conntrack
from dockfence.plan import diff

from helpers import POLICY, scenario

LOCAL = {"203.0.113.1", "2001:db8:1::1", "172.17.0.1", "127.0.0.1"}


def compiled(text: str = POLICY):
    return compile_policy(policy.parse(text, "p.yaml"), scenario())


def test_plan_against_nothing_adds_everything() -> None:
    changes = diff(None, compiled())
    assert changes and all(c.kind == "add" for c in changes)
    assert any("tcp 8081 (django 8080/tcp)" in c.subject and "203.0.113.0/28" in (c.after or "")
               for c in changes)


def test_plan_of_identical_rulesets_keeps_everything() -> None:
    assert all(c.kind == "keep" for c in diff(compiled(), compiled()))


def test_plan_shows_narrowed_list_as_change() -> None:
    narrower = POLICY.replace("from: [office, 198.51.100.7]", "from: [office]")
    changes = {c.subject: c for c in diff(compiled(), compiled(narrower)) if c.kind != "keep"}
    # the published port, and the direct route to django's address that follows it
    assert sorted(changes) == ["direct route to 172.17.0.2:8080/tcp (django 8080/tcp)",
                               "published port tcp 8081 (django 8080/tcp)"]
    change = changes["published port tcp 8081 (django 8080/tcp)"]
    assert change.kind == "change"
    assert "198.51.100.7" in (change.before or "") and "198.51.100.7" not in (change.after or "")


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
conntrack v1.4.7 (conntrack-tools): 6 flow entries have been shown.
"""


def test_conntrack_parsing_takes_the_original_direction() -> None:
    flows = parse_conntrack(CONNTRACK)
    assert len(flows) == 6
    assert (flows[0].src, flows[0].dst, flows[0].dport) == ("203.0.113.100", "203.0.113.1", 8081)


def test_revocation_cuts_only_newly_denied_flows_to_container_ports() -> None:
    flows = parse_conntrack(CONNTRACK)
    cut = flows_to_cut(flows, None, compiled(), scenario(), LOCAL)
    # denied now: 203.0.113.100 -> django, 2001:db8:9::10 -> postgres (via docker-proxy).
    # kept: the allowed office client, the SSH session (a host port, never cut), the flow a
    # container opened, and udp 5353 which the policy allows from anyone.
    assert [(f.src, f.dport) for f in cut] == [("203.0.113.100", 8081),
                                              ("2001:db8:9::10", 5432)]
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
