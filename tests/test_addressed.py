"""Ports keyed on host address and port: two containers publish one port on two host addresses
with two allow-lists (issue 8, part 4). Pure, but for the kernel round trips in a throwaway
network namespace. The packets: tests/test_addressed_lab.py."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dockfence import counters, policy, record, status
from dockfence.backends import nftables as nft
from dockfence.compile import compile_policy
from dockfence.discovery import bindings_of
from dockfence.errors import OperationalError
from dockfence.explain import explain
from dockfence.incremental import closed_meanwhile, element_update
from dockfence.inventory import Binding, Container, Inventory
from dockfence.model import find_gate
from dockfence.plan import diff
from dockfence.stamp import Stamp, digest

REPO = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft"),
                                reason="needs root and nft for a throwaway network namespace")

POLICY = """\
version: 1
lists:
  office: [203.0.113.0/28, "2001:db8:1::/64"]
  partners: [198.51.100.0/24, "2001:db8:5::/64"]
containers:
  default: deny
  allow:
    - container: a
      port: 443
      from: office
    - container: b
      port: 443
      from: partners
    - container: d
      host_port: 8443
      from: partners
    - host_port: 8000-8100
      from: 198.51.100.7
"""
PARSED = policy.parse(POLICY, "p.yaml")
A4, B4, C4 = (ipaddress.ip_address(f"203.0.113.{i}") for i in (1, 2, 3))
A6, B6 = (ipaddress.ip_address(f"2001:db8::{i}") for i in (1, 2))
OFFICE4, OFFICE6 = ipaddress.ip_address("203.0.113.5"), ipaddress.ip_address("2001:db8:1::5")
PARTNER4, PARTNER6 = ipaddress.ip_address("198.51.100.9"), ipaddress.ip_address("2001:db8:5::9")


def web(name: str, *hosts: str, port: int = 443) -> Container:
    return Container(name, name * 4, None, tuple(Binding("tcp", h, port, 443) for h in hosts))


def inventory(*extra: Container) -> Inventory:
    """a and b on 443 of two host addresses, both families; c there too, named by no rule;
    d on every IPv6 address of 8443 and e on one IPv4 address of it; f on 8050 of one
    address, under a bare host-port rule."""
    return Inventory(containers=(
        web("a", "203.0.113.1", "2001:db8::1"),
        web("b", "203.0.113.2", "2001:db8::2"),
        web("c", "203.0.113.3"),
        web("d", "::", port=8443),
        web("e", "203.0.113.1", port=8443),
        web("f", "203.0.113.2", port=8050),
        *extra,
    ))


def rules(inv: Inventory | None = None):
    return compile_policy(PARSED, inv or inventory())


def test_each_address_has_its_own_gate() -> None:
    rs = rules()
    by_where = {(g.proto, g.where()): g for g in rs.container_gates}
    assert set(by_where) == {("tcp", w) for w in (
        "8000-8100", "8443", "203.0.113.1:443", "203.0.113.2:443", "203.0.113.3:443",
        "203.0.113.1:8443", "203.0.113.2:8050", "[2001:db8::1]:443", "[2001:db8::2]:443")}
    assert by_where[("tcp", "203.0.113.1:443")].sources.names == ("office",)
    assert by_where[("tcp", "[2001:db8::2]:443")].sources.names == ("partners",)
    # no rule names c: the default, on c's address only
    c = by_where[("tcp", "203.0.113.3:443")]
    assert c.sources.nobody and "containers.default" in c.origin
    # e on one IPv4 address of 8443 is not d's (every IPv6 address): the default decides
    assert by_where[("tcp", "203.0.113.1:8443")].sources.nobody
    assert by_where[("tcp", "8443")].sources.names == ("partners",)
    # a bare host-port rule applies to the port on every address, f's included
    f = by_where[("tcp", "203.0.113.2:8050")]
    assert f.sources.admits(ipaddress.ip_address("198.51.100.7")) and "p.yaml:17" in f.origin
    # no gate for 443 on the other addresses: nothing is published there
    assert find_gate(rs.container_gates, "tcp", 443) is None


def test_one_port_on_every_address_still_needs_one_allow_list() -> None:
    inv = Inventory(containers=(web("a", "0.0.0.0"), web("b", "::")))
    with pytest.raises(OperationalError, match=r"host port 443/tcp is published by a 443/tcp; "
                       r"b 443/tcp with different allow-lists.*own host address"):
        rules(inv)


@pytest.mark.parametrize("src, to, verdict, who", [
    (OFFICE4, A4, "allow", "a 443/tcp"),
    (OFFICE4, B4, "deny", "b 443/tcp"),
    (PARTNER4, A4, "deny", "a 443/tcp"),
    (PARTNER4, B4, "allow", "b 443/tcp"),
    (OFFICE6, A6, "allow", "a 443/tcp"),
    (OFFICE6, B6, "deny", "b 443/tcp"),
    (PARTNER6, A6, "deny", "a 443/tcp"),
    (PARTNER6, B6, "allow", "b 443/tcp"),
    (OFFICE4, C4, "deny", "c 443/tcp"),
])
def test_explain_names_the_container_that_decided(src, to, verdict, who) -> None:
    ex = explain(rules(), inventory(), src, 443, "tcp", to)
    assert ex.verdict == verdict
    assert ex.target == f"{who} (published on {to if to.version == 4 else f'[{to}]'}:443)"
    assert f"the gate of {who} on host address {to}" in ex.reason
    expected_line = {"a": "p.yaml:8", "b": "p.yaml:11", "c": "containers.default"}[who[0]]
    assert expected_line in ex.decided_by


def test_explain_without_an_address_gives_each_one() -> None:
    ex = explain(rules(), inventory(), OFFICE4, 443)
    assert ex.verdict == "depends"
    assert "on 203.0.113.1: allowed" in ex.reason and "on 203.0.113.2: not in" in ex.reason
    assert "--to ADDRESS" in ex.reason
    # the same verdict everywhere: said plainly
    assert explain(rules(), inventory(), ipaddress.ip_address("203.0.113.200"), 443).verdict \
        == "deny"
    # an IPv4 client never reaches an IPv6 host address: only its own family's gates count
    split = Inventory(containers=(web("a", "203.0.113.1"), web("b", "2001:db8::2")))
    assert explain(rules(split), split, OFFICE4, 443).verdict == "allow"
    assert explain(rules(split), split, PARTNER6, 443).verdict == "allow"
    assert explain(rules(split), split, OFFICE6, 443).verdict == "deny"
    # another host address where nothing is published on 443: not a container port
    none = explain(rules(), inventory(), OFFICE4, 443, "tcp", ipaddress.ip_address("203.0.113.9"))
    assert none.verdict is None


def test_render_keys_addressed_gates_on_the_original_destination() -> None:
    text = nft.render(rules())
    for line in (
        "ct status dnat meta l4proto tcp ct original ip daddr . ct original proto-dst "
        "vmap @addr_v4_tcp",
        "ct status dnat meta l4proto tcp ct original ip6 daddr . ct original proto-dst "
        "vmap @addr_v6_tcp",
        "ip daddr . tcp dport vmap @addr_v4_tcp",
        "ip6 daddr . udp dport vmap @addr_v6_udp",
        "type ipv6_addr . inet_service : verdict",
        "2001:db8::2 . 443 comment",
        "chain addr_v4_tcp_203_0_113_1_443 {",
        "counter addr_v6_tcp_2001_db8__2_443_refused {",
    ):
        assert line in text, line
    # before the port-only lookups, in both chains
    assert text.index("@addr_v4_tcp") < text.index("@tcp_ports")
    inp = text[text.index("chain input {"):]
    assert inp.index("@addr_v6_tcp") < inp.index("tcp dport vmap @tcp_ports")


def test_without_specific_host_addresses_the_table_is_as_before() -> None:
    rs = compile_policy(PARSED, Inventory(containers=(web("a", "0.0.0.0", "::"),)))
    assert not nft.has_addressed(rs) and "addr_v" not in nft.render(rs)


def test_loopback_bindings_get_no_addressed_gate() -> None:
    rs = compile_policy(PARSED, Inventory(containers=(web("a", "127.0.0.1", "::1"),)))
    assert [g.where() for g in rs.container_gates] == ["8000-8100"]


def test_record_round_trip_keeps_the_addresses() -> None:
    rs = rules()
    back = record.decode(json.loads(json.dumps(record.encode(rs))))
    assert back.container_gates == rs.container_gates
    assert nft.same_table(back, rs)
    moved = replace(rs, container_gates=tuple(
        replace(g, host=B4) if g.host == A4 and g.ports.first == 443 else
        replace(g, host=A4) if g.host == B4 and g.ports.first == 443 else g
        for g in rs.container_gates))
    assert not nft.same_table(moved, rs)  # the lists swapped addresses: a different table


def test_status_counts_each_address() -> None:
    rs = rules()
    inv = inventory()
    counts = {"addr_v4_tcp_203_0_113_2_443_allowed": 3, "addr_v4_tcp_203_0_113_2_443_refused": 4,
              "tcp_ports_8443_refused": 7}
    b = next(c for c in inv.containers if c.name == "b")
    row = status._port_status(b, b.bindings[0], rs, inv, counts)
    assert (row.host, row.who, row.allowed, row.refused) == ("203.0.113.2:443", "partners", 3, 4)
    assert "p.yaml:11" in row.decided_by
    d = next(c for c in inv.containers if c.name == "d")
    assert counters.container_gate(counts, find_gate(rs.container_gates, "tcp", 8443)).refused == 7
    assert status._port_status(d, d.bindings[0], rs, inv, counts).refused == 7


def test_plan_speaks_of_address_and_port() -> None:
    old = rules(Inventory(containers=(web("a", "203.0.113.1"),)))
    changes = diff(old, rules())
    added = {c.subject for c in changes if c.kind == "add"}
    assert "published port tcp 203.0.113.2:443 (b 443/tcp)" in added
    assert "published port tcp [2001:db8::1]:443 (a 443/tcp)" in added
    assert any(c.kind == "keep" and c.subject == "published port tcp 203.0.113.1:443 (a 443/tcp)"
               for c in changes)


def test_docker_host_addresses_are_parsed_and_canonical() -> None:
    got = bindings_of({"443/tcp": [{"HostIp": "2001:DB8:0::0001", "HostPort": "443"},
                                   {"HostIp": "fe80::1%eth0", "HostPort": "443"},
                                   {"HostIp": "203.0.113.1; flush ruleset", "HostPort": "443"}]})
    assert [b.host_ip for b in got] == ["2001:db8::1", "fe80::1"]
    assert str(got[1].host_address) == "fe80::1"


# --- watch: element updates, and what holds while it waits --------------------------------

def test_a_new_address_is_one_element_once_the_maps_exist() -> None:
    old = rules(Inventory(containers=(web("a", "203.0.113.1", "2001:db8::1"),)))
    new = rules(Inventory(containers=(web("a", "203.0.113.1", "2001:db8::1"),
                                      web("b", "203.0.113.2", "2001:db8::2"))))
    up = element_update(old, new, nft.allow_chains(old))
    assert up is not None
    assert sorted(op.set for op in up.ops) == ["addr_v4_tcp", "addr_v6_tcp"]
    assert "203.0.113.2 . 443" in up.text


def test_the_first_address_needs_a_full_table_and_is_closed_meanwhile() -> None:
    """Before any port is keyed on an address the maps are not in the table: watch falls back
    to a full apply. Until it lands, the old table decides: b's new address is a port no gate
    names, so containers.default (deny) refuses everyone, a's allow-list included."""
    before = Inventory(containers=(web("a", "0.0.0.0"),))
    after = Inventory(containers=(web("a", "0.0.0.0"), web("b", "2001:db8::2"),
                                  web("c", "203.0.113.2", port=444)))
    old, new = rules(before), rules(after)
    assert element_update(old, new, nft.allow_chains(old)) is None
    # c's new address: no gate for 444 in the old table, containers.default refuses
    assert closed_meanwhile(old, rules(Inventory(containers=(
        web("a", "0.0.0.0"), web("c", "203.0.113.2", port=444))))) is None
    assert "containers.default" in explain(old, after, OFFICE4, 444, "tcp", B4).decided_by
    # b's new IPv6 address: the old table's gate for 443 (a, on every IPv4 address) would
    # admit a's office there; watch closes it before the full apply
    assert explain(old, after, OFFICE6, 443, "tcp", B6).verdict == "allow"
    interim = closed_meanwhile(old, new)
    assert interim is not None
    up = element_update(old, interim, nft.allow_chains(old))
    assert up and [op.set for op in up.ops] == ["tcp_ports", "tcp_ports"]
    for src in (OFFICE6, PARTNER6, OFFICE4):
        assert explain(interim, after, src, 443, "tcp", B6).verdict == "deny"
    assert explain(interim, after, OFFICE4, 444, "tcp", B4).verdict == "deny"


