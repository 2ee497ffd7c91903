"""Ports published on 127.0.0.1 stay this host's: a neighbour that sends a SYN addressed to
127.0.0.1 (to the host's MAC address, on the shared link) never gets an answer once dockfence is
applied, whatever the policy, on Docker 20.10 and 28.5, with the userland proxy on and off.

The probe is crafted from the client namespace with scapy and sent on an AF_PACKET socket: no
kernel would send such a packet by itself. Baselines first, per version, measured before
anything is applied::

                                      20.10 proxy on/off     28.5 proxy on/off
    127.0.0.1:5432 (published on 127.0.0.1 only)  answers    dropped by Docker (raw table)
    127.0.0.1:8081 (published on every address)   answers    answers

So on 20.10 both probes prove dockfence's rule, and on 28.5 the second does (Docker 28 guards
only the ports it published on 127.0.0.1). To show that the loopback guard, not the rest of the
table, is what keeps them out, each policy is also checked with the guard chain deleted: the
probes the policy's other rules admit get in again. (IPv6: the kernel itself drops packets to
::1 that arrive on any interface but lo, before netfilter; the guard's ::1 rule is there for
completeness and is covered by the render tests only.)

What keeps working, proven under each policy: the host's own connections to 127.0.0.1 (through
docker-proxy, or with the proxy off through Docker's OUTPUT DNAT and route_localnet), and a
container reaching a published port through the host's address (hairpin).
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from dockfence.lab import CLIENT_V4, HOST_EXT0_V4, Lab, socket_in_netns

from conftest import FLAVOURS, LabFactory

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
ETH_P_ALL = 0x0003
WARM_PORT = 9000  # a listener in the client namespace, for the host's neighbour entry
VARIANTS = [(flavour, proxy) for flavour in FLAVOURS for proxy in ("proxy", "noproxy")]
PAGE = "hello from dockfence lab"
# loop: published on 127.0.0.1 only; web: on every address (Docker's DNAT takes 127.0.0.1 for
# a host address too)
PROBES = {"loop": 5432, "web": 8081}
POLICIES = {
    "allow": "version: 1\ncontainers:\n  default: allow\n",
    # deny by default, web open to anyone: without the guard its 127.0.0.1 probe gets in
    "deny": "version: 1\ncontainers:\n  default: deny\n  allow:\n"
            "    - container: web\n      port: 8080/tcp\n      from: any\n",
}


@dataclass
class Env:
    lab: Lab
    docker28: bool
    proxy: bool
    host_mac: str
    policies: dict[str, str]
    baseline: dict[str, str | None]


def dockfence(lab: Lab, *args: str) -> Any:
    """The real CLI on the sandboxed host, from this checkout."""
    return lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False,
                         env={"PYTHONPATH": str(REPO), "SSH_CONNECTION": "", "COLUMNS": "200",
                              "DOCKFENCE_STATE_DIR": str(lab.base / "state")},
                         timeout=120)


def warm_neighbours(lab: Lab) -> None:
    """An ordinary connection from the host to the client: the host knows the client's MAC,
    or an answer to the crafted SYN would wait for neighbour resolution and never leave."""
    assert lab.probe_many([(lab.host_ns, HOST_EXT0_V4, CLIENT_V4, WARM_PORT, "tcp", 3.0)],
                          expect=[True]) == [True]


def crafted_syn(env: Env, port: int, timeout: float = 1.0) -> str | None:
    """From the client namespace, a TCP SYN from CLIENT_V4 to 127.0.0.1:port, sent to the
    host's MAC address on the shared link. Returns the TCP flags of the answer ("SA" for a
    SYN-ACK, "RA" for a reset) or None when nothing answers within timeout."""
    sock = socket_in_netns(env.lab.client_ns, socket.AF_PACKET, socket.SOCK_RAW)
    sport = random.randint(20000, 60000)
    frame = bytes(Ether(dst=env.host_mac) / IP(src=CLIENT_V4, dst="127.0.0.1")
                  / TCP(sport=sport, dport=port, flags="S", seq=random.randint(1, 2**31)))
    try:
        sock.bind(("eth0", ETH_P_ALL))
        deadline, resend = time.monotonic() + timeout, 0.0
        while (left := deadline - time.monotonic()) > 0:
            if time.monotonic() >= resend:  # a few tries, as a kernel would retransmit
                sock.send(frame)
                resend = time.monotonic() + 0.3
            sock.settimeout(min(left, 0.1))
            try:
                pkt = Ether(sock.recv(65535))
            except TimeoutError:
                continue
            if TCP in pkt and pkt[TCP].dport == sport and pkt[TCP].sport == port:
                return str(pkt[TCP].flags)
        return None
    finally:
        sock.close()


def crafted(env: Env, answered: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Every probe at once (each filters its own answers by source port). The probes named in
    `answered` are expected to be answered: unanswered, they are tried again with a longer
    timeout (a loaded machine is not a verdict); the others get one honest attempt."""
    warm_neighbours(env.lab)
    with ThreadPoolExecutor(len(PROBES)) as pool:
        got = dict(zip(PROBES, pool.map(lambda p: crafted_syn(env, p), PROBES.values()),
                       strict=True))
        for _ in range(2):
            again = [n for n in answered if got[n] is None]
            if not again:
                break
            got.update(zip(again, pool.map(lambda n: crafted_syn(env, PROBES[n], 5.0), again),
                           strict=True))
    return got


def _exec(lab: Lab, container: str, script: str) -> str:
    return str(lab.docker("exec", container, "sh", "-c", script, check=False, timeout=30).stdout)


