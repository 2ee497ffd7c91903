#!/usr/bin/env python3
"""How fast does `dockfence watch` follow Docker? Prints the numbers (run as root).

    python3 scripts/bench_watch.py [--trials 20] [--docker-bin-dir DIR] [--markdown FILE]

A real dockerd in a lab (dockfence.lab: network namespaces, documentation addresses only) and a
real `dockfence watch`, once with a 20-entry policy and once with one 100,000-entry list (the
office's networks among them). Every trial is a `docker run -d -p PORT:8080` of a container
the policy's rule selects (compose service `web`, `port: 8080/tcp`, `from: office`), with
`containers.default: deny`, and measures from `docker run` returning:
- to the office getting in over IPv4 through Docker's NAT (refused until watch has added the
  port's element: containers.default decides new ports);
- to a stranger being refused over IPv6 through docker-proxy (the container has no IPv6: until
  watch has added the element, nothing can tell this port from the host's own listeners).
Probes are fresh TCP connects, one after the other, with a 40 ms timeout (a refusal is a
dropped SYN: a timeout, confirmed by a second one); the time reported is the start of the first
probe that found the rule in force (so the resolution is one probe, up to about 40 ms). Docker's
start event comes before `docker run` returns, so the watch may be done before the first probe.
Beside it, watch's own share, from its log, for every update of the trials (container starts and
removals): from Docker answering the inspect of the container an event names (Docker answers
only once the start or stop is complete) to the netlink batch committed: compiling the kept
policy, diffing, recording, committing.

Then the compose-style sequence (`docker network create`, `docker run --network NEW -p
9002:8080` for a port no rule names) with a stranger knocking through NAT as fast as it can:
how many connections got in. And watch's idle RSS and its CPU time per container start+stop.
Side by side, the raw kernel operation: one element update with `nft -f` (what the old watch
and nft's own cache cost) and with the netlink batch watch sends, on the same table.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dockfence.lab import (  # noqa: E402
    CLIENT_V4,
    CLIENT_V4_ALT,
    CLIENT_V6_ALT,
    HOST_EXT0_V4,
    HOST_EXT0_V6_ALT,
    NETNS_DIR,
    Lab,
    socket_in_netns,
)

PROBE_TIMEOUT = 0.04


def policy_text(big: bool) -> str:
    office = '203.0.113.0/28, "2001:db8:1::/64"'
    lists = f"  office: [{office}]\n"
    if big:  # 100,000 disjoint IPv4 /25s, plus the office
        nets = ", ".join(f"{11 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.0/25"
                         for i in range(100_000 - 2))
        lists = f"  office: [{office}, {nets}]\n"
    rules = "".join(f"    - container: other{i}\n      port: 8080/tcp\n"
                    f"      from: [198.51.100.{i + 1}]\n" for i in range(18))
    return (f"version: 1\nlists:\n{lists}containers:\n  default: deny\n  allow:\n"
            f"    - container: web\n      port: 8080/tcp\n      from: [office]\n{rules}")


def attempt(ns: str, src: str, dst: str, port: int) -> str:
    """'in', 'dropped' (timeout) or 'closed' (refused, unreachable)."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket_in_netns(ns, family, socket.SOCK_STREAM)
    try:
        sock.bind((src, 0))
        sock.settimeout(PROBE_TIMEOUT)
        try:
            sock.connect((dst, port))
            return "in"
        except TimeoutError:
            return "dropped"
        except OSError as exc:
            return "dropped" if exc.errno in (errno.ETIMEDOUT, errno.EAGAIN) else "closed"
    finally:
        sock.close()


def until(check: object, t0: float, deadline: float = 30) -> float | None:
    """Seconds from t0 to the start of the first probe for which check() holds (None past the
    deadline). Conservative: enforcement came before that probe's SYN, and after the start of
    the previous probe (one probe apart, at most PROBE_TIMEOUT plus a few ms)."""
    while time.monotonic() < t0 + deadline:
        started = time.monotonic()
        if check():  # type: ignore[operator]
            return started - t0
        time.sleep(0.002)
    return None


