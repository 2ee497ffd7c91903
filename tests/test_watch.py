"""`dockfence watch` keeps the rules right while containers come and go, with real packets.

A port published after the last apply is the gap `watch` closes: through docker-proxy (IPv6 to
an IPv4-only container) nothing filters it until the rules are rebuilt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dockfence.lab import (
    CLIENT_V6,
    CLIENT_V6_ALT,
    HOST_EXT0_V6,
    HOST_EXT0_V6_ALT,
    NETNS_DIR,
    Lab,
)

pytestmark = pytest.mark.lab

POLICY = """\
version: 1
lists:
  office: ["2001:db8:1::/64"]
containers:
  default: deny
  allow:
    - container: late
      port: 8080/tcp
      from: [office]
"""


def wait_for(check: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def watching(lab: Lab) -> Iterator[tuple[Lab, Path, subprocess.Popen[str]]]:
    policy = lab.base / "watch-policy.yaml"
    policy.write_text(POLICY)
    log = (lab.base / "watch.log").open("w")
    env = {**os.environ, **state_env(lab), "DOCKER_HOST": lab.docker_host}
    proc = subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR / lab.host_ns}", sys.executable, "-m", "dockfence",
         "watch", "--policy", str(policy), "--interval", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert wait_for(lambda: "start:" in (lab.base / "watch.log").read_text()), \
            (lab.base / "watch.log").read_text()
        yield lab, policy, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        log.close()
        lab.docker("rm", "-f", "late", check=False)
        lab.host_exec(sys.executable, "-m", "dockfence", "remove", check=False,
                      env=state_env(lab))


def state_env(lab: Lab) -> dict[str, str]:
    """dockfence's records in the lab's directory, never in the machine's /var/lib/dockfence."""
    return {"DOCKFENCE_STATE_DIR": str(lab.base / "state")}


def probes(lab: Lab, want: list[bool] | None = None) -> list[bool]:
    """office and stranger, IPv6, to port 9090 through docker-proxy. With `want`, a probe that
    should get in is retried (lab.probe_many)."""
    return lab.probe_many([(lab.client_ns, CLIENT_V6, HOST_EXT0_V6, 9090),
                           (lab.client_ns, CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 9090)], expect=want)


def ensure_late(lab: Lab) -> None:
    """The container published after watch started (the first test starts it), gated."""
    if lab.docker("ps", "-q", "-f", "name=^late$").stdout.strip() == "":
        lab.run_container("late", ["9090:8080"], lab.tcp_server_cmd(8080))
    assert wait_for(lambda: probes(lab) == [True, False]), probes(lab)


def test_port_published_after_start_is_gated(watching) -> None:
    lab, _, _ = watching
    lab.run_container("late", ["9090:8080"], lab.tcp_server_cmd(8080))
    # the stranger is shut out within a few event intervals, the office gets in
    assert wait_for(lambda: probes(lab) == [True, False]), probes(lab)
    log = (lab.base / "watch.log").read_text()
    assert "container late start" in log


def test_policy_edit_is_applied_and_a_bad_edit_keeps_the_rules(watching) -> None:
    lab, policy, _ = watching
    ensure_late(lab)
    wider = '["2001:db8:1::/64", "2001:db8:9::/64"]'
    policy.write_text(POLICY.replace('["2001:db8:1::/64"]', wider))
    assert wait_for(lambda: probes(lab) == [True, True]), probes(lab)
    policy.write_text(POLICY.replace("default: deny", "default: perhaps"))
    assert wait_for(lambda: "policy rejected" in (lab.base / "watch.log").read_text())
    assert probes(lab, [True, True]) == [True, True]  # the last good rules stay
    policy.write_text(POLICY)
    assert wait_for(lambda: probes(lab) == [True, False]), probes(lab)


def test_stop_leaves_rules_and_remove_restores_the_baseline(watching) -> None:
    lab, _, proc = watching
    ensure_late(lab)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert probes(lab, [True, False]) == [True, False]
    lab.host_exec(sys.executable, "-m", "dockfence", "remove", env=state_env(lab))
    # baseline: the very probe that was blocked succeeds without dockfence
    assert probes(lab, [True, True]) == [True, True]
