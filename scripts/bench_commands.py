#!/usr/bin/env python3
"""Every dockfence command end to end, side by side with the kernel's own cost (run as root).

    python3 scripts/bench_commands.py [--sizes 10,1000,100000,1000000] [--reps 3]
                                      [--markdown docs/benchmarks.md]

A lab (dockfence.lab.Lab: a real dockerd in its own network namespace, one container publishing
8081) is the host. For allow-lists of N entries (scripts/bench.py's lists: up to 100 IPv4 hosts,
the rest IPv6 /64s), written inline in the policy or in a list file, it times in one run:

- raw `nft -f` of exactly the table dockfence loads (rendered here from the same policy and
  inventory, stamp included) into the empty namespace, `nft list table` and `nft -j list table`;
- `dockfence apply` (fresh), `apply` again (nothing changed), `plan`, `status`, and `apply` of a
  small policy over the big table (shrinking), each a new `python3 -m dockfence` process as a
  user runs it, wall clock, with the peak RSS of the largest process it ran (wait4);

and prints the ratios (apply / nft -f, plan and status / nft list). With a small policy it also
times `--help`, `check` and `explain`. Commands are run `--reps` times, medians reported.

Nothing touches the machine's own network namespace: every nft and dockfence command runs in the
lab's namespace (nsenter), which the lab creates and deletes (also on errors and Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bench  # scripts/bench.py: the same lists, formatting and machine description

REPO = bench.REPO
from dockfence import bans, discovery, policy  # noqa: E402
from dockfence.backends import nftables as nft  # noqa: E402
from dockfence.compile import compile_policy  # noqa: E402
from dockfence.engine import stamp_of  # noqa: E402
from dockfence.lab import NETNS_DIR, Lab  # noqa: E402

SIZES = (10, 1_000, 100_000, 1_000_000)
START, END = "<!-- bench_commands: start -->", "<!-- bench_commands: end -->"
SMALL = 10  # the "small policy" of the targets
# nft reads every element of the table before it adds one (dockfence bans over netlink): the
# same ban by hand takes minutes at a million entries, so it is timed up to this size only
RAW_BAN_MAX = 100_000
BAN_COUNTS = (1_000, 99_999)  # bans already in force (fail2ban's, say): 100,000 at the most


def policy_inline(entries: Sequence[str]) -> str:
    return bench.policy_text(entries)


def policy_from_file(list_path: str) -> str:
    text = bench.policy_text(["198.51.100.1"])  # same rules, the list comes from the file
    head, _, rest = text.partition("lists:\n  big:\n")
    return head + f"lists:\n  big:\n    file: {list_path}\n" + rest.split("\n", 1)[1]


@dataclass
class Timed:
    seconds: float  # wall clock
    cpu: float  # user + system time of the process and every process it ran
    rss_kib: int
    out: str


@dataclass
class Runner:
    lab: Lab
    loadgen: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # its own state directory: another dockfence on this machine (a test, another bench)
        # writing /var/lib/dockfence would turn a no-op apply into a full one
        self.env = {"PATH": bench.SYSTEM_PATH, "LC_ALL": "C", "DOCKER_HOST": self.lab.docker_host,
                    "PYTHONPATH": str(REPO), "DOCKFENCE_STATE_DIR": str(self.lab.base / "state")}

    def timed(self, argv: list[str], stdin: str | None = None, ok: bool = True) -> Timed:
        """One process in the lab's host namespace: wall time and its peak RSS. The process is
        started by bench.py's small C helper: a child of this Python process would start with
        this process's RSS as its high-water mark."""
        full = ["nsenter", f"--net={NETNS_DIR / self.lab.host_ns}", "--", str(self.loadgen),
                "peak-rss", *argv]
        t = _timed_process(full, self.env, stdin)
        if ok and t.seconds < 0:
            raise bench.BenchError(f"{' '.join(argv[:5])} failed: {t.out[-2000:]}")
        return t

    def dockfence(self, *args: str, ok: bool = True) -> Timed:
        return self.timed([sys.executable, "-m", "dockfence", *args], ok=ok)

    def nft(self, *args: str) -> Timed:
        return self.timed(["nft", *args])


