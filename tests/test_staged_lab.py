"""Staged loads (dockfence.backends.staged) with real dockerd and real packets.

A table whose lists hold at least STAGE_MIN blocks is loaded in stages: its address sets are
declared under generation names (`allow_0_g1_v4`), filled over netlink, then one small
transaction switches to them; the table keeps its kernel handle. Here: a list file and an
`except` list file growing past the threshold, edited, and shrunk again; watch noticing a
staged apply it did not make; `log --follow` naming the new policy's line after one; watch
refreshing a big downloaded list in the staged sets element by element, and falling back to a
full apply when an interrupted load left a set behind.

Probes: office 203.0.113.10 / 2001:db8:1::10, stranger 203.0.113.100 / 2001:db8:9::10, to the
host's published ports over IPv4 (Docker's NAT) and IPv6 (docker-proxy). Every "refused" is
paired with a baseline: the same probe gets in without dockfence.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dockfence.backends import staged
from dockfence.lab import (
    CLIENT2_V4,
    CLIENT_V4,
    CLIENT_V4_ALT,
    CLIENT_V6,
    CLIENT_V6_ALT,
    HOST_EXT0_V4,
    HOST_EXT0_V6,
    HOST_EXT0_V6_ALT,
    NETNS_DIR,
    Lab,
)

from helpers import live_stamp, recorded_stamp, wait_for
from list_server import MANY, SWAPPED
from test_sources import PORT, Watching, start_server, stop_server

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
WEB, PUB, LATE = 8081, 8083, 8085
OFFICE = f"{CLIENT_V4}\n{CLIENT_V6}\n"
# The blocks either side of each probe's source: a staged set's intervals (written by dockfence
# over netlink, not by nft) must end exactly where they do
AROUND_OFFICE = b"203.0.113.8/31\n203.0.113.11\n2001:db8:1::e/127\n2001:db8:1::11\n"
AROUND_STRANGER = b"203.0.113.96/30\n203.0.113.101\n2001:db8:9::8/125\n2001:db8:9::11\n"
IN_OUT = [True, False, True, False]  # office in, stranger out, both families
OUT_IN = [False, True, False, True]
ALL_IN = [True] * 4

POLICY = """\
version: 1
lists:
  office: {file: LIST}
containers:
  default: deny
  allow:
    - {container: web, port: 8080, from: office}
    - {container: late, port: 8080, from: office}
"""
DOWNLOADED = f"""\
version: 1
lists:
  office: {{url: "http://{CLIENT2_V4}:{PORT}/list", refresh: 1h}}
containers:
  default: deny
  allow:
    - {{container: web, port: 8080, from: office}}
"""
EXCEPT = """\
version: 1
lists:
  office: {file: OFFICE}
  strangers: {file: STRANGERS}
containers:
  default: deny
  allow:
    - {container: web, port: 8080, from: office}
    - {container: pub, port: 8080, from: any, except: [strangers]}
