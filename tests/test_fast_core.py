"""The pieces that keep dockfence fast at any size: integer addresses, list files, the digests
a table is stamped with, the record of the last apply and the stdlib Docker client. Pure, or
against a fake daemon on a unix socket."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockfence import addresses, dockerapi, listfiles, policy, record
from dockfence.compile import compile_policy
from dockfence.errors import PolicyError
from dockfence.inventory import Binding, Container, Inventory
from dockfence.model import Ruleset, Sources
from dockfence.plan import diff
from dockfence.stamp import Stamp, inventory_digest

from helpers import POLICY
from helpers import scenario as inventory

SPELLINGS = ["198.51.100.7", "198.51.100.0/24", "0.0.0.0/0", "2001:db8::/32", "2001:DB8::1",
             "::ffff:198.51.100.7", "::1", "::", "::/0", "1:0:0:2::1", "2001:db8:0:0:1::/80",
             "198.51.100.0/255.255.255.0", "203.0.113.0/024"]
BAD = ["198.51.100.1/24", "2001:db8::1/32", "198.51.100.256", "01.2.3.4", "1.2.3", "2001:db8::g",
       "198.51.100.0/33", "2001:db8::/129", "198.51.100.0/", "/24", "", " 198.51.100.7",
       "198.51.100.0/2x", "1.2.3.4/٣"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_fast_parse_agrees_with_ipaddress(text: str) -> None:
    try:
        want = ipaddress.ip_network(text, strict=True)
    except ValueError:
        with pytest.raises(ValueError):
            addresses.parse(text)
        return
    version, b = addresses.parse(text)
    assert addresses.to_network(version, b) == want
    assert addresses.show(version, b) == (str(want.network_address)
                                          if want.prefixlen == want.max_prefixlen else str(want))


@pytest.mark.parametrize("text", BAD)
def test_fast_parse_refuses_what_ipaddress_refuses_with_its_words(text: str) -> None:
    with pytest.raises(ValueError) as fast:
        addresses.parse(text)
    with pytest.raises(ValueError) as slow:
        addresses.parse_network(text)
    assert str(fast.value) == str(slow.value)


def test_scope_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="scope id"):
        addresses.parse("fe80::1%eth0")


@pytest.mark.parametrize("seed", range(5))
def test_sources_admit_exactly_their_networks(seed: int) -> None:
    rng = random.Random(seed)
    nets = [ipaddress.ip_network((rng.getrandbits(32) >> (32 - p) << (32 - p), p))
            for p in (rng.randint(8, 32) for _ in range(50))]
    s = Sources.of(nets)
    for _ in range(500):
        a = ipaddress.IPv4Address(rng.getrandbits(32))
        assert s.admits(a) == any(a in n for n in nets)
    for n in nets:
        assert s.admits(n.network_address) and s.admits(n.broadcast_address)


def test_list_file_comments_blank_lines_relative_path_and_label(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "geo.txt").write_text(
        "# offices\n\n203.0.113.0/28   # Berlin\n  2001:db8:1::/64\n198.51.100.7\n")
    text = POLICY.replace("lists:\n", "lists:\n  geo: {file: lists/geo.txt}\n").replace(
        'from: [office, 198.51.100.7]', 'from: [geo]')
    path = tmp_path / "p.yaml"
    path.write_text(text)
    p = policy.load(path)
    geo = p.container_rules[0].sources
    assert [str(n) for n in geo.networks] == ["198.51.100.7/32", "203.0.113.0/28",
                                              "2001:db8:1::/64"]
    shown = str(tmp_path / "lists" / "geo.txt")
    assert geo.names == (f"geo (file {shown})",) and shown in str(geo)
    assert [lf.shown for lf in p.list_files] == [shown]


def test_list_file_errors_name_file_line_and_value(tmp_path: Path) -> None:
    (tmp_path / "geo.txt").write_text("203.0.113.0/28\n\n# fine so far\n203.0.113.5/28\n")
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nlists:\n  geo:\n    file: geo.txt\n")
    with pytest.raises(PolicyError) as info:
        policy.load(path)
    assert (info.value.path, info.value.line, info.value.value) == (
        str(tmp_path / "geo.txt"), 4, "203.0.113.5/28")
    assert "host bits set" in str(info.value) and info.value.exit_code == 2


def test_missing_list_file_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nlists:\n  geo:\n    file: absent.txt\n")
    with pytest.raises(PolicyError) as info:
        policy.load(path)
    assert info.value.path == str(path) and info.value.line == 4
    assert "absent.txt" in str(info.value) and info.value.exit_code == 2


def test_policy_digest_covers_list_files_and_the_fast_path_agrees(tmp_path: Path) -> None:
    (tmp_path / "geo.txt").write_text("203.0.113.0/28\n")
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.replace("lists:\n", "lists:\n  geo: {file: geo.txt}\n"))
    first = policy.load(path).digest
    assert listfiles.inputs_digest(str(path)) == first
    (tmp_path / "geo.txt").write_text("203.0.113.0/29\n")
    assert listfiles.inputs_digest(str(path)) == policy.load(path).digest != first
    plain = tmp_path / "plain.yaml"
    plain.write_text(POLICY)
    assert listfiles.inputs_digest(str(plain)) == policy.load(plain).digest


def test_inventory_digest_ignores_what_the_rules_do_not_depend_on() -> None:
    inv = inventory()
    moved = Inventory(tuple(Container(c.name, "new-id", c.service, c.bindings,
                                      tuple(f"{a}0" for a in c.addresses), c.routed_addresses)
                            for c in reversed(inv.containers)), inv.bridges, "nftables")
    assert inventory_digest(moved) == inventory_digest(inv)
    c = inv.containers[0]
    published = Container(c.name, c.id, c.service,
                          (*c.bindings, Binding("tcp", "0.0.0.0", 9999, 80)), c.addresses)
    assert inventory_digest(Inventory((published, *inv.containers[1:]), inv.bridges)) \
        != inventory_digest(inv)


RECORDED = Stamp("a" * 32, "b" * 32)


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ruleset:
    """The example policy's ruleset, recorded under RECORDED in tmp_path."""
    monkeypatch.setattr(record, "DIRECTORY", tmp_path)
    rs = compile_policy(policy.parse(POLICY, "p.yaml"), inventory())
    record.save(RECORDED, rs)
    return rs