def test_nothing_is_closed_when_the_old_gate_admits_no_more() -> None:
    """A bare host-port rule's list is part of every addressed gate on its ports: safe."""
    old = rules(Inventory(containers=(web("z", "0.0.0.0", port=80),)))
    new = rules(Inventory(containers=(web("z", "0.0.0.0", port=80),
                                      web("f", "203.0.113.2", port=8050))))
    assert element_update(old, new, nft.allow_chains(old)) is None
    assert closed_meanwhile(old, new) is None


def test_a_new_address_beside_a_keyed_one_is_closed_until_its_element_lands() -> None:
    old = rules(Inventory(containers=(web("a", "203.0.113.1"),)))
    after = Inventory(containers=(web("a", "203.0.113.1"), web("b", "203.0.113.2")))
    ex = explain(old, after, OFFICE4, 443, "tcp", B4)  # office is a's list, not b's
    assert ex.verdict == "deny" and "containers.default" in ex.decided_by


def test_the_last_address_gone_needs_a_full_table() -> None:
    old = rules(Inventory(containers=(web("a", "203.0.113.1"), web("z", "0.0.0.0", port=80))))
    new = rules(Inventory(containers=(web("z", "0.0.0.0", port=80),)))
    assert element_update(old, new, nft.allow_chains(old)) is None


