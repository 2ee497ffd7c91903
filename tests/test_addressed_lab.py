"""Two containers, one port, two host addresses, two allow-lists: real packets (issue 8, part 4).

One lab per Docker version (20.10, 28.5). The Docker host gets a second address on its outside
interface in both families (203.0.113.2, 2001:db8:1::2). Containers::

    web-a  -p 203.0.113.1:8443:8080 -p [2001:db8:1::1]:8443:8080   network adnet (IPv6)
    web-b  -p 203.0.113.2:8443:8080 -p [2001:db8:1::2]:8443:8080   network adnet (IPv6)
    px-a   -p 203.0.113.1:8444:8080 -p [2001:db8:1::1]:8444:8080   default bridge (IPv4 only)
    px-b   -p 203.0.113.2:8444:8080 -p [2001:db8:1::2]:8444:8080   default bridge (IPv4 only)

web-a and px-a admit the office (203.0.113.10, 2001:db8:1::10), web-b and px-b the partner
(203.0.113.100, 2001:db8:9::10). Paths: IPv4 always through Docker's NAT (forward chain);
IPv6 to adnet through ip6 NAT on 28.5 and docker-proxy on 20.10 (no ip6tables); IPv6 to the
default bridge through docker-proxy on both (input chain). Every refusal is checked against a
baseline taken before dockfence was applied (the last test's, after `dockfence remove`). The last
test replaces them with `wide` (-p 0.0.0.0:8446:8080, office) and `narrow`
(-p [2001:db8:1::2]:8446:8080, partners) under watch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dockfence.lab import CLIENT_V4, CLIENT_V4_ALT, CLIENT_V6, CLIENT_V6_ALT, NETNS_DIR, Lab

from helpers import wait_for

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
A4, B4, A6, B6 = "203.0.113.1", "203.0.113.2", "2001:db8:1::1", "2001:db8:1::2"
ADNET = "2001:db8:7a::/64"
POLICY = """\
version: 1
lists:
  office: [203.0.113.0/28, "2001:db8:1::/64"]
  partners: [203.0.113.100, "2001:db8:9::10"]
containers:
  default: deny
  allow:
    - container: web-a
      port: 8080
      from: office
    - container: web-b
      port: 8080
      from: partners
    - container: px-a
      port: 8080
      from: office
    - container: px-b
      port: 8080
      from: partners
    - container: wide
      port: 8080
      from: office
    - container: narrow
      port: 8080
      from: partners