def test_record_round_trips_and_answers_only_for_its_stamp(recorded: Ruleset) -> None:
    back = record.ruleset(RECORDED)
    assert back == recorded and back.warnings == recorded.warnings
    assert [g.sources.names for g in back.container_gates] == \
        [g.sources.names for g in recorded.container_gates]
    assert record.warnings(RECORDED) == list(recorded.warnings)
    assert record.ruleset(Stamp("c" * 32, "b" * 32)) is None
    record.forget()
    assert record.warnings(RECORDED) is None


def test_a_record_with_a_torn_block_is_unknown(recorded: Ruleset, tmp_path: Path) -> None:
    path = next(tmp_path.iterdir())
    head, body = path.read_text().splitlines()
    doc = json.loads(body)
    listed = next(s for s in doc["sources"] if s["v4"])
    listed["v4"] = listed["v4"][:-2]  # one byte short of whole blocks
    path.write_text(head + "\n" + json.dumps(doc) + "\n")
    assert record.ruleset(RECORDED) is None  # the caller reads the kernel instead


def test_diff_of_big_lists_names_only_the_differences() -> None:
    big = [f"2001:db8:{i:x}::/48" for i in range(0, 40000, 2)]
    text = POLICY.replace("lists:\n", "lists:\n  big: [" + ", ".join(big) + "]\n").replace(
        'from: [office, 198.51.100.7]', 'from: [big]')
    before = compile_policy(policy.parse(text, "p.yaml"), inventory())
    after = compile_policy(policy.parse(text.replace("2001:db8:2::/48, ", ""), "p.yaml"),
                           inventory())
    changed = [c for c in diff(before, after) if c.kind == "change"]
    assert [(c.added, c.removed) for c in changed] == [([], ["2001:db8:2::/48"])]


# --- the Docker client against a fake daemon ---------------------------------------------------