# --- the kernel (throwaway namespace) -----------------------------------------------------

@needs_root
def test_kernel_round_trip() -> None:
    rs = rules()
    back = nft.parse_live({"nftables": json.loads(nft.canonical_of(nft.render(rs)))})
    assert sorted(map(repr, back.container_gates)) == sorted(map(repr, rs.container_gates))
    assert nft.same_table(back, rs)


SCRIPT = """
import sys, pickle, base64
from dockfence.backends import nftables as nft, netlink
nft.apply_text(nft.transaction(sys.argv[1]))
netlink.commit(nft.TABLE, pickle.loads(base64.b64decode(sys.argv[2])))
print(nft.canonical(nft.live_json()))
"""
# as restore does: the recorded table and the journal's updates in one transaction
REPLAY = """
import sys
from dockfence.backends import nftables as nft
nft.apply_text(nft.transaction(sys.argv[1] + sys.argv[2]))
print(nft.canonical(nft.live_json()))
"""


@needs_root
def test_kernel_takes_the_element_update() -> None:
    old = rules(Inventory(containers=(web("a", "203.0.113.1", "2001:db8::1"),
                                      web("c", "203.0.113.3"))))
    new = rules(Inventory(containers=(web("a", "203.0.113.1", "2001:db8::1"),
                                      web("b", "203.0.113.2", "2001:db8::2"))))
    stamp = Stamp(digest(b"p"), digest(b"i2"))
    up = element_update(old, new, nft.allow_chains(old), stamp)
    assert up
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", SCRIPT,
         nft.render(old, Stamp(digest(b"p"), digest(b"i1"))),
         base64.b64encode(pickle.dumps(up.ops)).decode()],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    got = nft.parse_live({"nftables": json.loads(proc.stdout)})
    assert nft.same_table(got, new)
    replay = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", REPLAY,
         nft.render(old, Stamp(digest(b"p"), digest(b"i1"))), up.text],
        capture_output=True, text=True, cwd=REPO)
    assert replay.returncode == 0, replay.stderr
    assert nft.same_table(nft.parse_live({"nftables": json.loads(replay.stdout)}), new)