"""
# (source, destination, port) -> let in by POLICY
EXPECT = {
    (src, dst, port): (dst in (A4, A6)) == (src in (CLIENT_V4, CLIENT_V6))
    for port in (8443, 8444)
    for src, dsts in ((CLIENT_V4, (A4, B4)), (CLIENT_V4_ALT, (A4, B4)),
                      (CLIENT_V6, (A6, B6)), (CLIENT_V6_ALT, (A6, B6)))
    for dst in dsts
}
PROBES = list(EXPECT)


@dataclass
class Site:
    lab: Lab
    policy: Path
    docker28: bool
    baseline: dict[tuple[str, str, int], bool]


def dockfence(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False,
                         env={"PYTHONPATH": str(REPO), "COLUMNS": "200",
                              "DOCKFENCE_STATE_DIR": str(lab.base / "state")}, timeout=120)


def probe(lab: Lab, keys: list[tuple[str, str, int]],
          expect: list[bool] | None = None) -> dict[tuple[str, str, int], bool]:
    got = lab.probe_many([(lab.client_ns, src, dst, port) for src, dst, port in keys],
                         timeout=1.0, expect=expect)
    return dict(zip(keys, got, strict=True))


def run(lab: Lab, name: str, port: int, a_side: bool, network: str | None) -> None:
    v4, v6 = (A4, A6) if a_side else (B4, B6)
    lab.run_container(name, [f"{v4}:{port}:8080", f"[{v6}]:{port}:8080"],
                      lab.tcp_server_cmd(8080), network=network)


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Site]:
    # the second host address, both families (documentation prefixes, the lab's namespace)
    lab.host_exec("ip", "addr", "add", f"{B4}/24", "dev", "ext0")
    lab.host_exec("ip", "addr", "add", f"{B6}/64", "dev", "ext0", "nodad")
    lab.docker("network", "create", "--ipv6", "--subnet", ADNET, "adnet")
    run(lab, "web-a", 8443, True, "adnet")
    run(lab, "web-b", 8443, False, "adnet")
    run(lab, "px-a", 8444, True, None)
    run(lab, "px-b", 8444, False, None)
    policy = lab.base / "addressed.yaml"
    policy.write_text(POLICY)
    assert lab.host_exec("nft", "list", "table", "inet", "dockfence", check=False).returncode
    deadline = time.monotonic() + 60
    while True:  # the servers may still be starting
        baseline = probe(lab, PROBES)
        if all(baseline.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert all(baseline.values()), f"baseline without dockfence: {baseline}"
    try:
        yield Site(lab, policy, lab.docker_bin_dir is not None, baseline)
    finally:
        dockfence(lab, "remove")


def check(site: Site) -> None:
    got = probe(site.lab, PROBES, [EXPECT[k] for k in PROBES])
    wrong = {k: v for k, v in got.items() if v != EXPECT[k]}
    assert not wrong, f"differs from the policy: {wrong}"


def v6_path(lab: Lab, port: int) -> set[str]:
    """How the office's allowed IPv6 flows to `port` went: "nat" (the reply comes from the
    container) or "proxy" (docker-proxy on the host answers)."""
    out = lab.host_exec("conntrack", "-L", "-f", "ipv6", "-p", "tcp", "--orig-port-dst",
                        str(port), check=False).stdout
    paths = set()
    for line in out.splitlines():
        srcs, dsts = re.findall(r"\bsrc=(\S+)", line), re.findall(r"\bdst=(\S+)", line)
        if len(srcs) >= 2 and srcs[0] == CLIENT_V6:
            paths.add("proxy" if srcs[1] == dsts[0] else "nat")
    return paths


def test_each_address_keeps_its_own_allow_list(site: Site) -> None:
    proc = dockfence(site.lab, "apply", "--policy", str(site.policy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check(site)
    # both ways in were taken: docker-proxy (input) and, on 28.5, ip6 NAT (forward)
    assert v6_path(site.lab, 8444) == {"proxy"}
    assert v6_path(site.lab, 8443) == ({"nat"} if site.docker28 else {"proxy"})
    text = site.lab.host_exec("nft", "list", "table", "inet", "dockfence").stdout
    assert "ct original ip6 daddr . ct original proto-dst vmap @addr_v6_tcp" in text


def test_explain_status_and_plan_know_the_address(site: Site) -> None:
    lab, pol = site.lab, str(site.policy)
    for to, verdict, who in ((A4, "allow", "web-a 8080/tcp"), (B4, "deny", "web-b 8080/tcp"),
                             (B6, "deny", "web-b 8080/tcp"), (A6, "allow", "web-a 8080/tcp")):
        src = CLIENT_V4 if "." in to else CLIENT_V6
        proc = dockfence(lab, "explain", src, "8443", "--to", to, "--json", "--policy", pol)
        ex = json.loads(proc.stdout)
        assert (ex["verdict"], ex["in_force"]) == (verdict, True), ex
        assert ex["target"].startswith(who) and f"host address {to}" in ex["reason"], ex
    mixed = json.loads(dockfence(lab, "explain", CLIENT_V4, "8443", "--json", "--policy",
                                 pol).stdout)
    assert mixed["verdict"] == "depends", mixed
    plan = json.loads(dockfence(lab, "plan", "--json", "--policy", pol).stdout)
    assert plan["unchanged"] is True, plan  # the live table parses back to the same rules
    # one attempt from each side on web-b's address, so its counters have both to count
    knocks = [k for k in PROBES if k[1] == B4 and k[2] == 8443]
    assert probe(lab, knocks, [EXPECT[k] for k in knocks]) == {k: EXPECT[k] for k in knocks}
    rows = {(r["container"], r["host"]): r
            for r in json.loads(dockfence(lab, "status", "--json").stdout)["ports"]}
    b = rows[("web-b", f"{B4}:8443")]
    assert b["who"] == "partners" and b["allowed"] >= 1 and b["refused"] >= 1, b
    assert rows[("px-b", f"[{B6}]:8444")]["who"] == "partners"
    assert rows[("web-a", f"[{A6}]:8443")]["who"] == "office"


@contextmanager
def watching(site: Site, name: str) -> Iterator[Path]:
    """`dockfence watch` on the lab host; yields its log."""
    lab = site.lab
    log = lab.base / f"{name}.log"
    env = {**os.environ, "DOCKER_HOST": lab.docker_host, "PYTHONPATH": str(REPO),
           "DOCKFENCE_STATE_DIR": str(lab.base / "state")}
    proc = subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR / lab.host_ns}", sys.executable, "-m", "dockfence",
         "watch", "--policy", str(site.policy)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert wait_for(lambda: "start:" in log.read_text()), log.read_text()
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def addressed_keys(lab: Lab) -> set[str]:
    """The keys of the live table's addressed TCP maps: `203.0.113.1 . 8443`."""
    text = "".join(lab.host_exec("nft", "list", "map", "inet", "dockfence",
                                 f"addr_v{v}_tcp").stdout for v in (4, 6))
    return set(re.findall(r"[0-9a-f.:]+ \. \d+", text))