"""
_SET = re.compile(r"^\s*set (\S+) \{", re.M)


def test_the_lists_are_big_enough_to_be_staged() -> None:
    """MANY alone is above the threshold and merges into no fewer blocks."""
    from dockfence import addresses, listfiles

    v4, v6 = listfiles.parse_at("MANY", MANY)
    merged = len(addresses.collapse(4, v4)) + len(addresses.collapse(6, v6))
    assert merged >= staged.STAGE_MIN + 2_000, merged


class Site:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state = lab.base / "state"

    def dockfence(self, *args: str) -> str:
        """Run dockfence on the lab's host; its stdout (stderr too when it fails)."""
        proc = self.dockfence_proc(*args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return str(proc.stdout)

    def dockfence_proc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False,
                                  env={"PYTHONPATH": str(REPO), "SSH_CONNECTION": "",
                                       "COLUMNS": "200", "DOCKFENCE_STATE_DIR": str(self.state)},
                                  timeout=300)

    def apply(self, policy: Path) -> str:
        """`dockfence apply`, tried again while watch holds the host lock."""
        out = ""

        def once() -> bool:
            nonlocal out
            proc = self.dockfence_proc("apply", "--policy", str(policy))
            out = proc.stdout + proc.stderr
            if proc.returncode == 0:
                return True
            assert "another dockfence" in out, out
            return False
        assert wait_for(once, 60, 0.2), out
        return out

    def unchanged(self, policy: Path) -> bool:
        """The live table is exactly what a fresh apply of `policy` would write."""
        plan = json.loads(self.dockfence("plan", "--json", "--policy", str(policy)))
        return plan["unchanged"] is True

    def sets(self) -> list[str]:
        """The names of the live table's sets (listed without their elements)."""
        listed = self.lab.host_exec("nft", "-t", "list", "table", "inet", "dockfence").stdout
        return sorted(_SET.findall(listed))

    def address_sets(self) -> list[str]:
        return [n for n in self.sets() if re.fullmatch(r"(allow|deny)_\d+(_g\d+)?_v[46]", n)]

    def generation(self) -> int:
        """The generation every address set of the live table is named for (a staged load's
        sets only, both families)."""
        names = self.address_sets()
        found = [m[1] for n in names
                 if (m := re.fullmatch(r"(?:allow|deny)_\d+_g(\d+)_v[46]", n))]
        # one generation, nothing unstaged
        assert len(set(found)) == 1 and len(found) == len(names) >= 2, names
        assert {n[-2:] for n in names} == {"v4", "v6"}, names
        return int(found.pop())

    def handle(self) -> int:
        listed = self.lab.host_exec("nft", "-j", "list", "tables", "inet").stdout
        return int(next(o["table"]["handle"] for o in json.loads(listed)["nftables"]
                        if o.get("table", {}).get("name") == "dockfence"))

    def probes(self, port: int) -> list[bool]:
        """office v4, stranger v4 (NAT), office v6, stranger v6 (docker-proxy) to `port`."""
        return self.lab.probe_many([(self.lab.client_ns, *p) for p in (
            (CLIENT_V4, HOST_EXT0_V4, port), (CLIENT_V4_ALT, HOST_EXT0_V4, port),
            (CLIENT_V6, HOST_EXT0_V6, port), (CLIENT_V6_ALT, HOST_EXT0_V6_ALT, port))],
            timeout=1.0)

    def see(self, port: int, want: list[bool]) -> list[bool]:
        """The probes to `port` once they give `want` (polled: a server starting, a retry of a
        lost SYN), or what they gave last."""
        return wait_for(lambda: self.probes(port) == want and want, 30) or self.probes(port)

    def baseline(self, port: int) -> None:
        """Without dockfence, everyone gets in (the strangers refused above too)."""
        self.dockfence("remove")
        assert self.see(port, ALL_IN) == ALL_IN


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Site]:
    lab.run_container("web", [f"{WEB}:8080"], lab.tcp_server_cmd(8080), restart="always")
    lab.run_container("pub", [f"{PUB}:8080"], lab.tcp_server_cmd(8080), restart="always")
    s = Site(lab)
    try:
        yield s
    finally:
        s.dockfence_proc("remove")


def policy_with(site: Site, name: str, entries: bytes) -> Path:
    """A policy whose `office` list is the file `name`.txt holding `entries`."""
    listed = site.lab.base / f"{name}.txt"
    listed.write_bytes(entries)
    policy = site.lab.base / f"{name}.yaml"
    policy.write_text(POLICY.replace("LIST", str(listed)))
    return policy


def status_of(site: Site, port: int) -> tuple[str, bool]:
    """What `status --json` says of `port` over IPv4: who may connect, and whether the office's
    IPv4 and IPv6 addresses are among the networks it lists."""
    ports = json.loads(site.dockfence("status", "--json"))["ports"]
    row = next(p for p in ports if p["host"] == f"0.0.0.0:{port}")
    networks = set(map(ipaddress.ip_network, row["sources"]))
    assert len(networks) >= len(MANY.splitlines()), len(networks)
    office = set(map(ipaddress.ip_network, OFFICE.split()))
    assert office <= networks or not office & networks, office & networks
    return row["who"], office <= networks


def counted(site: Site, port: int) -> tuple[int, int]:
    """The connections to `port` over IPv4 the live counters allowed and refused."""
    ports = json.loads(site.dockfence("status", "--json"))["ports"]
    row = next(p for p in ports if p["host"] == f"0.0.0.0:{port}")
    return row["allowed"], row["refused"]


