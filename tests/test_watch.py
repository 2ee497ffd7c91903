"""The live guard, with real packets: `dockfence watch` in step with Docker, and closed from boot.

One lab per Docker version; one watch process shared by the tests (they run in file order).
Every "refused" is paired with a baseline: at the end of the module dockfence is removed and the
same stranger probes get in.

Probes: office 203.0.113.10 / 2001:db8:1::10, stranger 203.0.113.100 / 2001:db8:9::10, to the
host's published ports over IPv4 (Docker's NAT) and IPv6 (docker-proxy: the containers have no
IPv6, like most).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dockfence.lab import (
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

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
POLICY = """\
version: 1
lists:
  office: [203.0.113.0/28, "2001:db8:1::/64"]
containers:
  default: deny
  allow:
    - container: late
      port: 8080/tcp
      from: [office]
    - container: boot
      port: 8080/tcp
      from: [office]
"""


def office_stranger(port: int) -> list[tuple[str, str, str, int]]:
    """office v4, stranger v4 (NAT), office v6, stranger v6 (docker-proxy)."""
    return [("c", CLIENT_V4, HOST_EXT0_V4, port), ("c", CLIENT_V4_ALT, HOST_EXT0_V4, port),
            ("c", CLIENT_V6, HOST_EXT0_V6, port), ("c", CLIENT_V6_ALT, HOST_EXT0_V6_ALT, port)]


def probes(lab: Lab, port: int) -> list[bool]:
    return lab.probe_many([(lab.client_ns, *p[1:]) for p in office_stranger(port)], timeout=1.0)


IN_OUT = [True, False, True, False]  # office in, stranger out, both families


@dataclass
class Watch:
    lab: Lab
    policy: Path
    proc: subprocess.Popen[str] | None = None
    notices: list[str] = field(default_factory=list)
    log_path: Path = Path()

    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.lab.docker_host, "PYTHONPATH": str(REPO),
                "DOCKFENCE_STATE_DIR": str(self.lab.base / "state"),
                "NOTIFY_SOCKET": str(self.lab.base / "notify.sock")}

    def start(self) -> None:
        self.log_path = self.lab.base / f"watch-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / self.lab.host_ns}", sys.executable, "-m",
             "dockfence", "watch", "--policy", str(self.policy)],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, text=True, env=self.env())
        assert wait_for(lambda: "start:" in self.log(), 90), self.log()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def dockfence(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return self.lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False,
                                  env={"PYTHONPATH": str(REPO), **(env or {})}, timeout=300)

    def in_step(self) -> bool:
        """The live table is exactly what a fresh apply would write now."""
        plan = self.dockfence("plan", "--json", "--policy", str(self.policy))
        return plan.returncode == 0 and json.loads(plan.stdout)["unchanged"] is True


def _listen_notify(path: Path, into: list[str]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))

    def read() -> None:
        with sock:
            while True:
                try:
                    into.append(sock.recv(4096).decode())
                except OSError:
                    return
    threading.Thread(target=read, daemon=True).start()
    return sock


@pytest.fixture(scope="module")
def watch(lab: Lab) -> Iterator[Watch]:
    policy = lab.base / "watch-policy.yaml"
    policy.write_text(POLICY)
    w = Watch(lab, policy)
    notify = _listen_notify(lab.base / "notify.sock", w.notices)
    try:
        w.start()
        yield w
    finally:
        w.stop()
        notify.close()
        w.dockfence("remove")


class Prober:
    """Strangers knocking all the time, on a background thread: how many got in."""

    def __init__(self, lab: Lab, targets: list[tuple[str, str, int]]) -> None:
        self.lab, self.targets = lab, targets
        self.attempts = self.successes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            got = self.lab.probe_many([(self.lab.client_ns, *t) for t in self.targets],
                                      timeout=0.3)
            self.attempts += len(got)
            self.successes += sum(got)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


# --- the tests -------------------------------------------------------------------------------

def test_ready_after_the_first_full_sync(watch: Watch) -> None:
    assert wait_for(lambda: any("READY=1" in n for n in watch.notices), 10), watch.notices
    assert watch.in_step()


def test_port_published_after_start_is_gated(watch: Watch) -> None:
    lab = watch.lab
    lab.run_container("late", ["9090:8080"], lab.tcp_server_cmd(8080))
    assert wait_for(lambda: probes(lab, 9090) == IN_OUT), probes(lab, 9090)
    # element updates, not a new table: the rule's allow-list had its chain from the start
    assert "updated" in watch.log() and watch.log().count(": applied") == 1, watch.log()
    # and once events are quiet, a full apply gives the port its own chain and counters
    assert wait_for(watch.in_step), watch.log()


def test_compose_sequence_never_lets_a_stranger_in(watch: Watch) -> None:
    """network create, then run --network NEW -p 9002:8080 for a port no rule names
    (containers.default: deny): a stranger knocking the whole time never gets in through NAT,
    and the docker-proxy path closes once watch has seen the event."""
    lab = watch.lab
    with Prober(lab, [(CLIENT_V4_ALT, HOST_EXT0_V4, 9002)]) as knock:
        lab.docker("network", "create", "composenet")
        lab.run_container("composed", ["9002:8080"], lab.tcp_server_cmd(8080),
                          network="composenet")
        assert wait_for(lambda: lab.probe(lab.host_ns, "0.0.0.0", "127.0.0.1", 9002))
        assert wait_for(lambda: probes(lab, 9002) == [False] * 4), probes(lab, 9002)
        assert wait_for(lambda: knock.attempts > 20)
    assert knock.successes == 0, f"{knock.successes} of {knock.attempts} got in"
    assert wait_for(watch.in_step)


def test_a_bridge_only_change_is_recorded_like_an_apply(watch: Watch) -> None:
    """A network created under watch, on a bridge no pattern covers: one element update of the
    bridge set. The table is still what render() writes, so watch records it as apply does:
    status and a no-op apply trust the new stamp instead of reading the table back."""
    lab = watch.lab
    assert wait_for(watch.in_step), watch.log()
    seen = len(watch.log())
    lab.docker("network", "create", "-o", "com.docker.network.bridge.name=dfonly0", "dfonly")
    try:
        assert wait_for(lambda: "updated" in watch.log()[seen:]), watch.log()[seen:]
        assert "dfonly0" in lab.host_exec("nft", "list", "set", "inet", "dockfence",
                                          "bridges").stdout
        assert wait_for(lambda: recorded_stamp(lab) == live_stamp(lab)), \
            (recorded_stamp(lab), live_stamp(lab), watch.log()[seen:])
        assert watch.in_step()
    finally:
        lab.docker("network", "rm", "dfonly")


def test_policy_edit_is_applied_and_a_bad_edit_keeps_the_rules(watch: Watch) -> None:
    lab = watch.lab
    policy = watch.policy
    policy.write_text(POLICY.replace('"2001:db8:1::/64"]', '"2001:db8:1::/64", "::/0"]', 1))
    assert wait_for(lambda: probes(lab, 9090) == [True, False, True, True]), probes(lab, 9090)
    policy.write_text(POLICY.replace("default: deny", "default: perhaps"))
    assert wait_for(lambda: "policy rejected" in watch.log())
    assert probes(lab, 9090) == [True, False, True, True]  # the last good rules stay
    policy.write_text(POLICY)
    assert wait_for(lambda: probes(lab, 9090) == IN_OUT), probes(lab, 9090)


def test_a_deleted_table_is_put_back(watch: Watch) -> None:
    """What `nft flush ruleset` (systemctl restart nftables) does to dockfence's table."""
    lab = watch.lab
    lab.host_exec("nft", "delete", "table", "inet", "dockfence")
    assert wait_for(lambda: "disappeared" in watch.log(), 5), watch.log()
    assert wait_for(lambda: probes(lab, 9090) == IN_OUT, 5), probes(lab, 9090)


