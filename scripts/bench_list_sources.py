"""The no-op cost of a downloaded list beside a list file of the same size: what `apply` spends
before it can tell that nothing changed (refresh check plus the stamp's digest), next to
hashing the bytes alone; once with each file hashed (the memo of digests emptied each time, as
for a file that just changed) and once with its digest remembered (dockfence.filedigests: the
files must first be older than its racy window, so this waits a few seconds). Nothing is
downloaded (the saved copy is fresh); no root needed, the memos are kept in a temporary folder.

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
        from dockfence import filedigests, listfiles, listurls

        filedigests.MEMO, listfiles.MEMO = Path(tmp, "digests.json"), Path(tmp, "found.json")
        data = "".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n"
                       for i in range(entries)).encode()
        Path(tmp, "geo.txt").write_bytes(data)
        by_file, by_url = Path(tmp, "file.yaml"), Path(tmp, "url.yaml")
        by_file.write_text("version: 1\nlists:\n  geo: {file: geo.txt}\n")
        by_url.write_text("version: 1\nlists:\n  geo: {url: 'https://example.com/g', "
                          "refresh: 6h}\n")
        listurls.save(listurls.ListURL("geo", "https://example.com/g"), data, time.time())

        def file_check() -> object:
            return listfiles.inputs_digest(str(by_file))

        def url_check() -> object:
            return listurls.refresh_lists(str(by_url)), listfiles.inputs_digest(str(by_url))

        def forgetting(check: Callable[[], object]) -> Callable[[], object]:
            return lambda: (filedigests.MEMO.unlink(missing_ok=True), check())

        raw = best_ms(lambda: hashlib.sha256(Path(tmp, "geo.txt").read_bytes()).digest())
        rows = {"no-op check, list file, hashed": best_ms(forgetting(file_check)),
                "no-op check, downloaded list, hashed": best_ms(forgetting(url_check))}
        time.sleep(filedigests.RACY_NS / 1e9 + 0.2)  # the files settle: digests can be trusted
        file_check(), url_check()
        rows |= {"no-op check, list file, remembered": best_ms(file_check),
                 "no-op check, downloaded list, remembered": best_ms(url_check)}
        due = best_ms(lambda: listurls.refresh_due(str(by_url)))
        print(f"{entries:,} entries ({len(data):,} bytes)")
        print(f"  {'read + sha256 of the bytes':42} {raw:8.2f} ms  (1.00x)")
        for name, ms in rows.items():
            print(f"  {name:42} {ms:8.2f} ms  ({ms / raw:.2f}x)")
        print(f"  {'refresh_due (watch, each tick)':42} {due:8.2f} ms")


if __name__ == "__main__":
    main()
