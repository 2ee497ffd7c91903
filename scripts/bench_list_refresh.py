#!/usr/bin/env python3
"""What a refreshed downloaded list costs under `watch`: the element update (list_update()
computing the difference, then one netlink transaction) beside the raw `nft -f` of the whole new
table that a full apply would hand the kernel, in the same run. Run as root: it re-runs itself in
a throwaway network namespace (`unshare --net`), so nothing touches the machine's own.

    python3 scripts/bench_list_refresh.py [--sizes 10000,100000] [--changed 1] [--reps 3]

The list is scripts/bench.py's (IPv4 hosts and IPv6 /64s); `--changed` percent of its entries
are replaced by others, as when a provider publishes its ranges anew.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402

from dockfence import policy  # noqa: E402
from dockfence.backends import netlink  # noqa: E402
from dockfence.backends import nftables as nft  # noqa: E402
from dockfence.compile import compile_policy  # noqa: E402
from dockfence.incremental import list_update  # noqa: E402
from dockfence.inventory import Inventory  # noqa: E402
from dockfence.stamp import Stamp, digest  # noqa: E402


def policy_of(entries: list[str]) -> policy.Policy:
    return policy.parse(bench.policy_text(entries), "/etc/dockfence/policy.yaml")


def changed(entries: list[str], percent: float) -> list[str]:
    """The list with `percent` of its IPv6 entries replaced by prefixes it did not hold."""
    n = max(1, int(len(entries) * percent / 100))
    first = next(i for i, e in enumerate(entries) if ":" in e)  # after the IPv4 hosts
    fresh = [f"2001:db8:{0xf000 + i // 16384:x}:{(i % 16384) * 2:x}::/64" for i in range(n)]
    return entries[:first] + fresh + entries[first + n:]


def measure(n: int, percent: float) -> dict[str, float]:
    inv = Inventory()
    old_entries = bench.allow_list(n)
    old = compile_policy(policy_of(old_entries), inv)
    new = compile_policy(policy_of(changed(old_entries, percent)), inv)
    stamp = Stamp(digest(b"after"), digest(b"inventory"))
    nft.apply_text(nft.transaction(nft.render(old, Stamp(digest(b"before"), digest(b"i")))))
    t0 = time.perf_counter()
    update = list_update(old, new, stamp)
    t1 = time.perf_counter()
    assert update is not None, "the list's change altered the table's structure"
    netlink.commit(nft.TABLE, update.ops)
    t2 = time.perf_counter()
    live = nft.parse_live(nft.live_json() or {})
    if not nft.same_table(live, new):
        raise SystemExit("the element update did not give the new table's lists")
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as fh:
        fh.write(nft.transaction(nft.render(new, stamp)))
        fh.flush()
        t3 = time.perf_counter()
        subprocess.run(["nft", "-f", fh.name], check=True)
        t4 = time.perf_counter()
    nft.apply_text(nft.removal())
    return {"diff": t1 - t0, "commit": t2 - t1, "update": t2 - t0, "nft -f": t4 - t3,
            "elements": sum(len(op.elements) for op in update.ops)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--changed", type=float, default=1.0, help="percent of entries replaced")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench_list_refresh: run as root (a throwaway network namespace)", file=sys.stderr)
        return 1
    if os.environ.get("DOCKFENCE_BENCH_NETNS") != "1":  # never the machine's own namespace
        env = {**os.environ, "DOCKFENCE_BENCH_NETNS": "1"}
        return subprocess.run(["unshare", "--net", "--", sys.executable, *sys.argv],
                              env=env, check=False).returncode
    print("| N entries | changed | elements sent | diff | netlink commit | element update | "
          "nft -f of the new table | update / nft -f |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in a.sizes.split(",")):
        runs = [measure(n, a.changed) for _ in range(a.reps)]
        m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {n:,} | {a.changed:g}% | {int(m['elements']):,} | {m['diff'] * 1000:.1f} ms | "
              f"{m['commit'] * 1000:.1f} ms | {m['update'] * 1000:.1f} ms | "
              f"{m['nft -f'] * 1000:.1f} ms | {m['update'] / m['nft -f']:.3f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
