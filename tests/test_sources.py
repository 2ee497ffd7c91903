"""Where allow-lists come from: lists downloaded from a URL, and deny lists (`except:`).

Lists are served by tests/list_server.py from inside a network namespace (never the internet):
first a bare namespace for the downloader's limits (no Docker needed), then the lab's second
client namespace, where the lab's Docker host downloads them and real packets prove that an
address from the downloaded list gets in and a stranger does not, baseline first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dockfence.lab import (
    CLIENT2_V4,
    CLIENT_V4,
    CLIENT_V4_ALT,
    CLIENT_V6,
    CLIENT_V6_ALT,
    HOST_EXT0_V4,
    HOST_EXT0_V6,
    HOST_EXT0_V6_ALT,
    NETNS_DIR,
    Lab,
)

from helpers import live_stamp, recorded_stamp, wait_for

REPO = Path(__file__).resolve().parent.parent
SERVER = Path(__file__).resolve().parent / "list_server.py"
PORT = 8000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def start_server(ns: str, address: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(SERVER), address,
                             str(PORT)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()  # by the pid we started
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def in_ns(ns: str, state: Path, code: str) -> Any:
    """Run Python in namespace ns with this checkout; what it prints, as JSON."""
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO),
                               "DOCKFENCE_STATE_DIR": str(state)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- the downloader's limits, in a bare namespace ---------------------------------------------

class Served:
    def __init__(self, ns: str, state: Path) -> None:
        self.ns, self.state = ns, state
        self.base = f"http://198.51.100.5:{PORT}"

    def refresh(self, mode: str, **limits: float) -> dict[str, Any]:
        """Serve `mode` at /list, download it as list `cdn`: the warning and what is kept."""
        return in_ns(self.ns, self.state, f"""
import json, urllib.request
from dockfence import listurls
urllib.request.urlopen({self.base!r} + "/set/{mode}", timeout=5).read()
lu = listurls.ListURL("cdn", {self.base!r} + "/list", 3600)
t = __import__("time").monotonic()
w = listurls.refresh(lu, **{limits!r})
print(json.dumps({{"warning": w, "kept": (listurls.saved(lu) or b"").decode(),
                  "seconds": __import__("time").monotonic() - t}}))
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    ns = f"dfsrc{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "198.51.100.5/32", "dev", "lo"],
                       check=True)
        proc = start_server(ns, "198.51.100.5")
        try:
            yield Served(ns, tmp_path_factory.mktemp("state"))
        finally:
            stop_server(proc)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


GOOD = "# office\n203.0.113.10\n2001:db8:1::10/128\n\n198.51.100.7  # branch\n"


@needs_root
def test_good_list_is_kept(served: Served) -> None:
    got = served.refresh("good")
    assert got == {**got, "warning": None, "kept": GOOD}
    meta = json.loads((served.state / "lists" / "cdn.json").read_text())
    assert meta["url"] == f"{served.base}/list" and meta["sha256"] and meta["fetched"] > 0
    # a redirect to it is followed
    assert served.refresh("hop")["warning"] is None


@needs_root
@pytest.mark.parametrize(("mode", "words", "limits"), [
    ("html", "an HTML page (text/html)", {}),
    ("html-as-text", "looks like HTML", {}),
    ("bad", ":2: not an IP address or CIDR", {}),
    ("empty", "holds no addresses", {}),
    ("big", "more than the 100,000 bytes", {"max_bytes": 100_000}),
    ("huge", "1,073,741,824 bytes", {}),
    ("loop", "HTTP 302", {}),
    ("to-ftp", "redirect to a ftp URL refused", {}),
    ("slow", "too slowly", {"total": 2, "timeout": 2}),
])
def test_hostile_answer_is_refused_and_the_last_good_copy_stays(
        served: Served, mode: str, words: str, limits: dict[str, float]) -> None:
    assert served.refresh("good")["warning"] is None
    got = served.refresh(mode, **limits)
    assert got["warning"] is not None and words in got["warning"], got
    assert got["warning"].startswith(f"list 'cdn' from {served.base}/list: ")
    assert "stays in force" in got["warning"] and got["kept"] == GOOD
    assert got["seconds"] < 15  # a trickle or a loop ends by itself
    if mode == "bad":
        assert "198.51.100.0/33" in got["warning"]


# --- a downloaded list and a deny list, enforced with real packets ----------------------------