def what_keeps_working(env: Env) -> dict[str, bool]:
    """The host's own loopback connections and a container's hairpin through the host."""
    lab, h = env.lab, env.lab.host_ns
    own = {f"host -> 127.0.0.1:{p} ({name})": (h, "127.0.0.1", "127.0.0.1", p, "tcp", 3.0)
           for name, p in PROBES.items()}
    got = dict(zip(own, lab.probe_many(list(own.values()), expect=[True] * len(own)),
                   strict=True))
    get = f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 3 {HOST_EXT0_V4} 8081'
    for container in ("loop", "web"):  # another container, and web reaching itself
        got[f"{container} -> {HOST_EXT0_V4}:8081 (hairpin)"] = PAGE in _exec(lab, container, get)
    return got


@pytest.fixture(scope="module", params=VARIANTS, ids=[f"{f}-{p}" for f, p in VARIANTS])
def env(request: pytest.FixtureRequest, lab_factory: LabFactory,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    flavour, proxy = request.param
    lab = lab_factory(flavour, dockerd_args=() if proxy == "proxy" else
                      ("--userland-proxy=false",))
    try:  # one variant's lab at a time: stopped before the next one starts
        lab.run_container("loop", ["127.0.0.1:5432:8080"], lab.tcp_server_cmd(8080))
        lab.run_container("web", ["8081:8080"], lab.tcp_server_cmd(8080))
        lab.listen(lab.client_ns, WARM_PORT)
        mac = json.loads(lab.host_exec("ip", "-j", "link", "show", "ext0").stdout)[0]["address"]
        directory = tmp_path_factory.mktemp(f"loopback-{lab.name}")
        paths = {}
        for name, text in POLICIES.items():
            paths[name] = str(directory / f"{name}.yaml")
            Path(paths[name]).write_text(text)
        e = Env(lab, flavour == "docker28", proxy == "proxy", mac, paths, {})
        deadline = time.monotonic() + 60
        while not all(what_keeps_working(e).values()):  # the servers are up
            assert time.monotonic() < deadline, what_keeps_working(e)
        # answered without dockfence: web everywhere, loop unless Docker 28 drops it itself
        e.baseline = crafted(e, answered=("web",) if e.docker28 else ("loop", "web"))
        yield e
    finally:
        lab.stop()


def test_baseline_without_dockfence(env: Env) -> None:
    """What a neighbour's crafted SYN to 127.0.0.1 gets without dockfence, per version."""
    assert env.baseline["web"] == "SA", env.baseline  # every version DNATs it
    if env.docker28:
        assert env.baseline["loop"] is None, "Docker 28 drops it in its raw table"
    else:
        assert env.baseline["loop"] == "SA", "Docker 20.10 DNATs it: moby#45610"
    st = json.loads(dockfence(env.lab, "status", "--json").stdout)
    (loop,) = [p for p in st["ports"] if p["container"] == "loop"]
    if env.docker28:
        assert (loop["who"], loop["decided_by"]) == ("this host only (loopback)", "Docker")
    else:
        assert "neighbours" in loop["who"] and "moby#45610" in loop["warning"], loop


@pytest.mark.parametrize("policy", list(POLICIES))
def test_loopback_destination_never_answers(env: Env, policy: str) -> None:
    proc = dockfence(env.lab, "apply", "--policy", env.policies[policy])
    assert proc.returncode == 0, proc.stderr
    with ThreadPoolExecutor(2) as pool:  # what the CLI says, while the packets are tried
        status = pool.submit(dockfence, env.lab, "status", "--json")
        explained = pool.submit(dockfence, env.lab, "explain", "--json", "--policy",
                                env.policies[policy], "203.0.113.20", "5432", "--to",
                                "127.0.0.1")
        assert crafted(env) == dict.fromkeys(PROBES), f"{policy}: crafted SYN answered"
        for _ in range(3):  # all expected to work: a loaded machine gets another try
            kept = what_keeps_working(env)
            if all(kept.values()):
                break
        assert all(kept.values()), kept
    st = json.loads(status.result().stdout)
    (loop,) = [p for p in st["ports"] if p["container"] == "loop"]
    assert (loop["who"], loop["decided_by"], loop["warning"]) == (
        "this host only (loopback)", "dockfence: loopback addresses from outside", None)
    ex = json.loads(explained.result().stdout)
    assert (ex["verdict"], ex["in_force"]) == ("deny", True), ex
    assert ex["target"] == "loop 8080/tcp (published on 127.0.0.1:5432)"

    # The pair: the same table without its guard lets in what the policy's other rules admit
    # (Docker 28 keeps dropping the loopback-only port itself).
    env.lab.host_exec("nft", "delete", "chain", "inet", "dockfence", "loopback_guard")
    try:
        with ThreadPoolExecutor(1) as pool:
            planned = pool.submit(dockfence, env.lab, "plan", "--json", "--policy",
                                  env.policies[policy])
            loop_gets_in = policy == "allow" and not env.docker28
            answered = ("loop", "web") if loop_gets_in else ("web",)
            assert crafted(env, answered) == {"loop": "SA" if loop_gets_in else None,
                                              "web": "SA"}
        (change,) = [c for c in json.loads(planned.result().stdout)["changes"]
                     if c["kind"] != "keep"]
        assert (change["subject"], change["before"], change["after"]) == (
            "loopback addresses from outside", "not dropped", "dropped"), change
    finally:
        # --full: apply alone trusts the table's stamp, which a hand edit does not change
        proc = dockfence(env.lab, "apply", "--full", "--policy", env.policies[policy])
    assert proc.returncode == 0, proc.stderr
    assert env.lab.host_exec("nft", "list", "chain", "inet", "dockfence", "loopback_guard",
                             check=False).returncode == 0, "apply did not restore the guard"
