"""The lab itself works: real published ports are reachable from the client namespace.

Every later "blocked" expectation in the suite relies on these baselines: without any dockfence
policy the probes succeed, and a probe to a closed port fails (probe() is not always True).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dockfence.lab import (
    CLIENT2_V4,
    CLIENT2_V6,
    CLIENT_V4,
    CLIENT_V4_ALT,
    CLIENT_V6,
    HOST_EXT0_V4,
    HOST_EXT0_V6,
    HOST_EXT1_V4,
    HOST_EXT1_V6,
    Lab,
)

pytestmark = pytest.mark.lab

TCP_PORT, UDP_PORT, CLOSED_PORT = 8081, 5353, 9999


@pytest.fixture(scope="module")
def servers(lab: Lab) -> Iterator[Lab]:
    lab.run_container("web", [f"{TCP_PORT}:8080"], lab.tcp_server_cmd(8080), restart="always")
    lab.run_container("echo", [f"{UDP_PORT}:5353/udp"], lab.udp_server_cmd(5353))
    yield lab
    lab.docker("rm", "-f", "web", "echo", check=False)


def test_daemon_version(lab: Lab) -> None:
    info = lab.docker_info()
    if lab.docker_bin_dir is None:
        assert info["ServerVersion"].startswith("20.10")
    else:
        assert info["ServerVersion"].startswith("28.5")
        assert info["FirewallBackend"]["Driver"] == "iptables"


def test_tcp_ipv4(servers: Lab) -> None:
    lab = servers
    probes = [(lab.client_ns, CLIENT_V4, HOST_EXT0_V4, TCP_PORT),
              (lab.client_ns, CLIENT_V4_ALT, HOST_EXT0_V4, TCP_PORT),
              (lab.client2_ns, CLIENT2_V4, HOST_EXT1_V4, TCP_PORT)]
    assert lab.probe_many(probes, expect=[True] * 3) == [True] * 3


def test_tcp_ipv6_via_docker_proxy(servers: Lab) -> None:
    lab = servers
    listeners = lab.host_exec("ss", "-Hltnp", f"sport = :{TCP_PORT}").stdout
    assert "[::]" in listeners and "docker-proxy" in listeners
    probes = [(lab.client_ns, CLIENT_V6, HOST_EXT0_V6, TCP_PORT),
              (lab.client2_ns, CLIENT2_V6, HOST_EXT1_V6, TCP_PORT)]
    assert lab.probe_many(probes, expect=[True] * 2) == [True] * 2


def test_udp_echo_answers_every_datagram(servers: Lab) -> None:
    lab = servers
    probes = [(lab.client_ns, CLIENT_V4, HOST_EXT0_V4, UDP_PORT, "udp")] * 3
    assert lab.probe_many(probes, expect=[True] * 3) == [True] * 3
    # a second round from the same source: the server keeps answering
    assert lab.probe_many(probes, expect=[True] * 3) == [True] * 3
    assert lab.probe_many([(lab.client_ns, CLIENT_V6, HOST_EXT0_V6, UDP_PORT, "udp")],
                          expect=[True]) == [True]


def test_closed_port_fails(servers: Lab) -> None:
    lab = servers
    results = lab.probe_many(
        [
            (lab.client_ns, CLIENT_V4, HOST_EXT0_V4, CLOSED_PORT),
            (lab.client_ns, CLIENT_V6, HOST_EXT0_V6, CLOSED_PORT),
            (lab.client_ns, CLIENT_V4, HOST_EXT0_V4, CLOSED_PORT, "udp"),
            # and the right port with the wrong protocol
            (lab.client_ns, CLIENT_V4, HOST_EXT0_V4, UDP_PORT, "tcp"),
        ]
    )
    assert results == [False] * 4


def test_restart_dockerd_keeps_restart_always(servers: Lab) -> None:
    lab = servers
    lab.restart_dockerd()
    lab.wait_running("web")
    # the server restarts with dockerd: poll for it, generously
    deadline = time.monotonic() + 60
    while not lab.probe(lab.client_ns, CLIENT_V4, HOST_EXT0_V4, TCP_PORT, timeout=5):
        assert time.monotonic() < deadline, "web did not come back after the dockerd restart"
    # the UDP server had no restart policy: start it again for any later test
    lab.docker("start", "echo")