class WatchProc:
    def __init__(self, lab: Lab, policy: Path) -> None:
        self.lab = lab
        self.log = lab.base / f"bench-watch-{time.monotonic_ns()}.log"
        env = {**os.environ, "DOCKER_HOST": lab.docker_host, "PYTHONPATH": str(REPO),
               "DOCKFENCE_STATE_DIR": str(lab.base / "state")}
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / lab.host_ns}", sys.executable, "-m", "dockfence",
             "watch", "--policy", str(policy)],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while "start:" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"watch did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.start_seconds = time.monotonic() - t0

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def trials(lab: Lab, watch: WatchProc, count: int, base_port: int) -> dict[str, object]:
    office: list[float] = []
    stranger: list[float] = []
    cpu0 = watch.cpu()
    log_start = len(watch.log.read_text())
    for i in range(count):
        port = base_port + i
        name = f"web{port}"
        lab.docker("run", "-d", "--name", name, "--label", "com.docker.compose.service=web",
                   "--stop-timeout", "1", "-p", f"{port}:8080", "dftest/busybox",
                   *lab.tcp_server_cmd(8080))
        returned = time.monotonic()
        got: dict[str, float | None] = {}

        def office_in(port: int = port) -> bool:
            return attempt(lab.client_ns, CLIENT_V4, HOST_EXT0_V4, port) == "in"

        def stranger_out(port: int = port) -> bool:
            return (attempt(lab.client_ns, CLIENT_V6_ALT, HOST_EXT0_V6_ALT, port) == "dropped"
                    and attempt(lab.client_ns, CLIENT_V6_ALT, HOST_EXT0_V6_ALT, port)
                    == "dropped")

        threads = [threading.Thread(target=lambda k=k, f=f, got=got, t0=returned: got.__setitem__(
            k, until(f, t0))) for k, f in (("office", office_in), ("stranger", stranger_out))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if got["office"] is None or got["stranger"] is None:
            raise RuntimeError(f"trial {i}: not enforced within 30 s: {got}\n"
                               f"{watch.log.read_text()[-3000:]}")
        office.append(got["office"])  # type: ignore[arg-type]
        stranger.append(got["stranger"])  # type: ignore[arg-type]
        lab.docker("rm", "-f", name)
    cpu = watch.cpu() - cpu0
    # watch's own account: first event of a burst received -> netlink batch committed
    own = [float(m) for m in re.findall(r": updated .* in \d+ ms \(([\d.]+) ms after",
                                        watch.log.read_text()[log_start:])]
    return {"office": office, "stranger": stranger, "cpu_per_cycle": cpu / count,
            "own": [x / 1000 for x in own]}


def compose(lab: Lab, net: str, port: int) -> tuple[int, int]:
    """Stranger connections that got in through NAT during the compose-style sequence."""
    stop = threading.Event()
    counts = [0, 0]

    def knock() -> None:
        while not stop.is_set():
            counts[0] += 1
            counts[1] += attempt(lab.client_ns, CLIENT_V4_ALT, HOST_EXT0_V4, port) == "in"
    thread = threading.Thread(target=knock)
    thread.start()
    try:
        lab.docker("network", "create", net)
        lab.docker("run", "-d", "--name", f"composed{port}", "--network", net, "-p",
                   f"{port}:8080", "dftest/busybox", *lab.tcp_server_cmd(8080))
        until(lambda: lab.probe(lab.host_ns, "0.0.0.0", "127.0.0.1", port, timeout=0.5),
              time.monotonic())
        time.sleep(2.0)  # keep knocking while watch settles
    finally:
        stop.set()
        thread.join()
    lab.docker("rm", "-f", f"composed{port}")
    lab.docker("network", "rm", net)
    return counts[1], counts[0]


def raw_element_update(lab: Lab) -> tuple[float, float]:
    """One element added and deleted on the live table: with `nft -f` and over netlink."""
    add = 'add element inet dockfence tcp_ports { 65000 comment "bench" : drop }\n'
    delete = "delete element inet dockfence tcp_ports { 65000 }\n"
    t0 = time.monotonic()
    lab.host_exec("nft", "-f", "-", input=add)
    nft_s = time.monotonic() - t0
    lab.host_exec("nft", "-f", "-", input=delete)
    script = (
        "import time\nfrom dockfence.backends import netlink as nl\n"
        "k = nl.port_key(65000)\nt0 = time.monotonic()\n"
        "nl.commit('dockfence', [nl.Op(True, 'tcp_ports', nl.interval(k, k, 'drop', 'b'))])\n"
        "print(time.monotonic() - t0)\n"
        "nl.commit('dockfence', [nl.Op(False, 'tcp_ports', nl.interval(k, k))])\n")
    out = lab.host_exec(sys.executable, "-c", script, env={"PYTHONPATH": str(REPO)}).stdout
    return nft_s, float(out.strip())


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.2f} ms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--docker-bin-dir", default=None)
    ap.add_argument("--markdown", type=Path, default=None,
                    help="replace the '## Live guard' section of this file with the results")
    ap.add_argument("--keep-logs", type=Path, default=None,
                    help="copy watch's logs into this directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (network namespaces, dockerd)", file=sys.stderr)
        return 2
    load0 = os.getloadavg()
    started = time.monotonic()
    rows = []
    with Lab(f"h6b{os.getpid() % 10000}", docker_bin_dir=args.docker_bin_dir) as lab:
        version = lab.docker("version", "-f", "{{.Server.Version}}").stdout.strip()
        for big in (False, True):
            policy = lab.base / f"policy-{'big' if big else 'small'}.yaml"
            policy.write_text(policy_text(big))
            watch = WatchProc(lab, policy)
            try:
                time.sleep(2.0)  # idle, after the first sync
                rss = watch.rss_kib()
                res = trials(lab, watch, args.trials, 20000 if big else 21000)
                leaked, knocks = compose(lab, f"compose{int(big)}", 9002 + int(big))
                raw_nft, raw_nl = raw_element_update(lab)
            finally:
                watch.stop()
                if args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    (args.keep_logs / watch.log.name).write_text(watch.log.read_text())
            lab.host_exec(sys.executable, "-m", "dockfence", "remove",
                          env={"PYTHONPATH": str(REPO)})
            office, stranger = res["office"], res["stranger"]
            rows.append({
                "policy": "one 100,000-entry list" if big else "20 entries",
                "office_p50": pct(office, 0.5), "office_p95": pct(office, 0.95),  # type: ignore[arg-type]
                "stranger_p50": pct(stranger, 0.5), "stranger_p95": pct(stranger, 0.95),  # type: ignore[arg-type]
                "leaked": leaked, "knocks": knocks, "rss": rss, "start": watch.start_seconds,
                "cpu": res["cpu_per_cycle"], "raw_nft": raw_nft, "raw_nl": raw_nl,
                "own_p50": pct(res["own"], 0.5) if res["own"] else float("nan"),  # type: ignore[arg-type]
                "own_p95": pct(res["own"], 0.95) if res["own"] else float("nan"),  # type: ignore[arg-type]
                "trials": len(office),  # type: ignore[arg-type]
            })
    load1 = os.getloadavg()
    header = (f"Docker {version}; {os.cpu_count()} CPUs, Linux {platform.release()}; load average "
              f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end (the machine was shared "
              f"with other work); took {time.monotonic() - started:.0f} s.\n"
              f"Command: `python3 scripts/bench_watch.py --trials {args.trials}"
              + (f" --docker-bin-dir {args.docker_bin_dir}" if args.docker_bin_dir else "")
              + "` (as root).\n")
    table = [
        "| policy | trials | docker run -> office in (NAT) p50 / p95 | docker run -> stranger "
        "refused (docker-proxy) p50 / p95 | watch: Docker's answer -> committed p50 / p95 | "
        "strangers in during compose sequence | watch start (full sync) | idle RSS | "
        "CPU per container start+stop | one element update: nft -f / netlink |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        table.append(
            f"| {r['policy']} | {r['trials']} | {ms(r['office_p50'])} / {ms(r['office_p95'])} | "
            f"{ms(r['stranger_p50'])} / {ms(r['stranger_p95'])} | "
            f"{ms(r['own_p50'])} / {ms(r['own_p95'])} | {r['leaked']} of "
            f"{r['knocks']} | {r['start']:.1f} s | {r['rss'] / 1024:.0f} MiB | "
            f"{ms(r['cpu'])} | {ms(r['raw_nft'])} / {ms(r['raw_nl'])} |")
    text = header + "\n" + "\n".join(table) + "\n"
    print(text)
    if args.markdown:
        doc = args.markdown.read_text() if args.markdown.exists() else "# dockfence benchmarks\n"
        marker = "## Live guard"
        section = (f"{marker} (`dockfence watch`, {version})\n\n"
                   + (__doc__ or "").split("\n\n", 2)[2].strip()
                   + "\n\n" + text)
        before, found, after = doc.partition(f"{marker} (`dockfence watch`, {version})")
        if found:
            rest = after.split("\n## ", 1)
            doc = before + section + ("\n## " + rest[1] if len(rest) > 1 else "")
        else:
            doc = doc.rstrip("\n") + "\n\n" + section
        args.markdown.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