def _timed_process(argv: list[str], env: dict[str, str], stdin: str | None) -> Timed:
    """Run and reap the process with wait4, for its rusage (peak RSS); seconds < 0 if it failed."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=out_file, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                text=True)
        if stdin and proc.stdin:
            proc.stdin.write(stdin)
            proc.stdin.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - start
        out_file.seek(0)
        out, _, rss = out_file.read().rpartition("peak-rss-kib ")
        kib = int(rss) if rss.strip().isdigit() else 0
        return Timed(elapsed if proc.returncode == 0 else -1.0,
                     usage.ru_utime + usage.ru_stime, kib, out)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    n: int
    source: str  # inline | file
    samples: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def timed(self, key: str, t: Timed) -> Timed:
        self.add(key, t.seconds)
        self.add(f"{key} cpu", t.cpu)
        return t

    def m(self, key: str) -> float:
        return median(self.samples.get(key, []))


def expected_table(path: Path, docker_host: str) -> str:
    """The transaction dockfence's apply hands to `nft -f` for this policy and the lab."""
    os.environ["DOCKER_HOST"] = docker_host
    pol = policy.load(str(path))
    inv = discovery.inventory()
    rs = compile_policy(pol, inv)
    return nft.transaction(nft.render(rs, stamp_of(pol, inv)))


def measure(r: Runner, row: Row, path: Path, small: Path, workdir: Path, reps: int) -> None:
    raw = workdir / "raw.nft"
    raw.write_text(expected_table(path, r.lab.docker_host))
    for rep in range(reps):
        bench.log(f"N={row.n:,} {row.source}: rep {rep + 1}/{reps}")
        r.dockfence("remove")
        t = row.timed("nft -f", r.nft("-f", str(raw)))
        row.add("nft rss", t.rss_kib)
        row.timed("nft list", r.nft("list", "table", "inet", "dockfence"))
        row.timed("nft -j list", r.nft("-j", "list", "table", "inet", "dockfence"))
        r.nft("delete", "table", "inet", "dockfence")
        t = row.timed("apply", r.dockfence("apply", "--policy", str(path)))
        row.add("apply rss", t.rss_kib)
        t = row.timed("apply again", r.dockfence("apply", "--policy", str(path)))
        if "No changes" not in t.out:
            raise bench.BenchError(f"second apply changed something: {t.out[-1000:]}")
        t = row.timed("plan", r.dockfence("plan", "--json", "--policy", str(path)))
        if '"unchanged": true' not in t.out:
            raise bench.BenchError(f"plan after apply is not unchanged: {t.out[-1000:]}")
        row.timed("status", r.dockfence("status"))
        row.timed("ban", r.dockfence("ban", "198.51.100.77", "--for", "1h"))
        row.timed("unban", r.dockfence("unban", "198.51.100.77"))
        if row.n <= RAW_BAN_MAX:
            row.timed("nft ban", r.nft("add", "element", "inet", "dockfence", "bans_v4",
                                       "{ 198.51.100.78 timeout 3600s }"))
        if row.n > SMALL:
            row.timed("shrink", r.dockfence("apply", "--policy", str(small)))
    r.dockfence("remove")


def measure_small_only(r: Runner, path: Path, samples: dict[str, list[float]],
                       reps: int) -> None:
    """The commands that do not depend on list size: --help, check, explain."""
    r.dockfence("apply", "--policy", str(path))
    commands = {
        "dockfence --help": ["--help"],
        "dockfence check": ["check", "--policy", str(path)],
        "dockfence explain": ["explain", "2001:db8:ff::10", "8081", "--policy", str(path)],
    }
    for _ in range(reps):
        for name, args in commands.items():
            t = r.dockfence(*args)
            samples.setdefault(name, []).append(t.seconds)
            samples.setdefault(f"{name} cpu", []).append(t.cpu)
        for name, argv in (("python3 -c pass", [sys.executable, "-c", "pass"]),
                           ("python3 -S -c pass", [sys.executable, "-S", "-c", "pass"])):
            t = r.timed(argv)
            samples.setdefault(name, []).append(t.seconds)
            samples.setdefault(f"{name} cpu", []).append(t.cpu)
    r.dockfence("remove")


def measure_many_bans(r: Runner, path: Path, samples: dict[int, dict[str, list[float]]],
                      reps: int) -> None:
    """One more ban (and its unban) while many are in force, beside `nft add element` on the
    same table. The bans are IPv6 hosts of 2001:db8::/32 written into the ban record, which
    the apply loads into the table; as fail2ban's, no two are neighbours and each expires at
    its own second, so each is an element of its own."""
    record = Path(r.env["DOCKFENCE_STATE_DIR"]) / bans.RECORD
    for count in BAN_COUNTS:
        bench.log(f"{count:,} bans in force")
        now = time.time()
        bans.save([bans.Ban(f"2001:db8:b:{i >> 15:x}::{(i & 0x7FFF) * 2:x}", now + 86400 + i,
                            "bench") for i in range(count)], record)
        got = samples.setdefault(count, {})
        for _ in range(reps):
            r.dockfence("remove")
            got.setdefault("apply", []).append(r.dockfence("apply", "--policy", str(path)).seconds)
            got.setdefault("ban", []).append(
                r.dockfence("ban", "2001:db8:c::77", "--for", "1h").seconds)
            got.setdefault("unban", []).append(r.dockfence("unban", "2001:db8:c::77").seconds)
            got.setdefault("nft ban", []).append(r.nft(
                "add", "element", "inet", "dockfence", "bans_v6",
                "{ 2001:db8:c::78 timeout 3600s }").seconds)
        r.dockfence("remove")
        record.unlink()


