#!/usr/bin/env python3
"""Is dockfence fast at any allow-list size? Prints the numbers (run as root).

    python3 scripts/bench.py [--quick]   (as root) [--markdown docs/benchmarks.md]

Control plane: for allow-lists of N entries (mostly 2001:db8::/32 sub-prefixes, a few IPv4 hosts
from 198.51.100.0/24) it times parsing the policy, compiling, rendering, loading the table with
`nft -f` into a throwaway network namespace (fresh, then replacing it as `apply` does), and
listing it back; it reports the rendered size, the kernel memory the table costs (the change of
Slab + VmallocUsed + Percpu in /proc/meminfo around the load) and the peak RSS of `nft` itself.
The naive shape (one `ip6 saddr X accept` rule per entry, in a plain chain) is loaded the same way.

Data plane: one client namespace and one host namespace per variant, joined by a veth pair. The
host listens on [::]:8081 (TCP accept-and-close, and a UDP socket that never reads), and one of
these tables guards it: none, conntrack only, dockfence's table (compiled from a policy with
`host_port: 8081/tcp` and `8081/udp` rules, so packets go input -> vmap -> allow chain ->
interval set), or the naive chain. The client's address is the last entry of every list. A small
C load generator (compiled with gcc at run time) measures UDP packets per second (one flow, never
answered, so every packet is conntrack NEW and goes through the whole lookup) and new TCP
connections per second (one lookup per connection, at the SYN). CPU time per packet/connection
is the load generator's and the listener's own (user + system, which with tick-based accounting
includes the softirq work done in their context), so other processes on the machine do not
count. Variants are interleaved round by round; medians are reported.

Nothing touches the machine's own network namespace: every `nft`, address and sysctl lives in
namespaces named `dfb<pid>...` that this script creates and always deletes (also on errors and
Ctrl-C). Only documentation addresses are used (2001:db8::/32, 198.51.100.0/24).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, not an installed copy

from dockfence import policy  # noqa: E402
from dockfence.backends import nftables as nft  # noqa: E402
from dockfence.compile import compile_policy  # noqa: E402
from dockfence.inventory import Inventory  # noqa: E402
from dockfence.model import Ruleset  # noqa: E402

SIZES = (10, 1_000, 10_000, 100_000)
PORT = 8081
HOST_ADDR = "2001:db8:ff::1"
CLIENT_ADDR = "2001:db8:ff::10"  # the last entry of every allow-list
STRANGER_ADDR = "2001:db8:ff::99"  # in no list: must be dropped
NETNS_DIR = Path("/var/run/netns")
PREFIX = f"dfb{os.getpid()}"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TCP_INFLIGHT = 32
MEMINFO_FIELDS = ("Slab", "VmallocUsed", "Percpu")
LOADGEN = "load"  # the compiled load generator, in the run's temporary directory
COMMANDS_START = "<!-- bench_commands: start -->"

LOADGEN_C = r"""
/* Load generator and listener for scripts/bench.py; clients stop by themselves (time, count).
 *   load serve PORT CPU                             on [::]:PORT: TCP accept+close loop, and a
 *                                                   UDP socket that never reads; until SIGTERM
 *   load udp SRC DST PORT SECONDS MAX CPU           sendmmsg flood of one UDP flow
 *   load tcp SRC DST PORT SECONDS MAX CPU INFLIGHT  non-blocking connect() flood, RST on close
 *   load peak-rss CMD [ARG...]                      run CMD, print its peak RSS (KiB) to stderr
 * Clients print "ok failed elapsed_ns". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
}

static int addr_of(const char *host, int port, struct sockaddr_in6 *a) {
    memset(a, 0, sizeof *a);
    a->sin6_family = AF_INET6;
    a->sin6_port = htons(port);
    return inet_pton(AF_INET6, host, &a->sin6_addr) == 1 ? 0 : -1;
}

static int serve(int port) {
    int one = 1, zero = 0, small = 4096;
    struct sockaddr_in6 a;
    addr_of("::", port, &a);
    int u = socket(AF_INET6, SOCK_DGRAM, 0);
    int t = socket(AF_INET6, SOCK_STREAM, 0);
    if (u < 0 || t < 0) { perror("socket"); return 1; }
    setsockopt(u, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    setsockopt(u, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    setsockopt(t, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(t, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(u, (struct sockaddr *)&a, sizeof a) != 0 ||
        bind(t, (struct sockaddr *)&a, sizeof a) != 0 || listen(t, 4096) != 0) {
        perror("serve");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    while (!stop) {
        int c = accept(t, NULL, NULL);
        if (c >= 0) close(c);
    }
    return 0;
}

static int udp(const char *src, const char *dst, int port, double secs, long long max) {
    struct sockaddr_in6 a, s;
    if (addr_of(dst, port, &a) != 0 || addr_of(src, 0, &s) != 0) return 2;
    int fd = socket(AF_INET6, SOCK_DGRAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&s, sizeof s) != 0 ||
        connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("udp");
        return 1;
    }
    enum { BATCH = 32 };
    static char payload[18] = "dockfence-bench!!";
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = payload;
        iov[i].iov_len = sizeof payload;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long sent = 0, failed = 0, start = now_ns(), end = start + (long long)(secs * 1e9);
    long long t = start;
    while (!stop && sent < max && t < end) {
        int want = max - sent < BATCH ? (int)(max - sent) : BATCH;
        int n = sendmmsg(fd, msgs, want, 0);
        if (n > 0) sent += n;
        else failed++;
        t = now_ns();
    }
    printf("%lld %lld %lld\n", sent, failed, t - start);
    return 0;
}

static int open_one(int ep, struct sockaddr_in6 *s, struct sockaddr_in6 *a) {
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    if (fd < 0) return -1;
    struct linger lg = {1, 0};  /* close() sends RST: no TIME_WAIT, ports are reused at once */
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)s, sizeof *s) != 0 ||
        (connect(fd, (struct sockaddr *)a, sizeof *a) != 0 && errno != EINPROGRESS)) {
        close(fd);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

static int tcp(const char *src, const char *dst, int port, double secs, long long max,
               int inflight) {
    struct sockaddr_in6 a, s;
    if (addr_of(dst, port, &a) != 0 || addr_of(src, 0, &s) != 0) return 2;
    int ep = epoll_create1(0);
    long long ok = 0, failed = 0, open = 0, start = now_ns();
    long long end = start + (long long)(secs * 1e9), t = start;
    struct epoll_event evs[256];
    while (!stop && t < end && ok + failed < max) {
        while (open < inflight && ok + failed + open < max && t < end) {
            if (open_one(ep, &s, &a) != 0) { failed++; break; }
            open++;
        }
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd, err = 0;
            socklen_t len = sizeof err;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == 0) ok++;
            else failed++;
            close(fd);
            open--;
        }
        t = now_ns();
    }
    printf("%lld %lld %lld\n", ok, failed, t - start);
    return 0;
}