def test_another_dockfence_never_interleaves(watch: Watch) -> None:
    """While another dockfence holds the host lock, watch changes nothing; it catches up when
    the lock is released. An apply of another policy is noticed and overridden by a resync."""
    import fcntl

    lab = watch.lab
    netns = os.stat(NETNS_DIR / lab.host_ns).st_ino
    with open(f"/run/dockfence/lock.{netns}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab.run_container("locked", ["9091:8080"], lab.tcp_server_cmd(8080))
        assert wait_for(lambda: lab.probe(lab.host_ns, "0.0.0.0", "127.0.0.1", 9091))
        held = watch.dockfence("apply", "--policy", str(watch.policy))
        assert held.returncode == 1 and "another dockfence" in held.stderr
        listing = lab.host_exec("nft", "list", "map", "inet", "dockfence", "tcp_ports").stdout
        assert "9091" not in listing
    assert wait_for(lambda: "9091" in lab.host_exec(
        "nft", "list", "map", "inet", "dockfence", "tcp_ports").stdout, 10), watch.log()
    other = lab.base / "other-policy.yaml"
    other.write_text(POLICY.replace("default: deny", "default: allow"))
    assert watch.dockfence("apply", "--policy", str(other)).returncode == 0
    assert wait_for(lambda: "replaced by someone else" in watch.log(), 5), watch.log()
    assert wait_for(watch.in_step)
    lab.docker("rm", "-f", "locked")


def test_a_hundred_containers_at_once(watch: Watch) -> None:
    """100 docker runs in parallel, then 100 removals: the table ends exactly right."""
    lab = watch.lab
    names = [f"churn{i}" for i in range(100)]

    def start(i: int) -> None:
        lab.run_container(names[i], [f"{9400 + i}:8080"], lab.tcp_server_cmd(8080))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(start, range(100)))
    assert wait_for(watch.in_step, 60), watch.log()[-2000:]
    assert wait_for(lambda: lab.probe(lab.host_ns, "0.0.0.0", "127.0.0.1", 9499))
    assert probes(lab, 9499) == [False] * 4
    # churn99 stays for test_baseline_without_dockfence, which shows 9499 open without the table
    lab.docker("rm", "-f", *names[:-1], timeout=300)
    assert wait_for(watch.in_step, 60), watch.log()[-2000:]