IMPORTS = {
    "dockfence.cli (what --help loads)": "dockfence.cli",
    "dockfence.engine (+ apply's no-op path)": "dockfence.engine",
    "dockfence.policy (the validator: msgspec, PyYAML)": "dockfence.policy",
    "dockfence.dockerapi (the stdlib Docker client)": "dockfence.dockerapi",
    "docker (the Docker SDK with requests, no longer used)": "docker",
}


def import_times(reps: int) -> dict[str, float]:
    """`python3 -X importtime`: cumulative seconds to import each module in a fresh process."""
    out: dict[str, float] = {}
    for label, module in IMPORTS.items():
        samples = []
        for _ in range(reps):
            proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                                  capture_output=True, text=True, cwd=REPO, check=False,
                                  env={"PATH": bench.SYSTEM_PATH, "PYTHONPATH": str(REPO)})
            for line in proc.stderr.splitlines():
                fields = line.split("|")
                if len(fields) == 3 and fields[2].strip() == module:
                    samples.append(int(fields[1]) / 1e6)
        if samples:
            out[label] = median(samples)
    return out


def ratio(a: float, b: float) -> str:
    return "-" if a != a or b != b or b <= 0 else f"{a / b:.2f}x"


def report(rows: list[Row], small: dict[str, list[float]],
           many_bans: dict[int, dict[str, list[float]]], imports: dict[str, float], reps: int,
           load: str) -> str:
    fmt = bench.fmt_s

    def both(row: Row, key: str) -> str:
        return f"{fmt(row.m(key))} ({fmt(row.m(key + ' cpu'))})"

    def ratios(row: Row, key: str, base: str) -> str:
        return (f"{ratio(row.m(key), row.m(base))} "
                f"({ratio(row.m(key + ' cpu'), row.m(base + ' cpu'))})")

    header = ["N entries", "list", "nft -f", "apply", "apply / nft -f", "apply again",
              "nft list", "nft -j list", "plan", "plan / nft list", "status",
              "status / nft list", "shrink to 10", "peak RSS apply", "peak RSS nft -f"]
    body = []
    for row in rows:
        body.append([
            bench.fmt_n(row.n), row.source, both(row, "nft -f"), both(row, "apply"),
            ratios(row, "apply", "nft -f"), both(row, "apply again"), both(row, "nft list"),
            both(row, "nft -j list"), both(row, "plan"), ratios(row, "plan", "nft list"),
            both(row, "status"), ratios(row, "status", "nft list"), both(row, "shrink"),
            bench.fmt_kib(row.m("apply rss")), bench.fmt_kib(row.m("nft rss"))])
    ban_body = [[bench.fmt_n(row.n), row.source, both(row, "ban"), both(row, "unban"),
                 both(row, "nft ban") if row.n <= RAW_BAN_MAX else "not timed (minutes)"]
                for row in rows]
    small_body = [[k, fmt(median(v)), fmt(median(small[f"{k} cpu"]))]
                  for k, v in small.items() if not k.endswith(" cpu")]
    lines = [
        START,
        f"## Commands end to end (median of {reps}; {load})",
        "",
        "Each command is a new `python3 -m dockfence` process in a lab host namespace with a "
        "real dockerd (one container publishing 8081), timed from start to exit, asking Docker "
        "included: wall clock, and in parentheses the CPU time (user + system) of the command "
        "and every process it ran (nft, conntrack, ...), which other load on a shared machine "
        "does not inflate. `nft -f` loads exactly the table `apply` loads (same policy, same "
        "inventory, stamp included) into the empty namespace; `nft list` / `nft -j list` list "
        "it. `apply again` changes nothing; `shrink to 10` applies a 10-entry policy over the "
        "big table. Peak RSS: the largest process of the command (dockfence's Python or the nft "
        "it runs), from wait4.",
        "",
        bench.table(header, body),
        "",
        "Bans over the big table: `dockfence ban` (record, netlink update of the ban set, "
        "conntrack for flows to cut) and `unban`, beside the same ban added by hand with "
        "`nft add element`, which reads every element of the table into nft's cache first:",
        "",
        bench.table(["N entries", "list", "dockfence ban", "dockfence unban",
                     "nft add element"], ban_body),
        "",
        "With many bans in force (IPv6 hosts in the ban record, a 10-entry policy): `apply` "
        "loads them with the table, `ban` adds one more (the record rewritten, the family's "
        "ban set replaced over netlink), beside one more added by hand with `nft add "
        "element`:",
        "",
        bench.table(["bans in force", "apply", "dockfence ban", "dockfence unban",
                     "nft add element"],
                    [[bench.fmt_n(count), *(fmt(median(got[k]))
                                            for k in ("apply", "ban", "unban", "nft ban"))]
                     for count, got in many_bans.items()]),
        "",
        "Commands that do not depend on the list size (10-entry policy, applied), and the "
        "interpreter's own start for scale:",
        "",
        bench.table(["command", "wall", "CPU"], small_body),
        "",
        "Imports (`python3 -X importtime -c 'import MODULE'`, cumulative, median):",
        "",
        bench.table(["module", "import"], [[k, fmt(v)] for k, v in imports.items()]),
        "",
        "Targets (issue 7): apply at 100k and 1M <= 1.5x nft -f; apply again <= 150 ms at any "
        "size; apply, status, plan, explain with a small policy <= 300 ms; status and plan at "
        "100k <= 1.5x nft list.",
        END,
    ]
    return "\n".join(lines) + "\n"