def test_a_big_list_file_is_staged_and_enforced(site: Site) -> None:
    """A list file and an `except` list file growing past STAGE_MIN: staged (the table kept),
    then staged again with the office dropped, then shrunk: loaded whole again."""
    site.baseline(WEB)
    assert site.see(PUB, ALL_IN) == ALL_IN
    office, strangers = site.lab.base / "office.txt", site.lab.base / "strangers.txt"
    policy = site.lab.base / "except.yaml"
    policy.write_text(EXCEPT.replace("OFFICE", str(office)).replace("STRANGERS", str(strangers)))
    office.write_text(OFFICE)
    strangers.write_bytes(SWAPPED)

    site.apply(policy)  # small: loaded whole, render()'s names
    assert site.address_sets() == ["allow_0_v4", "allow_0_v6", "deny_0_v4", "deny_0_v6"]
    assert site.see(WEB, IN_OUT) == IN_OUT and site.see(PUB, IN_OUT) == IN_OUT
    handle = site.handle()

    # the office's neighbours are refused, the strangers' admitted: each probe's source sits
    # between two blocks of a staged set
    office.write_bytes(MANY + OFFICE.encode() + AROUND_STRANGER)
    strangers.write_bytes(MANY + SWAPPED + AROUND_OFFICE)
    site.apply(policy)
    # staged: every address set of generation 1, in the same table; none of render()'s left
    assert site.generation() == 1 and site.handle() == handle, site.sets()
    assert len(site.address_sets()) == 4, site.sets()
    assert site.see(WEB, IN_OUT) == IN_OUT and site.see(PUB, IN_OUT) == IN_OUT
    assert site.unchanged(policy)  # the generation names are not a difference
    assert status_of(site, WEB) == (f"office (file {office}) (12,069 networks)", True)
    explained = site.dockfence("explain", CLIENT_V4, str(WEB), "--policy", str(policy))
    assert explained.startswith("ALLOWED") and f"office (file {office})" in explained, explained
    explained = site.dockfence("explain", CLIENT_V6_ALT, str(PUB), "--policy", str(policy))
    assert explained.startswith("DENIED") and "any except strangers" in explained, explained

    # the office's IPv4 address banned, then the office leaves its list: staged again, the
    # next generation, the old sets gone, the ban carried into the new table
    site.dockfence("ban", CLIENT_V4)
    try:
        banned = [False, False, True, False]
        assert site.see(PUB, banned) == banned
        office.write_bytes(MANY + AROUND_STRANGER)
        site.apply(policy)
        assert site.generation() == 2 and site.handle() == handle, site.sets()
        assert len(site.address_sets()) == 4, site.sets()
        out = [False, False, False, False]
        assert site.see(WEB, out) == out and site.see(PUB, banned) == banned
    finally:
        site.dockfence_proc("unban", CLIENT_V4)
    assert site.see(PUB, IN_OUT) == IN_OUT
    assert "No changes" in site.apply(policy)
    assert site.unchanged(policy)
    assert recorded_stamp(site.lab) == live_stamp(site.lab)
    # read back whole rather than trusted by its stamp: the same rules
    assert "No changes" in site.dockfence("apply", "--full", "--policy", str(policy))
    doctor = site.dockfence_proc("doctor", "--policy", str(policy))
    assert "ok      table: applied and matches" in doctor.stdout, doctor.stdout
    explained = site.dockfence("explain", CLIENT_V6, str(WEB), "--policy", str(policy))
    assert explained.startswith("DENIED"), explained
    assert f"not in the allow-list: office (file {office})" in explained, explained
    assert status_of(site, WEB) == (f"office (file {office}) (12,067 networks)", False)

    # small again: the whole table loaded (a new one), render()'s names
    office.write_text(OFFICE)
    strangers.write_bytes(SWAPPED)
    site.apply(policy)
    assert site.address_sets() == ["allow_0_v4", "allow_0_v6", "deny_0_v4", "deny_0_v6"]
    assert site.handle() != handle
    assert site.see(WEB, IN_OUT) == IN_OUT and site.see(PUB, IN_OUT) == IN_OUT

    site.baseline(WEB)
    assert site.see(PUB, ALL_IN) == ALL_IN