def test_docker_unreachable_keeps_the_rules_and_watch_resyncs(watch: Watch) -> None:
    lab = watch.lab
    lab.stop_dockerd()
    try:
        assert wait_for(lambda: "Docker unreachable" in watch.log(), 10), watch.log()
        # the rules stay (minus the ports of the containers that stopped with dockerd)
        before = lab.host_exec("nft", "-s", "list", "table", "inet", "dockfence").stdout
        assert "chain forward" in before
        # the table lost while Docker is away: the record brings it back without Docker
        lab.host_exec("nft", "delete", "table", "inet", "dockfence")
        assert wait_for(lambda: "restored the recorded rules" in watch.log(), 5), watch.log()
        after = lab.host_exec("nft", "-s", "list", "table", "inet", "dockfence").stdout
        assert after == before, watch.log()
    finally:
        lab.start_dockerd()
    assert wait_for(lambda: "Docker is back" in watch.log(), 30), watch.log()
    lab.docker("start", "late", "composed")
    assert wait_for(lambda: probes(lab, 9090) == IN_OUT), probes(lab, 9090)
    assert wait_for(watch.in_step)


def test_sigterm_stops_cleanly_and_the_rules_stay(watch: Watch) -> None:
    lab = watch.lab
    assert watch.stop() == 0
    assert any("STOPPING=1" in n for n in watch.notices)
    assert probes(lab, 9090) == IN_OUT


def test_restore_without_a_record_or_with_a_damaged_one(watch: Watch) -> None:
    lab = watch.lab
    empty = watch.dockfence("restore", env={"DOCKFENCE_STATE_DIR": str(lab.base / "none")})
    assert empty.returncode == 0 and "Nothing saved" in empty.stdout
    damaged = lab.base / "damaged"
    damaged.mkdir()
    record = (lab.base / "state" / "table.nft").read_text()
    (damaged / "table.nft").write_text(record.replace("dockfence", "dockfenze", 3))
    before = lab.host_exec("nft", "-s", "list", "ruleset").stdout
    lab.host_exec("nft", "delete", "table", "inet", "dockfence")
    bad = watch.dockfence("restore", env={"DOCKFENCE_STATE_DIR": str(damaged)})
    assert bad.returncode == 1 and "damaged" in bad.stderr, bad
    assert lab.host_exec("nft", "list", "table", "inet", "dockfence", check=False).returncode
    good = watch.dockfence("restore")
    assert good.returncode == 0, good
    assert lab.host_exec("nft", "-s", "list", "ruleset").stdout == before


def test_reboot_closed_from_boot(watch: Watch) -> None:
    """A reboot, simulated: dockerd stops (its containers with it), the table goes (what a
    reboot loses), `restore` loads the record, dockerd starts and brings back its --restart
    always container, then watch starts. A stranger knocking the whole time never gets in; the
    office gets in once the container is up."""
    lab = watch.lab
    watch.start()
    lab.run_container("boot", ["9300:8080"], lab.tcp_server_cmd(8080), restart="always")
    assert wait_for(lambda: probes(lab, 9300) == IN_OUT), probes(lab, 9300)
    watch.stop()
    stranger = [(CLIENT_V4_ALT, HOST_EXT0_V4, 9300), (CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 9300)]
    with Prober(lab, stranger) as knock:
        lab.stop_dockerd()
        lab.host_exec("nft", "delete", "table", "inet", "dockfence")
        restored = watch.dockfence("restore")
        assert restored.returncode == 0 and "Restored" in restored.stdout, restored
        lab.start_dockerd()
        lab.wait_running("boot")
        assert wait_for(lambda: probes(lab, 9300) == IN_OUT), probes(lab, 9300)
        watch.start()
        assert wait_for(watch.in_step)
        assert wait_for(lambda: knock.attempts > 20)
    assert knock.successes == 0, f"{knock.successes} of {knock.attempts} got in"
    watch.stop()


def test_baseline_without_dockfence(watch: Watch) -> None:
    """Every stranger refused above gets in once dockfence is removed (and remove forgets the
    record: nothing comes back at the next boot)."""
    lab = watch.lab
    lab.docker("start", "late", "composed", "churn99")
    assert watch.dockfence("remove").returncode == 0
    assert wait_for(lambda: all(probes(lab, p) == [True] * 4 for p in (9090, 9300, 9002, 9499)))
    # with the Prober's own short timeout too: its zero successes above meant refused, not slow
    assert wait_for(lambda: lab.probe_many(
        [(lab.client_ns, CLIENT_V4_ALT, HOST_EXT0_V4, 9002)], timeout=0.3) == [True])
    assert "Nothing saved" in watch.dockfence("restore").stdout