def loadavg() -> str:
    return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--big-reps", type=int, default=1, help="repetitions at N >= 1,000,000")
    p.add_argument("--sources", default="inline,file")
    p.add_argument("--markdown", type=Path, metavar="FILE",
                   help="replace this script's section of FILE (e.g. docs/benchmarks.md)")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    if os.geteuid() != 0:
        print("bench_commands: run as root (network namespaces, dockerd, nft)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    load_before = loadavg()
    rows: list[Row] = []
    small: dict[str, list[float]] = {}
    many_bans: dict[int, dict[str, list[float]]] = {}
    imports: dict[str, float] = {}
    lab = Lab(f"dfc{os.getpid() % 100000}")
    try:
        with lab, tempfile.TemporaryDirectory(prefix="dfb-cmd-") as tmp:
            workdir = Path(tmp)
            lab.run_container("web", ["8081:8080"], Lab.tcp_server_cmd(8080))
            r = Runner(lab, bench.compile_loadgen(workdir))
            small_path = workdir / "small.yaml"
            small_path.write_text(policy_inline(bench.allow_list(SMALL)))
            for n in sizes:
                entries = bench.allow_list(n)
                (workdir / f"big{n}.txt").write_text(
                    "# bench list\n" + "\n".join(entries) + "\n")
                for source in a.sources.split(","):
                    path = workdir / f"p{n}-{source}.yaml"
                    path.write_text(policy_inline(entries) if source == "inline"
                                    else policy_from_file(f"big{n}.txt"))
                    if path.stat().st_size > policy.MAX_POLICY_BYTES:
                        bench.log(f"N={n:,} {source}: skipped, the policy is larger than "
                                  f"{policy.MAX_POLICY_BYTES:,} bytes (dockfence refuses it: "
                                  "lists this long belong in list files)")
                        continue
                    row = Row(n, source)
                    measure(r, row, path, small_path, workdir,
                            a.big_reps if n >= 1_000_000 else a.reps)
                    rows.append(row)
                    bench.log("row: " + ", ".join(f"{k} {bench.fmt_s(row.m(k))}"
                                                  for k in row.samples if "rss" not in k))
            measure_small_only(r, small_path, small, a.reps)
            measure_many_bans(r, small_path, many_bans, a.reps)
            imports = import_times(max(a.reps, 3))
    except bench.BenchError as exc:
        print(f"bench_commands: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_commands: interrupted; the lab was removed", file=sys.stderr)
        return 130
    load = f"{load_before} before, {loadavg()} after, on {os.cpu_count()} CPUs"
    text = report(rows, small, many_bans, imports, a.reps, load)
    args = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python3 scripts/bench_commands.py", *map(shlex.quote, args)])
    took = time.perf_counter() - started
    text = text.replace("\n\n", f"\n\nCommand: `{command}` (took {took:.0f} s). "
                        f"Measured on: {bench.machine()}.\n\n", 1)
    print(text)
    if a.markdown is not None:
        old = a.markdown.read_text() if a.markdown.exists() else "# dockfence benchmarks\n"
        if START in old and END in old:
            head, _, rest = old.partition(START)
            new = head + text.rstrip("\n") + rest.partition(END)[2]
        else:
            new = old.rstrip("\n") + "\n\n" + text
        a.markdown.write_text(new)
        bench.log(f"wrote {a.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
