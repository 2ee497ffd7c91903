#!/usr/bin/env python3
"""How long does `dockfence check` take on big and hostile policies? Prints the numbers.

    python3 scripts/bench_policy.py [--sizes 100000,1000000,4000000] [--reps 3]

For valid policies of exactly N bytes (big lists of IPv6 /64s and IPv4 hosts, 10 rules naming
them; and the same bytes spent on rules instead, 1 list of 50 entries named by every rule) it
times, side by side: `python3 -m dockfence check` as a process (wall clock, median), the same
process on a 2-line policy (interpreter and imports: the floor), `policy.load` in this process,
and the raw operation underneath: libyaml's event stream for the same bytes (CSafeLoader). Then
the hostile files of tests/test_policy_fuzz.py and the size limit, through the command. Needs no
root and touches nothing outside a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # measure this checkout, not an installed copy

from dockfence import policy  # noqa: E402


def lists_policy(size: int) -> str:
    """Big address lists, 10 rules."""
    out, n, i = ["version: 1", "lists:"], 0, 0
    while n < size - 1200:
        if i % 5000 == 0:
            out.append(f"  l{i // 5000}:")
        j = (i * 7919) % 65536
        out.append(f"    - 2001:db8:{j:x}:{i:x}::/64" if i % 10 else f"    - 198.51.100.{i % 256}")
        n += len(out[-1]) + 1
        i += 1
    out += ["containers:", "  default: deny", "  allow:"]
    for r in range(10):
        out += [f"    - container: app{r}", f"      port: {1 + r}/tcp",
                f"      from: [l{r % (i // 5000 + 1)}, 203.0.113.{r}]"]
    return pad("\n".join(out) + "\n", size)


def rules_policy(size: int) -> str:
    """The bytes spent on rules: one small list, every rule naming it."""
    out = ["version: 1", "lists:", "  office:"]
    out += [f"    - 2001:db8:{k:x}::/48" for k in range(50)]
    out += ["containers:", "  default: deny", "  allow:"]
    r, n = 0, sum(len(x) + 1 for x in out)
    while n < size - 200:
        rule = [f"    - container: app{r}", f"      port: {1 + r % 65535}/tcp",
                f"      from: [office, 203.0.113.{r % 256}]"]
        out += rule
        n += sum(len(x) + 1 for x in rule)
        r += 1
    return pad("\n".join(out) + "\n", size)


def pad(text: str, size: int) -> str:
    missing = size - len(text.encode())
    assert missing >= 2, missing
    return text + "#" + "x" * (missing - 2) + "\n"


def median_s(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.monotonic()
        fn()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dockfence", "check", "--policy", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def events(data: bytes) -> None:
    parser = yaml.CSafeLoader(data)
    try:
        while parser.get_event() is not None:
            pass
    finally:
        parser.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000,4000000")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dfbench-") as tmp:
        d = Path(tmp)
        floor = d / "floor.yaml"
        floor.write_text("version: 1\n")
        base = median_s(lambda: check(floor), args.reps)
        print(f"`dockfence check` of a 2-line policy (interpreter + imports): {base:.2f} s\n")
        print(f"{'policy':>20} {'bytes':>10} {'check (process)':>16} {'minus floor':>12} "
              f"{'policy.load':>12} {'libyaml events':>15} {'exit':>5}")
        for size in (int(s) for s in args.sizes.split(",")):
            for shape, make in (("lists", lists_policy), ("rules", rules_policy)):
                path = d / f"{shape}-{size}.yaml"
                path.write_text(make(size))
                data = path.read_bytes()
                proc = check(path)
                wall = median_s(lambda p=path: check(p), args.reps)
                load = median_s(lambda p=path: policy.load(p), args.reps)
                raw = median_s(lambda b=data: events(b), args.reps)
                print(f"{shape:>20} {len(data):>10,} {wall:>14.2f} s {wall - base:>10.2f} s "
                      f"{load:>10.2f} s {raw:>13.2f} s {proc.returncode:>5}")
        sys.path.insert(0, str(REPO / "tests"))
        from test_policy_fuzz import COMMAND_CASES
        print(f"\n{'hostile file':>20} {'bytes':>10} {'check (process)':>16} {'exit':>5}  message")
        hostile = {name: data for name, (data, _, _) in COMMAND_CASES.items()}
        hostile["10 MB"] = b"version: 1\n" + b"# padding\n" * 1_000_000
        for name, data in hostile.items():
            path = d / f"hostile-{name.replace(' ', '_')}.yaml"
            path.write_bytes(data)
            proc = check(path)
            wall = median_s(lambda p=path: check(p), args.reps)
            message = proc.stderr.strip().splitlines()[-1].replace(str(d) + "/", "")
            print(f"{name:>20} {len(data):>10,} {wall:>14.2f} s {proc.returncode:>5}  "
                  f"{message[:110]}")


if __name__ == "__main__":
    main()
