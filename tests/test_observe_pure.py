"""The pure parts of observing: NFLOG message parsing, flood summaries, describing refusals,
counters per gate, metric labels. The kernel side is proven in test_observe."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from dockfence import counters, nflog, refusals
from dockfence.backends import nftables as nft
from dockfence.compile import compile_policy
from dockfence.errors import UsageError
from dockfence.metrics import labelled, parse_address
from dockfence.model import Ruleset
from dockfence.policy import parse

from helpers import POLICY, scenario


def rules() -> Ruleset:
    return compile_policy(parse(POLICY, "/etc/dockfence/policy.yaml"), scenario())


def _nla(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def packet_message(prefix: str, payload: bytes) -> bytes:
    body = struct.pack("!BBH", socket.AF_INET, 0, nft.LOG_GROUP)
    body += _nla(10, prefix.encode() + b"\0") + _nla(9, payload)
    return struct.pack("=IHHII", 16 + len(body), (4 << 8) | 0, 0, 0, 0) + body


def ipv4_syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return ip + struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, 2, 1024, 0, 0)


def test_nflog_message_parsed() -> None:
    data = packet_message("dockfence tcp_ports_8081_refused",
                          ipv4_syn("203.0.113.100", "172.17.0.2", 40112, 8080))
    data += packet_message("dockfence host_default", ipv4_syn("198.51.100.9", "203.0.113.1",
                                                             5, 22))
    got = list(nflog.parse_message(data))
    assert [(p.prefix, p.proto, p.src, p.sport, p.dst, p.dport) for p in got] == [
        ("dockfence tcp_ports_8081_refused", "tcp", "203.0.113.100", 40112, "172.17.0.2", 8080),
        ("dockfence host_default", "tcp", "198.51.100.9", 5, "203.0.113.1", 22)]


def test_nflog_truncated_and_foreign_payloads() -> None:
    assert nflog.parse_payload(b"") is None
    assert nflog.parse_payload(b"\x45\x00") is None
    icmp = bytearray(ipv4_syn("203.0.113.1", "203.0.113.2", 1, 2))
    icmp[9] = 1
    assert nflog.parse_payload(bytes(icmp)) == ("1", "203.0.113.1", "203.0.113.2", None, None)


def test_refusals_described_in_the_policy_words() -> None:
    d = refusals.Describer(rules(), scenario())
    p = nflog.Packet(0.0, "dockfence tcp_ports_8081_refused", "tcp", "203.0.113.100", 40112,
                     "172.17.0.2", 8080)
    a = d.describe(p)
    assert a.asked == "django 8080/tcp (host port 8081)"
    assert a.refused_by == "/etc/dockfence/policy.yaml:12"
    assert "203.0.113.100:40112 -> django 8080/tcp (host port 8081)" in a.line()
    host = d.describe(nflog.Packet(0.0, "dockfence host_default", "tcp", "2001:db8:9::10", 5,
                                   "2001:db8:1::1", 2222))
    assert host.asked == "host port 2222/tcp"
    assert host.refused_by.startswith("host.default | /etc/dockfence/policy.yaml:")
    assert "[2001:db8:9::10]:5" in host.line()
    # a banned source refused in the port's own chain: the port, and the ban as the reason
    banned = d.describe(nflog.Packet(0.0, "dockfence tcp_ports_8081_refused banned", "tcp",
                                     "203.0.113.100", 40112, "172.17.0.2", 8080))
    assert banned.asked == a.asked and banned.refused_by == "banned (dockfence ban)"


def test_bans_are_logged_as_bans() -> None:
    """Every rule that refuses a banned source says so in its log prefix."""
    text = nft.render(rules())
    bans = [line for line in text.splitlines() if "saddr @bans_v" in line and "log" in line]
    prefixes = {line.split('log prefix "')[1].split('"')[0] for line in bans}
    assert bans and all(p.endswith(" banned") for p in prefixes), prefixes


def test_flood_summarised_with_bounded_memory() -> None:
    s = refusals.Summariser(now=0.0)
    shown = sum(s.offer(refusals.Attempt(0.0, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                                         1, "tcp", "x", "y"))
                for i in range(50_000))
    assert shown == refusals.LINES_PER_WINDOW
    assert len(s.sources) == refusals.SOURCES_CAP  # capped, whatever the flood
    assert s.tick(now=1.0) is None  # the window is not over
    summary = s.tick(now=10.0)
    assert summary is not None and summary.more == 50_000 - refusals.LINES_PER_WINDOW
    assert "and 49,980 more from at least 10,000 source(s) in the last 10 s" in summary.line()
    assert s.tick(now=20.0) is None  # a quiet window says nothing


def test_history_round_trip(tmp_path: Path) -> None:
    h = refusals.History(tmp_path / "r.jsonl")
    a = refusals.Attempt(1.0, "203.0.113.9", 1, "tcp", "web 80/tcp", "p.yaml:3")
    h.append(a)
    h.append(refusals.Summary(2.0, 5, 3, 10.0))
    assert refusals.read_history(tmp_path / "r.jsonl") == [a, refusals.Summary(2.0, 5, 3, 10.0)]


def test_counters_per_gate_and_defaults() -> None:
    rs = rules()
    gate = next(g for g in rs.container_gates if g.label.startswith("django"))
    counts = {"tcp_ports_8081_allowed": 3, "tcp_ports_8081_refused": 57, "host_default": 12,
              "containers_default": 4}
    assert counters.container_gate(counts, gate) == counters.Count(3, 57)
    d = counters.defaults(counts, rs)
    assert d["host.default"] == counters.Count(0, 12)
    assert d["containers.default"] == counters.Count(0, 4)


def test_gates_are_read_under_the_counters_the_table_declares() -> None:
    """status and the refusal log name each gate's counters as the table does: container, host
    and direct-routing gates alike."""
    rs = rules()
    assert rs.host is not None and rs.host.gates and rs.direct
    shared = {name for _, name in nft.allow_chains(rs)}
    gated = {line.split()[1] for line in nft.render(rs).splitlines()
             if line.startswith("\tcounter ") and line.split()[1].endswith(("_allowed", "_refused"))
             and line.split()[1].rsplit("_", 1)[0] not in shared}
    counts = {name: n for n, name in enumerate(sorted(gated), 1)}  # each value names a counter
    read = ([counters.container_gate(counts, g) for g in rs.container_gates]
            + [counters.host_gate(counts, g) for g in rs.host.gates]
            + [counters.direct_gate(counts, d) for d in rs.direct])
    assert sorted(v for c in read for v in (c.allowed, c.refused)) == sorted(counts.values())
    assert set(refusals.Describer(rs, scenario()).names) == {
        name for name in gated if name.endswith("_refused")}


def test_every_counter_the_table_declares_has_labels() -> None:
    rs = rules()
    table = nft.render(rs)
    declared = {line.split()[1] for line in table.splitlines()
                if line.startswith("\tcounter ")}
    assert declared == set(labelled(rs))


@pytest.mark.parametrize("text", ["9464", "localhost:9464", "127.0.0.1:0", "[::1]:99999",
                                  "127.0.0.1:x"])
def test_metrics_address_must_be_explicit(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address(text)


def test_metrics_address() -> None:
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)


def test_retransmissions_are_one_attempt() -> None:
    s = refusals.Summariser(now=0.0)
    a = refusals.Attempt(0.0, "203.0.113.9", 40000, "tcp", "web 80/tcp", "p.yaml:3")
    retry = refusals.Attempt(1.0, "203.0.113.9", 40000, "tcp", "web 80/tcp", "p.yaml:3")
    other = refusals.Attempt(1.0, "203.0.113.9", 40001, "tcp", "web 80/tcp", "p.yaml:3")
    assert [s.offer(a), s.offer(retry), s.offer(other)] == [True, False, True]
    for i in range(refusals.RECENT_CAP * 2):  # memory stays bounded
        s.offer(refusals.Attempt(2.0, "198.51.100.1", i, "tcp", "x", "y"))
    assert len(s.recent) == refusals.RECENT_CAP
