"""The no-op cost of a downloaded list beside a list file of the same size: what `apply` spends
before it can tell that nothing changed (refresh check plus the stamp's digest), next to
hashing the bytes alone. Nothing is downloaded (the saved copy is fresh); no root needed.

    python3 scripts/bench_list_sources.py [ENTRIES]
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_ms(f: Callable[[], object], n: int = 20) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def main() -> None:
    entries = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DOCKFENCE_STATE_DIR"] = f"{tmp}/state"
        from dockfence import listfiles, listurls

        data = "".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n"
                       for i in range(entries)).encode()
        Path(tmp, "geo.txt").write_bytes(data)
        by_file, by_url = Path(tmp, "file.yaml"), Path(tmp, "url.yaml")
        by_file.write_text("version: 1\nlists:\n  geo: {file: geo.txt}\n")
        by_url.write_text("version: 1\nlists:\n  geo: {url: 'https://example.com/g', "
                          "refresh: 6h}\n")
        listurls.save(listurls.ListURL("geo", "https://example.com/g"), data, time.time())
        raw = best_ms(lambda: hashlib.sha256(Path(tmp, "geo.txt").read_bytes()).digest())
        f = best_ms(lambda: listfiles.inputs_digest(str(by_file)))
        u = best_ms(lambda: (listurls.refresh_lists(str(by_url)),
                             listfiles.inputs_digest(str(by_url))))
        due = best_ms(lambda: listurls.refresh_due(str(by_url)))
        print(f"{entries:,} entries ({len(data):,} bytes)")
        print(f"  read + sha256 of the bytes      {raw:8.1f} ms  (1.00x)")
        print(f"  no-op check, list file          {f:8.1f} ms  ({f / raw:.2f}x)")
        print(f"  no-op check, downloaded list    {u:8.1f} ms  ({u / raw:.2f}x)")
        print(f"  refresh_due (watch, each tick)  {due:8.2f} ms")


if __name__ == "__main__":
    main()