def test_refusals_metrics_and_doctor_name_the_address() -> None:
    from dockfence.doctor import uncovered_ports
    from dockfence.metrics import labelled
    from dockfence.refusals import Describer

    rs, inv = rules(), inventory()
    stem = "addr_v6_tcp_2001_db8__2_443"
    assert Describer(rs, inv).names[f"{stem}_refused"] == (
        "b 443/tcp (host port [2001:db8::2]:443)", "p.yaml:11")
    assert labelled(rs)[f"{stem}_allowed"] == (("container", "b", "[2001:db8::2]:443", "tcp"),
                                               "allowed")
    assert uncovered_ports(inv, rs) == (8, ())
    # a binding on an address the live rules do not key (applied before it was published)
    late = inventory(web("g", "203.0.113.7", port=9443))
    assert uncovered_ports(late, rs) == (9, ("g 203.0.113.7:9443/tcp",))


@needs_root
def test_kernel_takes_the_closure_meanwhile() -> None:
    """What watch sends before a full apply it cannot avoid: the kernel refuses everyone on
    the port's every-address gate, and lists exactly the interim rules."""
    old = rules(Inventory(containers=(web("a", "0.0.0.0"),)))
    new = rules(Inventory(containers=(web("a", "0.0.0.0"), web("b", "2001:db8::2"))))
    interim = closed_meanwhile(old, new)
    assert interim is not None
    up = element_update(old, interim, nft.allow_chains(old))
    assert up
    proc = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", SCRIPT, nft.render(old),
         base64.b64encode(pickle.dumps(up.ops)).decode()],
        capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    got = nft.parse_live({"nftables": json.loads(proc.stdout)})
    assert nft.same_table(got, interim)
    assert find_gate(got.container_gates, "tcp", 443).sources.nobody