@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A unix-socket HTTP/1.1 server with keep-alive: /_ping with API-Version, a JSON answer by
    Content-Length, a chunked one, a 404, and a chunked event stream."""
    path = str(tmp_path / "d.sock")
    seen: list[str] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def answer(conn: socket.socket) -> None:
        fh = conn.makefile("rb")
        while (line := fh.readline()):
            target = line.split()[1].decode()
            while fh.readline().strip():
                pass
            seen.append(target)
            if target == "/_ping":
                conn.sendall(b"HTTP/1.1 200 OK\r\nApi-Version: 1.47\r\nContent-Length: 2\r\n\r\nOK")
            elif target.startswith("/v1.47/info"):
                body = json.dumps({"FirewallBackend": {"Driver": "nftables"}}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            elif target.startswith("/v1.47/networks"):
                body = json.dumps([{"Id": "n1", "Driver": "bridge", "Options": {}}]).encode()
                half = len(body) // 2
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                             % (half, body[:half], len(body) - half, body[half:]))
            elif target.startswith("/v1.47/events"):
                events = b'{"Type":"container","Action":"start","Actor":{"Attributes":' \
                         b'{"name":"web"}}}\n{"Type":"container","Action":"exec_start: sh"}\n'
                conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n%s\r\n0\r\n\r\n" % (len(events), events))
            else:
                body = b'{"message":"No such container"}'
                conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
        conn.close()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"unix://{path}", seen
    finally:
        srv.close()
        os.unlink(path)


def test_docker_client_negotiates_and_reads_both_encodings(fake_daemon) -> None:
    host, seen = fake_daemon
    with dockerapi.Client(host) as c:
        assert c.get("/info")["FirewallBackend"]["Driver"] == "nftables"
        assert c.get("/networks")[0]["Id"] == "n1"
        with pytest.raises(dockerapi.NotFound, match="No such container"):
            c.get("/containers/x/json")
        events = list(c.stream("/events", {"since": "1", "filters": '{"type":["container"]}'}))
    assert [e["Action"] for e in events] == ["start", "exec_start: sh"]
    assert seen[0] == "/_ping" and all(s.startswith("/v1.47/") for s in seen[1:])


def test_docker_host_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "ssh://user@example")
    with pytest.raises(dockerapi.DockerError, match="unsupported DOCKER_HOST"):
        dockerapi.Client()
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(dockerapi.DockerError, match="cannot connect"):
        dockerapi.Client()


def test_listed_set_elements_in_every_shape_nft_prints() -> None:
    from dockfence.backends import nftables as nft

    elems = ["198.51.100.7", {"prefix": {"addr": "203.0.113.0", "len": 28}},
             {"elem": {"val": {"prefix": {"addr": "198.51.100.128", "len": 25}}}},
             {"range": ["203.0.113.16", "203.0.113.19"]}]
    blocks = nft._set_blocks(4, elems)
    assert sorted(str(addresses.to_network(4, b)) for b in blocks) == [
        "198.51.100.128/25", "198.51.100.7/32", "203.0.113.0/28", "203.0.113.16/30"]


def test_list_discovery_is_remembered_by_the_policy_text(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A no-op apply finds a policy's list files without a YAML parser when the same text was
    read before; another text is parsed afresh, and a damaged memo is only a miss."""
    monkeypatch.setattr(listfiles, "MEMO", tmp_path / "discovered.json")
    text = "version: 1\nlists:\n  geo: {file: geo.txt}\n  cdn: {url: 'https://x.example/l'}\n"
    want = [("geo", "file", "geo.txt"), ("cdn", "url", {"url": "https://x.example/l"})]
    listfiles._discover.cache_clear()
    assert listfiles.discover(text, "p.yaml") == want
    listfiles._discover.cache_clear()
    monkeypatch.setattr(listfiles, "_parse_lists", lambda _: pytest.fail("parsed again"))
    assert listfiles.discover(text, "p.yaml") == want
    listfiles._discover.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(listfiles, "MEMO", tmp_path / "discovered.json")
    other = text.replace("geo.txt", "geo2.txt")
    assert listfiles.discover(other, "p.yaml")[0][2] == "geo2.txt"  # type: ignore[index]
    (tmp_path / "discovered.json").write_text("{not json")
    listfiles._discover.cache_clear()
    assert listfiles.discover(text, "p.yaml")[0][2] == "geo.txt"  # type: ignore[index]
    listfiles._discover.cache_clear()