POLICY = """\
version: 1
lists:
  office: {url: "http://198.51.100.7:8000/list", refresh: 1h}
  stranger: [203.0.113.100, "2001:db8:9::10"]
containers:
  allow:
    - {container: web, port: 8080, from: office}
    - {container: pub, port: 8080, from: any, except: [stranger]}
"""
PROBES = {
    "office_list": (CLIENT_V4, HOST_EXT0_V4, 8081),
    "stranger_list": (CLIENT_V4_ALT, HOST_EXT0_V4, 8081),
    "office_list_v6": (CLIENT_V6, HOST_EXT0_V6, 8081),
    "stranger_list_v6": (CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 8081),
    "office_except": (CLIENT_V4, HOST_EXT0_V4, 8083),
    "stranger_except": (CLIENT_V4_ALT, HOST_EXT0_V4, 8083),
    "stranger_except_v6": (CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 8083),
}
WANT = {"office_list": True, "stranger_list": False, "office_list_v6": True,
        "stranger_list_v6": False, "office_except": True, "stranger_except": False,
        "stranger_except_v6": False}


class Site:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state = lab.base / "state"
        self.policy = lab.base / "sources.yaml"
        self.policy.write_text(POLICY)
        self.server: subprocess.Popen[str] | None = None

    def dockfence(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False,
                                  env={"PYTHONPATH": str(REPO), "SSH_CONNECTION": "",
                                       "COLUMNS": "200", "DOCKFENCE_STATE_DIR": str(self.state)},
                                  timeout=180)

    def probe(self, names: list[str], want: dict[str, bool] | None = None) -> dict[str, bool]:
        specs = [(self.lab.client_ns, *PROBES[n]) for n in names]
        got = self.lab.probe_many(specs, expect=[want[n] for n in names] if want else None)
        return dict(zip(names, got, strict=True))

    def serve(self, mode: str) -> None:
        if self.server is None:
            self.server = start_server(self.lab.client2_ns, CLIENT2_V4)
        self.ask(f"set/{mode}")

    def ask(self, path: str) -> str:
        """What the list server answers at /path (asked from the Docker host)."""
        return str(self.lab.host_exec(
            sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
            f"'http://{CLIENT2_V4}:{PORT}/{path}', timeout=5).read().decode())").stdout.strip())

    def stop(self) -> None:
        if self.server is not None:
            stop_server(self.server)
            self.server = None

    def age_copy(self) -> None:
        """The saved copy of `office` is older than its refresh (as after a day)."""
        meta = self.state / "lists" / "office.json"
        doc = json.loads(meta.read_text())
        meta.write_text(json.dumps({**doc, "fetched": 0, "tried": 0}))

    def table(self) -> str:
        return str(self.lab.host_exec("nft", "-s", "list", "table", "inet", "dockfence",
                                      check=False).stdout)


@pytest.fixture(scope="module")
def site(lab: Lab) -> Iterator[Site]:
    lab.run_container("web", ["8081:8080"], lab.tcp_server_cmd(8080), restart="always")
    lab.run_container("pub", ["8083:8080"], lab.tcp_server_cmd(8080), restart="always")
    s = Site(lab)
    try:
        yield s
    finally:
        s.stop()