def test_watch_keeps_each_address_in_step(site: Site) -> None:
    """web-b and px-b go and come back under watch: element updates of the addressed maps. While
    they are away their keys leave the maps and web-a's and px-a's stay (nothing serves their
    addresses then, Docker unpublished them, so no packet could show a refusal); back, they
    have their own lists again."""
    lab = site.lab
    with watching(site, "watch") as log:
        if "start: no changes" in log.read_text():
            # such a start gives ports a former watch added their own counters once events are
            # quiet (watch.REBUILD_AFTER): let that full apply pass, or it can take in the removal
            assert wait_for(lambda: "get their own counters" in log.read_text()), \
                log.read_text()
        started = len(log.read_text())  # what watch says from here on
        lab.docker("rm", "-f", "web-b", "px-b")
        assert wait_for(lambda: log.read_text()[started:].count("updated") >= 1), \
            log.read_text()
        gone = {f"{b} . {port}" for b in (B4, B6) for port in (8443, 8444)}
        kept = {f"{a} . {port}" for a in (A4, A6) for port in (8443, 8444)}
        assert wait_for(lambda: (k := addressed_keys(lab)) >= kept and not k & gone), \
            (addressed_keys(lab), log.read_text())
        run(lab, "web-b", 8443, False, "adnet")
        run(lab, "px-b", 8444, False, None)
        keys = [k for k in PROBES if k[1] in (B4, B6)]
        assert wait_for(lambda: probe(lab, keys) == {k: EXPECT[k] for k in keys}), \
            log.read_text()
        # element updates, never a new table for the shape
        assert log.read_text()[started:].count("updated") >= 2 and \
            "shape" not in log.read_text(), log.read_text()
        check(site)


def test_watch_first_address_needs_a_full_apply_and_closes_meanwhile(site: Site) -> None:
    """The addressed containers go (the table loses its address maps: a full apply), `wide`
    publishes 8446 on every IPv4 address (office), then `narrow` the same port on one IPv6
    address (partners): the first addressed port again, a full apply, and until it lands the
    port's every-address gate would admit the office there, so watch closes it first. Then each
    has its list. Last, without dockfence, the same probes get in (the baseline)."""
    lab = site.lab
    wide = (CLIENT_V4, A4, 8446)
    office6, partner6 = (CLIENT_V6, B6, 8446), (CLIENT_V6_ALT, B6, 8446)
    want = {wide: True, office6: False, partner6: True}
    with watching(site, "watch-first") as log:
        lab.docker("rm", "-f", "web-a", "web-b", "px-a", "px-b")
        assert wait_for(lambda: "shape" in log.read_text()), log.read_text()
        lab.run_container("wide", ["0.0.0.0:8446:8080"], lab.tcp_server_cmd(8080))
        assert wait_for(lambda: probe(lab, [wide]) == {wide: True}), log.read_text()
        lab.run_container("narrow", [f"[{B6}]:8446:8080"], lab.tcp_server_cmd(8080))
        assert wait_for(lambda: "refused until the full apply lands" in log.read_text()), \
            log.read_text()
        assert wait_for(lambda: probe(lab, list(want)) == want), log.read_text()
    proc = dockfence(lab, "remove")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert wait_for(lambda: all(probe(lab, list(want)).values())), "baseline without dockfence"