/* A child forked from this small process starts with a small RSS high-water mark; one forked
 * (or vforked) from the benchmark's Python process would inherit Python's. */
static int peak_rss(char **argv) {
    pid_t pid = fork();
    if (pid == 0) {
        execvp(argv[0], argv);
        perror("execvp");
        _exit(127);
    }
    int status = 0;
    struct rusage ru;
    if (pid < 0 || wait4(pid, &status, 0, &ru) < 0) { perror("peak-rss"); return 1; }
    fprintf(stderr, "peak-rss-kib %ld\n", ru.ru_maxrss);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "peak-rss") == 0) return peak_rss(argv + 2);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;  /* no SA_RESTART: a blocked accept() returns on SIGTERM */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    if (argc == 4 && strcmp(argv[1], "serve") == 0) {
        pin(atoi(argv[3]));
        return serve(atoi(argv[2]));
    }
    if (argc == 8 && strcmp(argv[1], "udp") == 0) {
        pin(atoi(argv[7]));
        return udp(argv[2], argv[3], atoi(argv[4]), atof(argv[5]), atoll(argv[6]));
    }
    if (argc == 9 && strcmp(argv[1], "tcp") == 0) {
        pin(atoi(argv[7]));
        return tcp(argv[2], argv[3], atoi(argv[4]), atof(argv[5]), atoll(argv[6]),
                   atoi(argv[8]));
    }
    fprintf(stderr, "usage: see the comment at the top of the source\n");
    return 2;
}
"""


class BenchError(Exception):
    """A step of the benchmark failed; the message says which."""


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


# --- what is measured: allow-lists, policies, tables ------------------------------------------

def allow_list(n: int) -> list[str]:
    """n distinct entries that collapse into nothing smaller: up to 100 IPv4 hosts (odd addresses
    of 198.51.100.0/24), non-adjacent 2001:db8::/32 /64s, and the client's address last."""
    v4 = min(n // 2, 100)
    entries = [f"198.51.100.{2 * i + 1}" for i in range(v4)]
    bulk = n - v4 - 1
    entries += [f"2001:db8:{0x1000 + i // 16384:x}:{(i % 16384) * 2:x}::/64" for i in range(bulk)]
    entries.append(CLIENT_ADDR)
    return entries


def policy_text(entries: Sequence[str]) -> str:
    lines = ["version: 1", "lists:", "  big:"]
    lines += [f'    - "{e}"' for e in entries]
    lines += ["containers:", "  default: deny", "  allow:"]
    for proto in ("tcp", "udp"):
        lines += [f"    - host_port: {PORT}/{proto}", "      from: [big]"]
    return "\n".join(lines) + "\n"


def naive_table(entries: Sequence[str]) -> str:
    """The hand-written shape: one rule per entry in a plain chain, first match wins."""
    rules = [f"\t\t{'ip6' if ':' in e else 'ip'} saddr {e} accept" for e in entries]
    return "\n".join([
        "table inet naive {",
        "\tchain allow {",
        *rules,
        "\t\tcounter drop",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter - 10; policy accept;",
        "\t\tct state established,related accept",
        '\t\tiifname "lo" accept',
        f"\t\ttcp dport {PORT} jump allow",
        f"\t\tudp dport {PORT} jump allow",
        "\t}",
        "}",
    ]) + "\n"


CT_ONLY_TABLE = """table inet bench {
\tchain input {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\tct state established,related accept
\t}
}
"""


# --- the sandbox: namespaces and processes this script created, and nothing else ------------

@dataclass
class Sandbox:
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    counter: int = 0

    def new_ns(self, tag: str) -> str:
        self.counter += 1
        name = f"{PREFIX}{tag}{self.counter}"
        if (NETNS_DIR / name).exists():
            raise BenchError(f"network namespace {name} already exists; not touching it")
        self.namespaces.append(name)  # before creating it: an interrupt must not leak it
        sh(["ip", "netns", "add", name])
        return name

    def del_ns(self, name: str) -> None:
        if name in self.namespaces:
            self.namespaces.remove(name)
            sh(["ip", "netns", "del", name], check=False)

    def enter(self, ns: str) -> list[str]:
        """The only way this script runs anything inside a namespace: one it created."""
        if ns not in self.namespaces or not ns.startswith("dfb"):
            raise BenchError(f"refusing to enter namespace {ns!r}: not created by this run")
        return ["nsenter", f"--net={NETNS_DIR / ns}", "--"]

    def run(self, ns: str, argv: list[str], stdin: str | None = None,
            check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return sh(self.enter(ns) + argv, stdin=stdin, check=check, timeout=timeout)

    def spawn(self, ns: str, argv: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(self.enter(ns) + argv, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env())
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for name in list(self.namespaces):
            self.del_ns(name)


def _env() -> dict[str, str]:
    return {"PATH": SYSTEM_PATH, "LC_ALL": "C"}


def sh(argv: list[str], stdin: str | None = None, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=_env(),
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def timed_nft_load(box: Sandbox, ns: str, text: str, workdir: Path) -> tuple[float, int]:
    """`nft -f FILE` inside ns: (seconds, peak RSS of nft in KiB)."""
    path = workdir / "load.nft"
    path.write_text(text)
    start = time.perf_counter()
    proc = box.run(ns, [str(workdir / LOADGEN), "peak-rss", "nft", "-f", str(path)], check=False)
    elapsed = time.perf_counter() - start
    rss, _, err = proc.stderr.rpartition("peak-rss-kib ")
    if proc.returncode != 0 or not err.strip().isdigit():
        raise BenchError(f"nft -f failed: {rss.strip()[:2000]}")
    return elapsed, int(err)


def kernel_kib() -> int:
    """Slab + VmallocUsed + Percpu from /proc/meminfo (machine-wide, KiB)."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in MEMINFO_FIELDS:
            total += int(rest.split()[0])
    return total


def busy_jiffies() -> int:
    """Non-idle CPU time of all CPUs (user, nice, system, irq, softirq) from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return user + nice + system + irq + softirq


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- control plane ---------------------------------------------------------------------------

@dataclass
class ControlRow:
    n: int
    networks: int  # entries after the policy collapsed them (sanity: == n)
    policy_bytes: int
    parse_s: float
    compile_s: float
    render_s: float
    rendered_bytes: int
    load_s: float
    reload_s: float
    list_s: float
    listed_bytes: int
    kernel_kib: float
    nft_rss_kib: float


@dataclass
class NaiveRow:
    n: int
    file_bytes: int
    load_s: float
    kernel_kib: float
    nft_rss_kib: float


def measure_control(box: Sandbox, n: int, reps: int, workdir: Path) -> tuple[ControlRow, str]:
    """Returns the row (medians over reps) and the rendered table for the data plane."""
    text = policy_text(allow_list(n))
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    rendered = ""
    networks = listed = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        pol = policy.parse(text, "bench.yaml")
        t1 = time.perf_counter()
        rs: Ruleset = compile_policy(pol, Inventory())
        t2 = time.perf_counter()
        rendered = nft.transaction(nft.render(rs))  # exactly what `apply` hands to nft -f
        t3 = time.perf_counter()
        add("parse", t1 - t0)
        add("compile", t2 - t1)
        add("render", t3 - t2)
        networks = rs.container_gates[0].sources.count
        if networks != n:
            raise BenchError(f"N={n}: the list collapsed to {networks} networks")

        ns = box.new_ns("t")
        try:
            time.sleep(0.2)
            before = kernel_kib()
            load_s, rss = timed_nft_load(box, ns, rendered, workdir)
            time.sleep(0.3)  # let the transaction's deferred frees finish
            add("kernel", kernel_kib() - before)
            add("load", load_s)
            add("rss", rss)
            reload_s, _ = timed_nft_load(box, ns, rendered, workdir)  # replace, as apply does
            add("reload", reload_s)
            t0 = time.perf_counter()
            out = box.run(ns, ["nft", "-j", "-s", "list", "table", nft.FAMILY, nft.TABLE]).stdout
            back = nft.parse_live(json.loads(out))
            add("list", time.perf_counter() - t0)
            listed = len(out)
            if back.container_gates != rs.container_gates:
                raise BenchError(f"N={n}: the kernel lists a different table than was rendered")
        finally:
            box.del_ns(ns)
        time.sleep(0.3)
    row = ControlRow(
        n=n, networks=networks, policy_bytes=len(text),
        parse_s=median(samples["parse"]), compile_s=median(samples["compile"]),
        render_s=median(samples["render"]), rendered_bytes=len(rendered),
        load_s=median(samples["load"]), reload_s=median(samples["reload"]),
        list_s=median(samples["list"]), listed_bytes=listed,
        kernel_kib=median(samples["kernel"]), nft_rss_kib=median(samples["rss"]),
    )
    return row, nft.render(rs)


def measure_naive(box: Sandbox, n: int, reps: int, workdir: Path) -> tuple[NaiveRow, str]:
    text = naive_table(allow_list(n))
    loads: list[float] = []
    mems: list[float] = []
    rsss: list[float] = []
    for _ in range(reps):
        ns = box.new_ns("t")
        try:
            time.sleep(0.2)
            before = kernel_kib()
            load_s, rss = timed_nft_load(box, ns, text, workdir)
            time.sleep(0.3)
            mems.append(kernel_kib() - before)
            loads.append(load_s)
            rsss.append(rss)
        finally:
            box.del_ns(ns)
        time.sleep(0.3)
    return NaiveRow(n, len(text), median(loads), median(mems), median(rsss)), text


# --- data plane ------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    n: int | None
    table: str | None  # nft -f text, None: no table at all
    filters: bool = False  # the table holds an allow-list (a stranger must be dropped)
    client_ns: str = ""
    host_ns: str = ""
    udp_rate: list[float] = field(default_factory=list)
    udp_ns: list[float] = field(default_factory=list)
    tcp_rate: list[float] = field(default_factory=list)
    tcp_us: list[float] = field(default_factory=list)
    delivered: list[float] = field(default_factory=list)
    failed_conns: int = 0
    background: list[float] = field(default_factory=list)
    server: subprocess.Popen[str] | None = None
    check: str = "n/a"


def mac_of(ns: str, dev: str) -> str:
    return str(json.loads(sh(["ip", "-n", ns, "-j", "link", "show", dev]).stdout)[0]["address"])


def setup_pair(box: Sandbox, v: Variant, loadgen: Path, server_cpu: int,
               workdir: Path) -> None:
    c, h = box.new_ns("c"), box.new_ns("h")
    v.client_ns, v.host_ns = c, h
    sh(["ip", "-n", c, "link", "add", "eth0", "type", "veth", "peer", "name", "ext0",
        "netns", h])
    for ns in (c, h):
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    sh(["ip", "-n", c, "addr", "add", f"{CLIENT_ADDR}/64", "dev", "eth0", "nodad"])
    sh(["ip", "-n", c, "addr", "add", f"{STRANGER_ADDR}/64", "dev", "eth0", "nodad"])
    sh(["ip", "-n", h, "addr", "add", f"{HOST_ADDR}/64", "dev", "ext0", "nodad"])
    sh(["ip", "-n", c, "link", "set", "eth0", "up"])
    sh(["ip", "-n", h, "link", "set", "ext0", "up"])
    # Static neighbours: no neighbour discovery delays the first packets or adds traffic.
    c_mac, h_mac = mac_of(c, "eth0"), mac_of(h, "ext0")
    sh(["ip", "-n", c, "neigh", "replace", HOST_ADDR, "lladdr", h_mac, "dev", "eth0",
        "nud", "permanent"])
    for addr in (CLIENT_ADDR, STRANGER_ADDR):
        sh(["ip", "-n", h, "neigh", "replace", addr, "lladdr", c_mac, "dev", "ext0",
            "nud", "permanent"])
    box.run(c, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"])
    box.run(h, ["sysctl", "-qw", "net.core.somaxconn=4096",
                "net.ipv4.tcp_max_syn_backlog=4096"])
    if v.table is not None:
        timed_nft_load(box, h, v.table, workdir)
    server = v.server = box.spawn(h, [str(loadgen), "serve", str(PORT), str(server_cpu)])
    ready = server.stdout.readline().strip() if server.stdout else ""
    if ready != "ready":
        detail = server.stderr.read() if server.stderr else ""
        raise BenchError(f"listener in {h} did not start: {detail}")


def udp_counters(box: Sandbox, ns: str) -> int:
    """Datagrams that passed the firewall: delivered or dropped at the full socket buffer."""
    total = 0
    for line in box.run(ns, ["cat", "/proc/net/snmp6"]).stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("Udp6InDatagrams", "Udp6RcvbufErrors"):
            total += int(parts[1])
    return total


def task_cpu_s(pid: int) -> float:
    """utime + stime of a running process (includes the softirq work done in its context)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    ok: int
    failed: int
    elapsed: float  # seconds, as the load generator measured them
    cpu: float  # CPU seconds of the load generator and the listener
    background: float  # fraction of the machine's CPU used by other processes meanwhile


def loadgen_run(box: Sandbox, v: Variant, loadgen: Path, mode: str, seconds: float,
                cpu: int) -> Run:
    """One bounded load-generator run from the client's address, with its CPU cost."""
    argv = [str(loadgen), mode, CLIENT_ADDR, HOST_ADDR, str(PORT), f"{seconds:g}",
            "1000000000", str(cpu)]
    if mode == "tcp":
        argv.append(str(TCP_INFLIGHT))
    if v.server is None:
        raise BenchError("listener not running")
    server0, busy0, wall0 = task_cpu_s(v.server.pid), busy_jiffies(), time.perf_counter()
    proc = box.spawn(v.client_ns, argv)
    watchdog = threading.Timer(seconds + 60, proc.kill)
    watchdog.start()
    try:
        out = proc.stdout.read() if proc.stdout else ""
        err = proc.stderr.read() if proc.stderr else ""
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        watchdog.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    box.procs.remove(proc)
    wall = time.perf_counter() - wall0
    ours = usage.ru_utime + usage.ru_stime + task_cpu_s(v.server.pid) - server0
    busy = (busy_jiffies() - busy0) / os.sysconf("SC_CLK_TCK")
    if proc.returncode != 0 or len(out.split()) != 3:
        raise BenchError(f"load generator failed ({proc.returncode}): {err.strip()}")
    ok, failed, elapsed_ns = (int(x) for x in out.split())
    background = max(0.0, busy - ours) / (wall * (os.cpu_count() or 1))
    return Run(ok, failed, elapsed_ns / 1e9, ours, background)


def measure_round(box: Sandbox, v: Variant, loadgen: Path, seconds: float, cpu: int,
                  record: bool = True) -> None:
    before = udp_counters(box, v.host_ns)
    udp = loadgen_run(box, v, loadgen, "udp", seconds, cpu)
    passed = udp_counters(box, v.host_ns) - before
    tcp = loadgen_run(box, v, loadgen, "tcp", seconds, cpu)
    if not record:
        return
    v.background += [udp.background, tcp.background]
    if passed:
        v.udp_rate.append(passed / udp.elapsed)
        v.udp_ns.append(udp.cpu * 1e9 / passed)
        v.delivered.append(passed / udp.ok if udp.ok else 0.0)
    v.failed_conns += tcp.failed
    if tcp.ok:
        v.tcp_rate.append(tcp.ok / tcp.elapsed)
        v.tcp_us.append(tcp.cpu * 1e6 / tcp.ok)


def stranger_passes(box: Sandbox, v: Variant, loadgen: Path, cpu: int) -> int:
    """Send 3 datagrams from an address in no list; returns how many reached the UDP socket."""
    before = udp_counters(box, v.host_ns)
    argv = [str(loadgen), "udp", STRANGER_ADDR, HOST_ADDR, str(PORT), "1", "3", str(cpu)]
    box.run(v.client_ns, argv)
    time.sleep(0.05)
    return udp_counters(box, v.host_ns) - before


# --- output ----------------------------------------------------------------------------------

def fmt_s(s: float) -> str:
    if s != s:  # nan
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_kib(kib: float) -> str:
    if abs(kib) < 1024:
        return f"{kib:.0f} KiB"
    return f"{kib / 1024:.1f} MiB"


def fmt_bytes(b: float) -> str:
    return fmt_kib(b / 1024) if b >= 1024 else f"{b:.0f} B"


def fmt_rate(r: float) -> str:
    if r != r:
        return "-"
    if r >= 1e4:
        return f"{r / 1e3:,.0f} k"
    return f"{r:,.0f}"


def fmt_n(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, padded so that it also reads well in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2)
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def control_table(rows: Sequence[ControlRow]) -> str:
    header = ["N entries", "policy", "parse", "compile", "render", "rendered", "nft -f new",
              "nft -f replace", "list + parse_live", "listed JSON", "kernel mem", "nft peak RSS"]
    body = [[fmt_n(r.n), fmt_bytes(r.policy_bytes), fmt_s(r.parse_s), fmt_s(r.compile_s),
             fmt_s(r.render_s), fmt_bytes(r.rendered_bytes), fmt_s(r.load_s), fmt_s(r.reload_s),
             fmt_s(r.list_s), fmt_bytes(r.listed_bytes), fmt_kib(r.kernel_kib),
             fmt_kib(r.nft_rss_kib)] for r in rows]
    return table(header, body)


def naive_ctl_table(rows: Sequence[NaiveRow]) -> str:
    header = ["N rules", "rules file", "nft -f new", "kernel mem", "nft peak RSS"]
    body = [[fmt_n(r.n), fmt_bytes(r.file_bytes), fmt_s(r.load_s), fmt_kib(r.kernel_kib),
             fmt_kib(r.nft_rss_kib)] for r in rows]
    return table(header, body)


def data_table(variants: Sequence[Variant]) -> str:
    base = variants[0]
    base_ns, base_us = median(base.udp_ns), median(base.tcp_us)
    header = ["table", "N", "UDP pkt/s", "CPU ns/pkt", "Δ ns/pkt", "TCP conn/s",
              "CPU µs/conn", "Δ µs/conn", "check"]
    body = []
    for v in variants:
        ns, us = median(v.udp_ns), median(v.tcp_us)
        body.append([v.name, fmt_n(v.n), fmt_rate(median(v.udp_rate)), f"{ns:,.0f}",
                     "-" if v is base else f"{ns - base_ns:+,.0f}",
                     fmt_rate(median(v.tcp_rate)), f"{us:,.1f}",
                     "-" if v is base else f"{us - base_us:+,.1f}", v.check])
    return table(header, body)


def background_note(variants: Sequence[Variant]) -> str:
    loads = [b for v in variants for b in v.background]
    if not loads:
        return ""
    return (f"Other processes used {median(loads):.0%} of the machine's CPU during the runs "
            f"(median; max {max(loads):.0%}).")


def conclusion(variants: Sequence[Variant]) -> list[str]:
    by = {(v.name, v.n): v for v in variants}
    none, ct = by.get(("none", None)), by.get(("ct only", None))
    dock = [v for v in variants if v.name == "dockfence"]
    naive = [v for v in variants if v.name == "naive chain"]
    if none is None or not dock:
        return []
    b_ns = median(none.udp_ns)
    ct_ns = median(ct.udp_ns) if ct else float("nan")
    lo, hi = dock[0], dock[-1]
    out = [
        f"dockfence adds {median(lo.udp_ns) - b_ns:+,.0f} ns of CPU per packet over no table at "
        f"N={lo.n:,} and {median(hi.udp_ns) - b_ns:+,.0f} ns at N={hi.n:,}; conntrack alone "
        f"accounts for {ct_ns - b_ns:+,.0f} ns, so the rules and the set lookup cost "
        f"{median(lo.udp_ns) - ct_ns:,.0f} ns at N={lo.n:,} and {median(hi.udp_ns) - ct_ns:,.0f} "
        f"ns at N={hi.n:,}. New TCP connections/s: {fmt_rate(median(lo.tcp_rate))} at "
        f"N={lo.n:,}, {fmt_rate(median(hi.tcp_rate))} at N={hi.n:,} "
        f"(none: {fmt_rate(median(none.tcp_rate))}).",
    ]
    if len(naive) >= 2:
        first, last = naive[0], naive[-1]
        slope = (median(last.udp_ns) - median(first.udp_ns)) / ((last.n or 1) - (first.n or 0))
        twin = by.get(("dockfence", last.n))
        times = median(last.udp_ns) / median(twin.udp_ns) if twin else float("nan")
        out.append(
            f"The naive chain costs {slope:,.1f} ns per rule walked: at N={last.n:,} a packet "
            f"costs {median(last.udp_ns) / 1e3:,.0f} µs of CPU ({times:,.0f}x dockfence) and the "
            f"host takes {fmt_rate(median(last.tcp_rate))} new TCP connections/s.")
    return out


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nft_version = sh(["nft", "--version"], check=False).stdout.strip()
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, {nft_version}, "
            f"Python {platform.python_version()}")


# --- main ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    control_reps: int
    rounds: int
    seconds: float
    warmup: float
    quick: bool


def preflight() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (network namespaces and nft): "
                         "python3 scripts/bench.py")
    for tool in ("ip", "nsenter", "nft", "gcc", "sysctl"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            raise BenchError(f"{tool} not found (apt-get install -y iproute2 util-linux "
                             "nftables gcc procps)")


def compile_loadgen(workdir: Path) -> Path:
    src, binary = workdir / "load.c", workdir / LOADGEN
    src.write_text(LOADGEN_C)
    sh(["gcc", "-O2", "-Wall", "-o", str(binary), str(src)])
    return binary


def bench(s: Settings, box: Sandbox, workdir: Path) -> str:
    log(machine())
    loadgen = compile_loadgen(workdir)
    cpus = os.cpu_count() or 1
    client_cpu, server_cpu = (0, 1) if cpus >= 2 else (-1, -1)

    control: list[ControlRow] = []
    naive_ctl: list[NaiveRow] = []
    variants = [Variant("none", None, None), Variant("ct only", None, CT_ONLY_TABLE)]
    naive_variants: list[Variant] = []
    for n in s.sizes:
        log(f"control plane: dockfence, N={n:,}")
        row, rendered = measure_control(box, n, s.control_reps, workdir)
        control.append(row)
        variants.append(Variant("dockfence", n, rendered, filters=True))
        log(f"control plane: naive chain, N={n:,}")
        nrow, text = measure_naive(box, n, s.control_reps, workdir)
        naive_ctl.append(nrow)
        naive_variants.append(Variant("naive chain", n, text, filters=True))
    variants += naive_variants

    log(f"data plane: {len(variants)} namespace pairs")
    for v in variants:
        setup_pair(box, v, loadgen, server_cpu, workdir)
    log("data plane: checks and warm-up")
    for v in variants:
        measure_round(box, v, loadgen, s.warmup, client_cpu, record=False)
        passed = stranger_passes(box, v, loadgen, client_cpu)
        if v.filters:
            v.check = "stranger dropped" if passed == 0 else f"STRANGER PASSED {passed}/3"
        else:
            v.check = "stranger passed" if passed == 3 else f"STRANGER LOST {3 - passed}/3"
    for r in range(s.rounds):
        for v in variants:
            log(f"data plane round {r + 1}/{s.rounds}: {v.name} N={fmt_n(v.n)}")
            measure_round(box, v, loadgen, s.seconds, client_cpu)
    log("data plane: done")
    for v in variants:
        low = min(v.delivered, default=0.0)
        problems = []
        if low < 0.99:
            problems.append(f"CLIENT UDP {low:.1%} delivered")
        if v.failed_conns:
            problems.append(f"CLIENT {v.failed_conns} conn failed")
        v.check = "; ".join([v.check, *problems]) if problems else v.check + ", client passed"

    mode = "--quick" if s.quick else "full run"
    parts = [
        f"## Control plane ({mode}; median of {s.control_reps})",
        "",
        "dockfence: policy with one list of N entries (up to 100 IPv4 hosts, the rest IPv6 "
        "/64s), gating host port 8081 tcp+udp. `nft -f new` loads the transaction into a fresh "
        "namespace, `replace` loads it again over the existing table (what `apply` does); "
        "`list + parse_live` is `nft -j -s list table` plus parsing it back (what `status` and "
        "`plan` do). Kernel mem = change of Slab+VmallocUsed+Percpu in /proc/meminfo around the "
        "load (machine-wide: a few hundred KiB of noise).",
        "",
        control_table(control),
        "",
        "Naive chain for comparison (one `ip6 saddr X accept` rule per entry):",
        "",
        naive_ctl_table(naive_ctl),
        "",
        f"## Data plane ({mode}; median of {s.rounds} x {s.seconds:g} s per protocol)",
        "",
        "Client namespace -> veth -> host namespace, IPv6, to [::]:8081; the client's address "
        "is the last entry of the list. UDP: one flow, never answered, so every packet is "
        "conntrack NEW and walks input -> vmap -> allow chain -> set (or the naive chain). "
        f"TCP: {TCP_INFLIGHT} non-blocking connects in flight, one lookup per connection (the "
        "SYN). CPU = user+system time of the load generator and the listener (with tick-based "
        "accounting it includes the softirq work done in their context: veth, netfilter, "
        "conntrack, UDP/TCP) divided by the count; Δ is against no table. check: a stranger's "
        "datagrams (from an address in no list) reach the socket or not, as the table should "
        "have it; the client's always do (>= 99% of UDP, every TCP connection).",
        "",
        data_table(variants),
        "",
        background_note(variants),
        "",
        "Reading it: dockfence's allow-lists are nftables interval sets, which this kernel keeps "
        "in a red-black tree, so a lookup costs O(log N); the naive chain walks its rules one "
        "by one, O(N). Only packets that open a connection (conntrack NEW) are looked up: "
        "established traffic is accepted by the first rule in both shapes, so for TCP the cost "
        "is paid once per connection, at the SYN.",
        "",
        *[f"- {line}" for line in conclusion(variants)],
    ]
    return "\n".join(parts) + "\n"


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="one repetition, short runs (< 1 min)")
    p.add_argument("--sizes", help="comma-separated list sizes (default 10,1000,10000,100000)")
    p.add_argument("--markdown", type=Path, metavar="FILE",
                   help="also write the results as Markdown (e.g. docs/benchmarks.md)")
    a = p.parse_args(argv)
    sizes = tuple(int(x) for x in a.sizes.split(",")) if a.sizes else SIZES
    if any(n < 1 for n in sizes):
        p.error("list sizes are at least 1")
    if a.quick:
        s = Settings(sizes, control_reps=1, rounds=1, seconds=0.5, warmup=0.1, quick=True)
    else:
        s = Settings(sizes, control_reps=3, rounds=5, seconds=2.0, warmup=0.3, quick=False)
    return s, a.markdown


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so that the finally blocks clean up."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: Sequence[str] | None = None) -> int:
    settings, markdown = parse_args(argv)
    start = time.perf_counter()
    box = Sandbox()
    try:
        preflight()
        with terminate_as_interrupt(), tempfile.TemporaryDirectory(prefix="dfb-bench-") as tmp:
            try:
                report = bench(settings, box, Path(tmp))
            finally:
                box.close()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; namespaces and processes removed", file=sys.stderr)
        return 130
    finally:
        box.close()
    took = time.perf_counter() - start
    args = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python3 scripts/bench.py", *map(shlex.quote, args)])
    header = (f"Measured on: {machine()}.\nCommand: `{command}` (took {took:.0f} s).\n")
    print()
    print(header)
    print(report)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        keep = ""  # scripts/bench_commands.py's section stays
        if markdown.exists() and COMMANDS_START in (old := markdown.read_text()):
            keep = "\n" + COMMANDS_START + old.partition(COMMANDS_START)[2].rstrip("\n") + "\n"
        markdown.write_text("# dockfence benchmarks\n\n" + header + "\n" + report + keep)
        log(f"wrote {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
