"""`dockfence demo`: the django/postgres example on a sandboxed Docker host, proven with packets.

Builds a lab (a real dockerd in its own network namespace, outside clients in others), probes
every path once without a policy and once with it, and prints who gets in. Touches nothing
outside the lab's namespaces.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import lab as L


@dataclass(frozen=True)
class Probe:
    who: str
    path: str
    client: str
    src: str
    dst: str
    port: int
    expect: bool
    proto: str = "tcp"


def _probes(lab: L.Lab, django_ip: str) -> list[Probe]:
    c, d = lab.client_ns, lab.client2_ns
    return [
        Probe("office 203.0.113.10", "django via NAT (:8081)", c, L.CLIENT_V4,
              L.HOST_EXT0_V4, 8081, True),
        Probe("office 2001:db8:1::10", "django via docker-proxy ([::]:8081)", c, L.CLIENT_V6,
              L.HOST_EXT0_V6, 8081, True),
        Probe("stranger 203.0.113.100", "django via NAT (:8081)", c, L.CLIENT_V4_ALT,
              L.HOST_EXT0_V4, 8081, False),
        Probe("stranger 2001:db8:9::10", "django via docker-proxy ([::]:8081)", c,
              L.CLIENT_V6_ALT, L.HOST_EXT0_V6_ALT, 8081, False),
        Probe("second NIC 198.51.100.7", "django via NAT (:8081)", d, L.CLIENT2_V4,
              L.HOST_EXT1_V4, 8081, False),
        Probe("office 203.0.113.10", "postgres via NAT (:5432)", c, L.CLIENT_V4,
              L.HOST_EXT0_V4, 5432, False),
        Probe("office 2001:db8:1::10", "postgres via docker-proxy ([::]:5432)", c, L.CLIENT_V6,
              L.HOST_EXT0_V6, 5432, False),
        Probe("stranger 203.0.113.100", f"django direct routing ({django_ip}:8080)", c,
              L.CLIENT_V4_ALT, django_ip, 8080, False),
        Probe("stranger 203.0.113.100", "host SSH (:22)", c, L.CLIENT_V4_ALT,
              L.HOST_EXT0_V4, 22, True),
        Probe("stranger 2001:db8:9::10", "host SSH (:22)", c, L.CLIENT_V6_ALT,
              L.HOST_EXT0_V6_ALT, 22, True),
        Probe("office 203.0.113.10", "host's other service (:8000)", c, L.CLIENT_V4,
              L.HOST_EXT0_V4, 8000, False),
        Probe("the host itself", "django via localhost (:8081)", lab.host_ns, "127.0.0.1",
              "127.0.0.1", 8081, True),
    ]


def _host_service(lab: L.Lab, port: int) -> subprocess.Popen[bytes]:
    """A TCP listener in the host namespace standing in for sshd and other host services; the
    lab kills every process in its namespaces when it stops."""
    www = lab.base / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "index.html").write_text("host\n")
    return subprocess.Popen(
        ["nsenter", f"--net={L.NETNS_DIR / lab.host_ns}", "busybox", "httpd", "-f",
         "-p", str(port), "-h", str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _dockfence(lab: L.Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, run on the sandboxed host exactly as an administrator would."""
    return lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False,
                         env={"COLUMNS": "150"})


def run_demo(out: Console, docker_bin_dir: str | None = None, keep: bool = False) -> int:
    lab = L.Lab(f"demo{os.getpid() % 1000}", docker_bin_dir=docker_bin_dir)
    policy_text = resources.files("dockfence").joinpath("examples/policy.yaml").read_text()
    try:
        t0 = time.monotonic()
        out.rule("1. A sandboxed Docker host")
        lab.start()
        version = lab.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
        lab.run_container("django", ["8081:8080"], lab.tcp_server_cmd(8080))
        lab.run_container("postgres", ["5432:5432"], lab.tcp_server_cmd(5432))
        _host_service(lab, 22)
        _host_service(lab, 8000)
        django_ip = lab.container_ip("django")
        out.print(f"dockerd {version} in namespace {lab.host_ns}; containers django "
                  "(-p 8081:8080) and postgres (-p 5432:5432); host services on 22 and 8000; "
                  f"clients in {lab.client_ns} and {lab.client2_ns} "
                  f"({time.monotonic() - t0:.1f}s)")
        policy_path = lab.base / "policy.yaml"
        policy_path.write_text(policy_text)
        out.rule(f"2. The policy ({policy_path})")
        out.print(policy_text.rstrip(), markup=False)

        probes = _probes(lab, django_ip)
        spec = [(p.client, p.src, p.dst, p.port, p.proto) for p in probes]
        time.sleep(0.5)  # let the host listeners bind
        before = lab.probe_many(spec)

        out.rule("3. dockfence apply")
        applied = _dockfence(lab, "apply", "--policy", str(policy_path))
        out.print((applied.stdout + applied.stderr).rstrip(), markup=False)
        if applied.returncode != 0:
            return 1
        after = lab.probe_many(spec)
        return _report(out, lab, probes, before, after, policy_path)
    finally:
        if keep:
            out.print(f"sandbox kept: namespaces {', '.join(lab.namespaces)}; remove with "
                      f"`python -c 'from dockfence.lab import Lab; Lab(\"{lab.name}\").stop()'`")
        else:
            lab.stop()


def _report(out: Console, lab: L.Lab, probes: list[Probe], before: list[bool],
            after: list[bool], policy_path: Path) -> int:
    out.rule("4. Who gets in (real TCP connections, before and after apply)")
    table = Table()
    for col in ("from", "to", "no policy", "with policy", "expected"):
        table.add_column(col)
    failures = 0
    for p, b, a in zip(probes, before, after, strict=True):
        ok = a == p.expect
        failures += not ok
        shown = "[green]gets in[/]" if a else "[red]blocked[/]"
        table.add_row(p.who, p.path, "gets in" if b else "blocked",
                      shown if ok else f"[bold red]{'gets in' if a else 'blocked'} (WRONG)[/]",
                      "gets in" if p.expect else "blocked")
    out.print(table)
    out.rule("5. dockfence status")
    st = _dockfence(lab, "status")
    out.print((st.stdout + st.stderr).rstrip(), markup=False)
    out.rule("6. dockfence explain 203.0.113.100 8081")
    ex = _dockfence(lab, "explain", L.CLIENT_V4_ALT, "8081", "--policy", str(policy_path))
    out.print((ex.stdout + ex.stderr).rstrip(), markup=False)
    out.rule()
    unproven = [p for p, b in zip(probes, before, strict=True) if not p.expect and not b]
    if unproven:
        out.print("note: without any policy these were already blocked (by Docker itself), "
                  "so they prove nothing about dockfence: "
                  + "; ".join(f"{p.who} -> {p.path}" for p in unproven))
    if failures:
        out.print(f"[bold red]{failures} probe(s) did not match the policy.[/]")
        return 1
    out.print(f"[bold green]All {len(probes)} probes match the policy.[/]")
    return 0