def test_downloaded_list_and_deny_list_with_real_packets(site: Site) -> None:
    names = list(PROBES)
    # baseline: without dockfence every probe gets in (poll while the servers start)
    deadline = time.monotonic() + 60
    while not all((base := site.probe(names, dict.fromkeys(names, True))).values()) \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert all(base.values()), base

    # check and plan never download: no copy yet, they say so
    for cmd in ("check", "plan"):
        proc = site.dockfence(cmd, "--policy", str(site.policy))
        assert proc.returncode == 1 and "no good copy has been downloaded yet" in proc.stderr
    # apply with the server down and no copy: fails, nothing applied
    proc = site.dockfence("apply", "--policy", str(site.policy))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "http://198.51.100.7:8000/list" in proc.stderr and "no good copy" in proc.stderr
    assert site.table() == ""

    site.serve("good")
    proc = site.dockfence("apply", "--policy", str(site.policy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert site.probe(names, WANT) == WANT
    status = site.dockfence("status")
    assert "office (url http://198.51.100.7:8000/list)" in status.stdout, status.stdout
    assert "any except stranger" in status.stdout, status.stdout
    explained = site.dockfence("explain", CLIENT_V4_ALT, "8083", "--policy", str(site.policy))
    assert "refused by an except: any except stranger" in explained.stdout, explained.stdout
    applied = site.table()

    # nothing due: a no-op that downloads nothing (the server answers another list now)
    site.serve("other")
    proc = site.dockfence("apply", "--policy", str(site.policy))
    assert proc.returncode == 0 and "No changes" in proc.stdout, proc.stdout + proc.stderr
    # a stale copy and a garbled answer: refused with a warning, the last good copy stays
    site.serve("html")
    site.age_copy()
    proc = site.dockfence("plan", "--policy", str(site.policy))  # plan does not download
    assert proc.returncode == 0 and "HTML" not in proc.stderr
    proc = site.dockfence("apply", "--policy", str(site.policy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "list 'office' from http://198.51.100.7:8000/list: the answer is an HTML page" \
        in proc.stderr and "stays in force" in proc.stderr
    # the server is down: the last good copy stays, enforcement goes on unchanged
    site.stop()
    site.age_copy()
    proc = site.dockfence("apply", "--policy", str(site.policy))
    assert proc.returncode == 0 and "cannot download" in proc.stderr, proc.stdout + proc.stderr
    assert site.table() == applied
    assert site.probe(names, WANT) == WANT

    # the list changes upstream: the next due apply lets the new address in, the old one out
    site.serve("other")  # 198.51.100.50 only
    site.age_copy()
    proc = site.dockfence("apply", "--policy", str(site.policy))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    now = {"office_list": False, "office_except": True, "stranger_except": False}
    assert site.probe(list(now), now) == now


class Watching:
    """`dockfence watch` on the lab's Docker host, its output in a file; stopped by SIGTERM to
    the pid it started."""

    def __init__(self, site: Site, policy: Path) -> None:
        self.log_path = site.lab.base / f"watch-sources-{time.monotonic_ns()}.log"
        env = {**os.environ, "DOCKER_HOST": site.lab.docker_host, "PYTHONPATH": str(REPO),
               "DOCKFENCE_STATE_DIR": str(site.state), "SSH_CONNECTION": ""}
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / site.lab.host_ns}", sys.executable, "-m",
             "dockfence", "watch", "--policy", str(policy)],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, after: int = 0) -> bool:
        return bool(wait_for(lambda: text in self.log()[after:], 60))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def _handle(site: Site) -> int:
    listed = site.lab.host_exec("nft", "-j", "list", "tables", "inet").stdout
    return next(o["table"]["handle"] for o in json.loads(listed)["nftables"]
                if o.get("table", {}).get("name") == "dockfence")


def test_watch_refreshes_a_downloaded_list_element_by_element(site: Site) -> None:
    """A list that changes upstream changes the elements of its sets under watch (the table is
    not replaced); a garbled answer changes nothing; a change of the table's structure (the
    list loses its IPv6 entries) falls back to a full apply. SIGHUP downloads at once."""
    names = list(PROBES)
    site.dockfence("remove")
    deadline = time.monotonic() + 60  # baseline: without dockfence every probe gets in
    while not all((base := site.probe(names, dict.fromkeys(names, True))).values()) \
            and time.monotonic() < deadline:
        time.sleep(0.3)
    assert all(base.values()), base
    site.serve("good")
    if (site.state / "lists" / "office.json").exists():
        site.age_copy()
    assert site.dockfence("apply", "--policy", str(site.policy)).returncode == 0

    watch = Watching(site, site.policy)
    proc, log, wait_log = watch.proc, watch.log_path, watch.wait_log
    try:
        assert wait_log("start:"), log.read_text()
        # watch started on a table it did not write: it rewrites it once, after a quiet spell
        assert wait_log("get their own counters:"), log.read_text()
        assert site.probe(names, WANT) == WANT
        handle = _handle(site)

        site.serve("swapped")
        seen = len(log.read_text())
        proc.send_signal(signal.SIGHUP)
        assert wait_log("downloaded lists refreshed: updated the elements of", seen), \
            log.read_text()
        swapped = {**WANT, "office_list": False, "stranger_list": True,
                   "office_list_v6": False, "stranger_list_v6": True}
        assert site.probe(names, swapped) == swapped
        # elements changed, the table was not replaced
        assert _handle(site) == handle, log.read_text()
        plan = json.loads(site.dockfence("plan", "--json", "--policy", str(site.policy)).stdout)
        assert plan["unchanged"] is True, plan["changes"]  # what a fresh apply would write
        # and recorded as an apply records it: status and apply trust the new stamp again
        assert recorded_stamp(site.lab) == live_stamp(site.lab), log.read_text()
        proc_apply = site.dockfence("apply", "--policy", str(site.policy))
        assert "No changes" in proc_apply.stdout, proc_apply.stdout + proc_apply.stderr

        site.serve("html")
        seen = len(log.read_text())
        proc.send_signal(signal.SIGHUP)
        assert wait_log("the answer is an HTML page", seen), log.read_text()
        assert site.probe(names, swapped) == swapped and _handle(site) == handle

        site.serve("other")  # IPv4 only: office's IPv6 set goes, so the structure changes
        seen = len(log.read_text())
        proc.send_signal(signal.SIGHUP)
        assert wait_log("the table's structure changes: applied", seen), log.read_text()
        now = {"office_list": False, "stranger_list": False, "office_list_v6": False,
               "office_except": True, "stranger_except": False}  # the rest still enforced
        assert site.probe(list(now), now) == now
    finally:
        watch.stop()


HELD_POLICY = """\
version: 1
lists:
  office: {url: "http://198.51.100.7:8000/list", refresh: 1h}
containers:
  default: deny
  allow:
    - {container: web, port: 8080, from: office}
    - {container: late, port: 8080, from: office}
"""
BRANCH = '  branch: {url: "http://198.51.100.7:8000/good", refresh: 1h}\n'  # the office's
LATE = 8085


def _late(site: Site) -> list[bool]:
    """office v4, stranger v4 (NAT), office v6, stranger v6 (docker-proxy) to late's port."""
    return site.lab.probe_many([(site.lab.client_ns, *p) for p in (
        (CLIENT_V4, HOST_EXT0_V4, LATE), (CLIENT_V4_ALT, HOST_EXT0_V4, LATE),
        (CLIENT_V6, HOST_EXT0_V6, LATE), (CLIENT_V6_ALT, HOST_EXT0_V6_ALT, LATE))], timeout=1.0)


def test_a_slow_download_does_not_hold_up_dockers_events(site: Site) -> None:
    """watch downloads in a thread of its own: while a download is held open by the server, a
    container started meanwhile is gated at once (by the list watch has); once the download
    completes, the new list is enforced; SIGTERM during a download stops watch at once. The
    stranger refused here gets in without dockfence."""
    lab = site.lab
    policy = lab.base / "held.yaml"
    policy.write_text(HELD_POLICY)
    site.dockfence("remove")
    site.serve("good")
    if (site.state / "lists" / "office.json").exists():
        site.age_copy()
    proc = site.dockfence("apply", "--policy", str(policy))  # a good copy of the office list
    assert proc.returncode == 0, proc.stdout + proc.stderr
    watch = Watching(site, policy)
    try:
        assert watch.wait_log("start:"), watch.log()
        site.serve("held")
        seen = len(watch.log())
        watch.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: site.ask("held-state") == "holding", 30), watch.log()
        lab.run_container("late", [f"{LATE}:8080"], lab.tcp_server_cmd(8080))
        in_out = [True, False, True, False]  # office in, stranger out, both families
        assert wait_for(lambda: _late(site) == in_out, 20), (_late(site), watch.log())
        assert site.ask("held-state") == "holding", watch.log()  # the download still runs
        assert "downloaded lists refreshed" not in watch.log()[seen:]

        site.ask("release")
        assert watch.wait_log("downloaded lists refreshed: updated the elements of", seen), \
            watch.log()
        swapped = [False, True, False, True]  # the list now names the strangers
        assert wait_for(lambda: _late(site) == swapped, 20), (_late(site), watch.log())

        # a policy edit naming a list with no copy yet: applied once the thread downloaded it
        policy.write_text(HELD_POLICY.replace("containers:", BRANCH + "containers:").replace(
            "{container: late, port: 8080, from: office}",
            "{container: late, port: 8080, from: branch}"))
        assert wait_for(lambda: _late(site) == in_out, 30), (_late(site), watch.log())
        assert "the current rules stay until it is downloaded" in watch.log(), watch.log()

        # SIGTERM while a download is held open: watch stops at once, the rules stay
        site.serve("held")
        watch.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: site.ask("held-state") == "holding", 30), watch.log()
        watch.proc.send_signal(signal.SIGTERM)
        assert watch.proc.wait(10) == 0, watch.log()  # the server holds on for 45 s
        assert _late(site) == in_out
    finally:
        site.ask("release")  # the server's handler ends now, whatever happened
        watch.stop()
    # baseline: without dockfence, everyone gets in (the stranger refused above too)
    assert site.dockfence("remove").returncode == 0
    try:
        assert wait_for(lambda: _late(site) == [True] * 4, 30), _late(site)
    finally:
        lab.docker("rm", "-f", "late")