def test_a_list_of_several_fill_batches(site: Site) -> None:
    """More blocks than two fill transactions hold (staged.FILL_BLOCKS): the office and the
    strangers' neighbours come last in address order, so in the last batch, and every block
    of every batch is in the kernel's set."""
    many = 2 * staged.FILL_BLOCKS + 1_000  # every other address of 2001:db8::/64
    filler = "".join(f"2001:db8::{i >> 15:x}:{(2 * i) & 0xFFFF:x}\n" for i in range(many))
    site.baseline(WEB)
    site.apply(policy_with(site, "batches", filler.encode() + OFFICE.encode() + AROUND_STRANGER))
    assert site.generation() == 1
    assert site.see(WEB, IN_OUT) == IN_OUT
    listed = site.lab.host_exec("nft", "-j", "list", "set", "inet", "dockfence",
                                "allow_0_g1_v6").stdout
    elements = next(o["set"] for o in json.loads(listed)["nftables"] if "set" in o)["elem"]
    assert len(elements) == many + 3, len(elements)  # the filler, the office, 2 neighbours
    site.baseline(WEB)


def test_watch_notices_a_staged_apply_it_did_not_make(site: Site) -> None:
    """A staged apply keeps the table's handle: watch tells it by the stamp, resyncs to its
    own policy, and gates a container started afterwards by it."""
    lab = site.lab
    site.dockfence("remove")
    watched = policy_with(site, "watched", MANY + OFFICE.encode())
    other = policy_with(site, "other", MANY + SWAPPED)  # the strangers instead of the office
    watch = Watching(site, watched)  # type: ignore[arg-type]
    try:
        assert watch.wait_log("start: applied"), watch.log()
        generation, handle = site.generation(), site.handle()
        assert site.see(WEB, IN_OUT) == IN_OUT
        seen = len(watch.log())

        site.apply(other)  # by hand, another policy: staged, the same table
        assert site.handle() == handle
        assert watch.wait_log("table inet dockfence was replaced by someone else: full resync: "
                              "applied", seen), watch.log()
        assert wait_for(lambda: site.unchanged(watched), 60), watch.log()
        assert site.handle() == handle and site.generation() == generation + 2, site.sets()
        assert site.see(WEB, IN_OUT) == IN_OUT

        lab.run_container("late", [f"{LATE}:8080"], lab.tcp_server_cmd(8080))
        assert site.see(LATE, IN_OUT) == IN_OUT, watch.log()
        assert wait_for(lambda: site.unchanged(watched), 60), watch.log()
    finally:
        watch.stop()
    assert watch.proc.returncode == 0, watch.log()
    try:
        site.baseline(LATE)
    finally:
        lab.docker("rm", "-f", "late")


def test_the_refusal_reader_follows_a_staged_apply(site: Site) -> None:
    """`log --follow` names the policy line that refused an attempt. A staged apply of another
    policy file keeps the table and its counters' names: the reader tells the new rules by the
    stamp, and names the new file's line (without that, only after a minute)."""
    lab = site.lab
    site.dockfence("remove")
    first = policy_with(site, "first", MANY + OFFICE.encode())
    second = policy_with(site, "second", MANY + OFFICE.encode())
    site.apply(first)
    generation, handle = site.generation(), site.handle()
    out = lab.base / f"follow-{time.monotonic_ns()}.log"
    with out.open("w") as sink:
        reader = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / lab.host_ns}", sys.executable, "-m", "dockfence",
             "log", "--follow"], stdout=sink, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "DOCKFENCE_STATE_DIR": str(site.state),
                 "DOCKER_HOST": lab.docker_host})

    def refused_by(policy: Path, after: int = 0) -> bool:
        """A stranger knocks (refused); the reader names `policy`'s line for web."""
        assert not lab.probe(lab.client_ns, CLIENT_V4_ALT, HOST_EXT0_V4, WEB, timeout=0.5)
        return f"-> web 8080/tcp (host port {WEB})  ({policy}:7)" in out.read_text()[after:]

    try:
        assert wait_for(lambda: refused_by(first), 30, 0.3), out.read_text()
        seen = len(out.read_text())
        site.apply(second)
        assert site.generation() == generation + 1 and site.handle() == handle, site.sets()
        assert wait_for(lambda: refused_by(second, seen), 25, 0.3), out.read_text()
    finally:
        reader.send_signal(signal.SIGTERM)  # by the pid we started
        reader.wait(20)
    site.baseline(WEB)  # the stranger refused above gets in without dockfence


@pytest.fixture(scope="module")
def served(site: Site) -> Iterator[Site]:
    """The list server in the lab's second client namespace (198.51.100.7)."""
    proc = start_server(site.lab.client2_ns, CLIENT2_V4)
    try:
        yield site
    finally:
        stop_server(proc)


def serve(site: Site, mode: str) -> None:
    """The list server answers `mode` at /list from now on (asked from the Docker host)."""
    site.lab.host_exec(sys.executable, "-c", "import urllib.request; urllib.request.urlopen("
                       f"'http://{CLIENT2_V4}:{PORT}/set/{mode}', timeout=5).read()")


def test_watch_refreshes_a_big_downloaded_list_in_its_staged_sets(served: Site) -> None:
    """A downloaded list held in staged sets (`allow_0_g2_v4`) changes upstream: watch updates
    the elements of those very sets (no new table, no new generation) and packets follow. A
    set an interrupted load left behind makes a refresh a full apply instead. `restore` (at
    boot) brings back the last full apply and watch's element updates since."""
    site = served
    site.dockfence("remove")
    policy = site.lab.base / "downloaded.yaml"
    policy.write_text(DOWNLOADED)
    serve(site, "many")
    site.apply(policy)
    assert site.generation() == 1
    assert site.see(WEB, IN_OUT) == IN_OUT
    allowed, refused = counted(site, WEB)
    assert allowed > 0 and refused > 0, (allowed, refused)
    watch = Watching(site, policy)  # type: ignore[arg-type]
    try:
        assert watch.wait_log("start:"), watch.log()
        # watch started on a table it did not write: it rewrites it once, after a quiet spell,
        # staged, its counters carried over
        assert watch.wait_log("get their own counters:"), watch.log()
        assert site.generation() == 2
        assert counted(site, WEB) == (allowed, refused)
        assert site.see(WEB, IN_OUT) == IN_OUT
        handle = site.handle()

        # the set an interrupted staged load left: which one is live cannot be told by its
        # name, so the refresh falls back to a full apply, which deletes it
        site.lab.host_exec("nft", "add set inet dockfence allow_0_g9_v4 "
                           "{ type ipv4_addr; flags interval; }")
        serve(site, "many-swapped")
        seen = len(watch.log())
        watch.proc.send_signal(signal.SIGHUP)
        assert watch.wait_log("resync after a failed update: applied", seen), watch.log()
        assert "allow_0_g9_v4: a staged load was interrupted; full resync" in watch.log()[seen:]
        assert site.generation() == 10 and site.handle() == handle, site.sets()
        assert len(site.address_sets()) == 2, site.sets()
        assert site.see(WEB, OUT_IN) == OUT_IN
        sets = site.address_sets()

        serve(site, "many")
        seen = len(watch.log())
        watch.proc.send_signal(signal.SIGHUP)
        assert watch.wait_log("downloaded lists refreshed: updated the elements of allow_", seen), \
            watch.log()
        line = next(x for x in watch.log()[seen:].splitlines() if "updated the elements" in x)
        assert "_v4" in line and "_v6" in line and "_g" not in line, line  # render()'s names
        assert site.see(WEB, IN_OUT) == IN_OUT
        # the staged sets themselves changed: same table, same names
        assert site.handle() == handle and site.address_sets() == sets, site.sets()
        assert "full resync" not in watch.log()[seen:], watch.log()
        assert site.unchanged(policy)
        assert recorded_stamp(site.lab) == live_stamp(site.lab), watch.log()
        assert "No changes" in site.apply(policy)
    finally:
        watch.stop()
    assert watch.proc.returncode == 0, watch.log()

    # the last full apply let the strangers in; the element update since, the office
    site.lab.host_exec("nft", "delete", "table", "inet", "dockfence")
    assert site.see(WEB, ALL_IN) == ALL_IN
    site.dockfence("restore")
    assert site.address_sets() == ["allow_0_v4", "allow_0_v6"]  # loaded whole
    assert site.see(WEB, IN_OUT) == IN_OUT
    assert site.unchanged(policy)
    site.baseline(WEB)
