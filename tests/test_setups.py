"""Docker hosts as they are really set up, with real packets: the userland proxy turned off,
dockerd driving iptables-legacy, and ufw enabled beside dockfence (plus a firewalld-style reload),
each on Docker 20.10 and 28.5; and `dockfence doctor`'s verdicts on each.

One lab per setup, alive only while that setup's tests run (module-scoped, parametrized). Every
setup runs the same path matrix: first without dockfence (the baseline), then under POLICY. A
probe may get in after `apply` only if it got in before and the policy admits it, and every
probe the policy admits and that got in before must still get in: `after == baseline and
allowed`, row by row. Rows whose baseline did not get in are paths this setup does not have
(e.g. IPv6 to an IPv4-only container with the userland proxy off); they are reported in the
matrix, never counted as dockfence's denials.

ufw runs only inside the lab's host namespace, with its state redirected (`--datadir`) to a copy
of /etc/ufw under the lab's directory: the machine's own /etc/ufw (ENABLED=no) is checked to be
byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    HOST_EXT1_V4,
    NETNS_DIR,
    SYSTEM_PATH,
    Lab,
    probe_from,
    socket_in_netns,
)

from conftest import docker_bin_dir, lab_skip_reason, unique_lab_name

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 1.0  # one honest attempt; a path expected to get in is retried (probe_all)
RETRY_TIMEOUT, RETRIES = 5.0, 2
V6NET = "2001:db8:77::/64"

POLICY = """\
version: 1
lists:
  office: [203.0.113.0/28, "2001:db8:1::/64"]
host:
  default: deny
  allow:
    - port: 22/tcp
      from: any
containers:
  default: deny
  allow:
    - container: web4
      port: 8080/tcp
      from: office
    - container: web6
      port: 8080/tcp
      from: office
    - container: echo
      port: 5353/udp
      from: office
"""

# setup -> (Docker flavour, Lab options, ufw enabled)
SETUPS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "proxy-off/20.10": ("system", {"dockerd_args": ["--userland-proxy=false"]}, False),
    "proxy-off/28.5": ("docker28", {"dockerd_args": ["--userland-proxy=false"]}, False),
    "legacy/20.10": ("system", {"iptables": "legacy"}, False),
    "legacy/28.5": ("docker28", {"iptables": "legacy"}, False),
    "ufw/20.10": ("system", {}, True),
    "ufw/28.5": ("docker28", {}, True),
}


# ufw's state on the machine itself: must stay as it was (ENABLED=no)
MACHINE_UFW = ("/etc/ufw", "/etc/default/ufw", "/lib/ufw")


@dataclass(frozen=True)
class Row:
    client: str  # "c" (ext0 side) or "d" (ext1 side)
    src: str
    dst: str  # an address, or "web4"/"web6" for the container's own address
    port: int
    proto: str
    allowed: bool  # what POLICY says


# From outside: every path into the two containers and the host, office vs stranger.
ROWS = {
    "nat v4 office 8081": Row("c", CLIENT_V4, HOST_EXT0_V4, 8081, "tcp", True),
    "nat v4 stranger 8081": Row("c", CLIENT_V4_ALT, HOST_EXT0_V4, 8081, "tcp", False),
    "nat v4 branch nic2 8081": Row("d", CLIENT2_V4, HOST_EXT1_V4, 8081, "tcp", False),
    "v6 office 8081 (v4-only container)": Row("c", CLIENT_V6, HOST_EXT0_V6, 8081, "tcp", True),
    "v6 stranger 8081 (v4-only container)": Row("c", CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 8081,
                                                "tcp", False),
    "v6 office 8090 (v6 container)": Row("c", CLIENT_V6, HOST_EXT0_V6, 8090, "tcp", True),
    "v6 stranger 8090 (v6 container)": Row("c", CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 8090, "tcp",
                                           False),
    "v4 office 8090 (v6 container)": Row("c", CLIENT_V4, HOST_EXT0_V4, 8090, "tcp", True),
    "v4 stranger 8090 (v6 container)": Row("c", CLIENT_V4_ALT, HOST_EXT0_V4, 8090, "tcp",
                                           False),
    "udp v4 office 5353": Row("c", CLIENT_V4, HOST_EXT0_V4, 5353, "udp", True),
    "udp v4 stranger 5353": Row("c", CLIENT_V4_ALT, HOST_EXT0_V4, 5353, "udp", False),
    "udp v6 office 5353": Row("c", CLIENT_V6, HOST_EXT0_V6, 5353, "udp", True),
    "udp v6 stranger 5353": Row("c", CLIENT_V6_ALT, HOST_EXT0_V6_ALT, 5353, "udp", False),
    "direct v4 stranger": Row("c", CLIENT_V4_ALT, "web4", 8080, "tcp", False),
    "direct v6 stranger": Row("c", CLIENT_V6_ALT, "web6", 8080, "tcp", False),
    "host 22 stranger": Row("c", CLIENT_V4_ALT, HOST_EXT0_V4, 22, "tcp", True),
    "host 2222 office": Row("c", CLIENT_V4, HOST_EXT0_V4, 2222, "tcp", False),
}
# The host reaching its own published ports: dockfence never changes these.
OWN = {
    "own 127.0.0.1:8081": ("127.0.0.1", "127.0.0.1", 8081),
    "own [::1]:8081": ("::1", "::1", 8081),
    "own ext0 v4 :8081": (HOST_EXT0_V4, HOST_EXT0_V4, 8081),
    "own ext0 v6 :8081": (HOST_EXT0_V6, HOST_EXT0_V6, 8081),
    "own ext0 v4 :8090": (HOST_EXT0_V4, HOST_EXT0_V4, 8090),
    "own ext0 v6 :8090": (HOST_EXT0_V6, HOST_EXT0_V6, 8090),
}
# Paths every setup must have without dockfence, or the matrix proves nothing.
MUST_HAVE = ("nat v4 office 8081", "nat v4 stranger 8081", "udp v4 stranger 5353",
             "v4 stranger 8090 (v6 container)", "own 127.0.0.1:8081", "own ext0 v4 :8081")


@dataclass
class Setup:
    name: str
    lab: Lab
    docker28: bool
    policy: Path
    ips: dict[str, str]
    raw_baseline: dict[str, bool] = field(default_factory=dict)  # before ufw too
    baseline: dict[str, bool] = field(default_factory=dict)  # what dockfence starts from
    pristine: str = ""  # `nft -s list ruleset` before dockfence
    enforced: dict[str, bool] = field(default_factory=dict)  # under POLICY
    ufw_data: Path | None = None


def dockfence(lab: Lab, *args: str, env: dict[str, str] | None = None) -> Any:
    """The CLI on the lab's host, its state (records of applies) kept in the lab's directory:
    /var/lib/dockfence is the machine's, shared by every namespace."""
    own = {"PYTHONPATH": str(REPO), "COLUMNS": "200",
           "DOCKFENCE_STATE_DIR": str(lab.base / "state")}
    return lab.host_exec(sys.executable, "-m", "dockfence", *args, check=False, timeout=120,
                         env={**own, **(env or {})})


HTTP_GET, PAGE = b"GET / HTTP/1.0\r\n\r\n", b"hello from dockfence lab"
BANNER = b"SSH-2.0-lab"


def served(netns: str, src: str, dst: str, port: int, proto: str,
           timeout: float = TIMEOUT) -> bool:
    """True when the real server answers: the container's page, the host service's banner, the
    UDP echo. A bare TCP handshake is not enough: with the userland proxy off, Docker 20.10's
    dockerd listens on published ports to reserve them and never answers."""
    if proto == "udp":
        return probe_from(netns, src, dst, port, "udp", timeout)
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket_in_netns(netns, family, socket.SOCK_STREAM)
    want = BANNER if port in (22, 2222) else PAGE
    deadline = time.monotonic() + timeout
    try:
        sock.bind((src, 0))
        sock.settimeout(timeout)
        sock.connect((dst, port))
        if want == PAGE:
            sock.sendall(HTTP_GET)
        got = b""
        while want not in got and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
        return want in got
    except OSError:  # refused, unreachable, timed out
        return False
    finally:
        sock.close()


HAIRPIN = "hairpin web6 -> ext0:8081"


def probe_all(s: Setup, want: dict[str, bool] | None = None) -> dict[str, bool]:
    """Every path at once, one attempt each. With `want`, a path that should get in and did
    not is tried again (a loaded machine is not a verdict); one that should stay out keeps its
    single attempt, and one that got in is a leak whatever a retry would say."""
    lab = s.lab
    ns = {"c": lab.client_ns, "d": lab.client2_ns}
    specs = {name: (ns[r.client], r.src, s.ips.get(r.dst, r.dst), r.port, r.proto)
             for name, r in ROWS.items()}
    specs |= {name: (lab.host_ns, src, dst, port, "tcp") for name, (src, dst, port) in OWN.items()}

    def one(name: str, timeout: float) -> bool:
        return hairpin(lab, timeout) if name == HAIRPIN else served(*specs[name], timeout)

    names = [*specs, HAIRPIN]
    with ThreadPoolExecutor(len(names)) as pool:
        got = dict(zip(names, pool.map(lambda n: one(n, TIMEOUT), names), strict=True))
        for _ in range(RETRIES if want else 0):
            again = [n for n in names if want and want.get(n) and not got[n]]
            if not again:
                break
            got.update(zip(again, pool.map(lambda n: one(n, RETRY_TIMEOUT), again), strict=True))
    return got


def hairpin(lab: Lab, timeout: float = TIMEOUT) -> bool:
    """A container reaching another container's published port on the host's address."""
    out = lab.docker("exec", "web6", "sh", "-c",
                     f'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w {max(1, round(timeout))} '
                     f"{HOST_EXT0_V4} 8081", check=False, timeout=30).stdout
    return PAGE.decode() in out


def nft_ruleset(lab: Lab) -> str:
    return str(lab.host_exec("nft", "-s", "list", "ruleset").stdout)


def legacy_rules(lab: Lab) -> str:
    """iptables-legacy state of both families, chain counters stripped."""
    text = ""
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text += lab.host_exec(tool, check=False).stdout
    return re.sub(r"^(:\S+ \S+) \[\d+:\d+\]$", r"\1", re.sub(r"^#.*\n", "", text, flags=re.M),
                  flags=re.M)


def files_digest(*paths: str) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def ufw(s: Setup, *args: str) -> str:
    """Debian's ufw in the lab's host namespace, its state in the lab's copy of /etc/ufw."""
    assert s.ufw_data is not None
    proc = s.lab.host_exec("ufw", "--rootdir=/", f"--datadir={s.ufw_data}", *args, check=False)
    assert proc.returncode == 0, f"ufw {args}: {proc.stdout}{proc.stderr}"
    return str(proc.stdout)


def enable_ufw(s: Setup) -> None:
    data = s.lab.base / "ufw"
    (data / "etc" / "default").mkdir(parents=True)
    (data / "lib" / "ufw").mkdir(parents=True)
    shutil.copytree("/etc/ufw", data / "etc" / "ufw")
    defaults = Path("/etc/default/ufw").read_text()
    # the sysctls ufw sets are per network namespace, but take them from the copy anyway
    defaults = re.sub(r"^IPT_SYSCTL=.*$", f"IPT_SYSCTL={data}/etc/ufw/sysctl.conf", defaults,
                      flags=re.M)
    (data / "etc" / "default" / "ufw").write_text(defaults)
    s.ufw_data = data
    ufw(s, "default", "deny", "incoming")
    ufw(s, "allow", "22/tcp")
    ufw(s, "allow", "8081/tcp")  # the docker-proxy path of web4 (INPUT): ufw must admit it
    ufw(s, "--force", "enable")
    assert "Status: active" in ufw(s, "status", "verbose")


@pytest.fixture(scope="module", params=list(SETUPS))
def host(request: pytest.FixtureRequest) -> Iterator[Setup]:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    flavour, options, with_ufw = SETUPS[request.param]
    if with_ufw and shutil.which("ufw", path=SYSTEM_PATH) is None:
        pytest.skip("ufw not installed (apt-get install ufw)")
    machine_ufw = files_digest(*MACHINE_UFW)
    lab = Lab(unique_lab_name(flavour), docker_bin_dir=docker_bin_dir(flavour), **options)
    try:
        lab.start()
        lab.docker("network", "create", "--ipv6", "--subnet", V6NET, "v6net")
        lab.run_container("web4", ["8081:8080"], lab.tcp_server_cmd(8080))
        lab.run_container("web6", ["8090:8080"], lab.tcp_server_cmd(8080), network="v6net")
        lab.run_container("echo", ["5353:5353/udp"], lab.udp_server_cmd(5353))
        lab.listen(lab.host_ns, 22, banner=BANNER + b"\r\n")
        lab.listen(lab.host_ns, 2222, banner=BANNER + b"\r\n")
        policy = lab.base / "policy.yaml"
        policy.write_text(POLICY)
        ips = {"web4": lab.container_ip("web4"), "web6": lab.container_ip("web6", 6)}
        s = Setup(request.param, lab, flavour == "docker28", policy, ips)
        deadline = time.monotonic() + 60
        everything = dict.fromkeys([*ROWS, *OWN, HAIRPIN], True)
        while True:  # the servers may still be starting
            s.raw_baseline = probe_all(s, everything)
            if all(s.raw_baseline[n] for n in MUST_HAVE) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        s.baseline = s.raw_baseline
        if with_ufw:
            enable_ufw(s)
            s.baseline = probe_all(s, s.raw_baseline)
        s.pristine = nft_ruleset(lab)
        yield s
    finally:
        lab.stop()
        assert files_digest(*MACHINE_UFW) == machine_ufw, \
            "the machine's own ufw files changed"


def apply(s: Setup) -> None:
    proc = dockfence(s.lab, "apply", "--policy", str(s.policy))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def show(s: Setup, after: dict[str, bool]) -> str:
    def word(ok: bool) -> str:
        return "in" if ok else "--"

    lines = [f"{s.name}: path | without dockfence | with dockfence | policy"]
    for name in s.baseline:
        policy_says = "(host's own)" if name not in ROWS else \
            "allow" if ROWS[name].allowed else "deny"
        raw = "" if s.raw_baseline[name] == s.baseline[name] else \
            f" (before ufw: {word(s.raw_baseline[name])})"
        lines.append(f"  {name:40} {word(s.baseline[name])}{raw:20} {word(after[name]):6} "
                     f"{policy_says}")
    return "\n".join(lines)


def policy_wants(s: Setup) -> dict[str, bool]:
    """Under POLICY: what got in without dockfence and the policy allows (the host's own
    connections always)."""
    return {name: base and (ROWS[name].allowed if name in ROWS else True)
            for name, base in s.baseline.items()}


def doctor_json(s: Setup, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = dockfence(s.lab, "doctor", "--json", "--policy", str(s.policy), env=env)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in report["checks"]}


# --- the tests (in file order, per setup) ---------------------------------------------------

def test_doctor_before_apply(host: Setup) -> None:
    """Not applied: failure (exit 1), naming the published ports that anyone reaches; and the
    setup itself recognised: userland proxy, iptables variant, ufw."""
    code, report = doctor_json(host)
    checks = by_name(report)
    assert code == 1 and not report["ok"], report
    assert checks["table"]["level"] == "failure" and "not applied" in checks["table"]["message"]
    ports = checks["published-ports"]
    assert ports["level"] == "failure" and "web4" in ports["message"], ports
    assert checks["kernel"]["level"] == "ok" and checks["nft"]["level"] == "ok"
    assert checks["docker"]["level"] == "ok"
    proxy = checks["userland-proxy"]["message"]
    assert proxy.startswith("off" if "proxy-off" in host.name else "on"), proxy
    variant = checks["iptables"]["message"]
    assert ("iptables-legacy" if "legacy" in host.name else "iptables-nft") in variant, variant
    others = checks["other-firewalls"]
    if host.ufw_data:
        assert others["level"] == "warning" and "ufw" in others["message"], others
    else:
        assert others["level"] == "ok", others


def test_path_matrix(host: Setup) -> None:
    s = host
    missing = [n for n in MUST_HAVE if not s.raw_baseline[n]]
    assert not missing, f"{s.name}: no baseline for {missing}: the lab is broken"
    apply(s)
    wants = policy_wants(s)
    after = s.enforced = probe_all(s, wants)
    print("\n" + show(s, after))
    wrong = []
    for name, base in s.baseline.items():
        want = wants[name]
        if after[name] != want:
            wrong.append(f"{name}: without dockfence {'in' if base else 'blocked'}, expected "
                         f"{'in' if want else 'blocked'}, got {'in' if after[name] else 'blocked'}")
    assert not wrong, f"{s.name}:\n  " + "\n  ".join(wrong)
    denied = [n for n, r in ROWS.items() if not r.allowed and s.baseline[n]]
    assert len(denied) >= 4, f"{s.name}: too few denials proven against a baseline: {denied}"


def test_setup_specific_paths(host: Setup) -> None:
    """What each setup changes, so the matrix is not vacuous where it matters."""
    s, b = host, host.raw_baseline
    if "proxy-off" in s.name:
        proxies = s.lab.host_exec("ss", "-Hltnp").stdout
        assert "docker-proxy" not in proxies, proxies
        # no docker-proxy: an IPv4-only container has no IPv6 path at all
        assert not b["v6 office 8081 (v4-only container)"]
        # IPv6 to the IPv6 container: ip6 NAT on 28.5; nothing on 20.10 (no ip6tables rules,
        # and its dockerd only holds the port: it listens and never answers)
        assert b["v6 stranger 8090 (v6 container)"] == s.docker28
    else:
        assert b["v6 stranger 8081 (v4-only container)"], "docker-proxy serves [::]:8081"
    if "legacy" in s.name:
        assert "DNAT" in legacy_rules(s.lab) and "DOCKER" in legacy_rules(s.lab)
        assert "DOCKER" not in nft_ruleset(s.lab), "Docker's chains went to iptables-nft"


def test_doctor_after_apply(host: Setup) -> None:
    apply(host)  # already applied by the matrix: "No changes"; here so the test runs alone
    code, report = doctor_json(host)
    checks = by_name(report)
    assert code == 0 and report["ok"], report
    assert checks["table"]["level"] == "ok" and "matches" in checks["table"]["message"]
    assert checks["published-ports"]["level"] == "ok", checks["published-ports"]


def test_doctor_sees_a_running_watch(host: Setup) -> None:
    """No systemd in the lab: the watch service is a warning, unless a `dockfence watch` runs
    in the host's namespace."""
    s, lab = host, host.lab
    if s.name != "proxy-off/28.5":
        pytest.skip("one setup is enough: the check does not depend on the daemon")
    _, report = doctor_json(s)
    assert by_name(report)["dockfence-watch.service"]["level"] == "warning"
    log = lab.base / "watch.log"
    env = {**os.environ, "DOCKER_HOST": lab.docker_host, "PYTHONPATH": str(REPO),
           "DOCKFENCE_STATE_DIR": str(lab.base / "state")}
    with log.open("w") as out:
        watch = subprocess.Popen(
            ["nsenter", f"--net={NETNS_DIR / lab.host_ns}", sys.executable, "-m", "dockfence",
             "watch", "--policy", str(s.policy)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while "start:" not in log.read_text():
            assert watch.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        _, report = doctor_json(s)
        unit = by_name(report)["dockfence-watch.service"]
        assert unit["level"] == "ok" and "watch` runs" in unit["message"], unit
    finally:
        watch.terminate()
        watch.wait(10)


def test_doctor_port_published_after_apply(host: Setup) -> None:
    lab = host.lab
    apply(host)
    lab.run_container("late", ["8095:8080"], lab.tcp_server_cmd(8080))
    try:
        code, report = doctor_json(host)
        checks = by_name(report)
        assert code == 1
        assert checks["published-ports"]["level"] == "failure"
        assert "late" in checks["published-ports"]["message"]
        assert checks["table"]["level"] == "warning"  # differs from policy + containers
    finally:
        lab.docker("rm", "-f", "late")


def test_other_tables_reload_leaves_dockfence_alone(host: Setup) -> None:
    """A firewalld-style reload: its own nft table deleted and rebuilt, every iptables table
    flushed and rebuilt from a save (DOCKER-USER emptied and refilled), and ufw reloaded. The
    dockfence table stays byte-identical and every verdict stays."""
    s, lab = host, host.lab
    fw = ("table inet firewalld {\n chain filter_INPUT {\n"
          "  type filter hook input priority filter + 10; policy accept;\n"
          "  ct state established,related accept\n }\n}\n")
    lab.host_exec("nft", "-f", "-", input=fw)
    ours = str(lab.host_exec("nft", "-s", "list", "table", "inet", "dockfence").stdout)
    apply(s)
    before = s.enforced or probe_all(s, policy_wants(s))  # under POLICY, before any reload
    lab.host_exec("nft", "-f", "-", input="delete table inet firewalld\n" + fw)
    for save, restore in (("iptables-save", "iptables-restore"),
                          ("ip6tables-save", "ip6tables-restore")):
        saved = lab.host_exec(save).stdout
        lab.host_exec(restore, input=saved)  # flushes every table it names, then refills
    if s.ufw_data:
        ufw(s, "reload")
    after_tables = str(lab.host_exec("nft", "-s", "list", "table", "inet", "dockfence").stdout)
    assert after_tables == ours
    after = probe_all(s, before)
    assert after == before, {n: (before[n], after[n]) for n in after if after[n] != before[n]}
    _, report = doctor_json(s)
    assert "firewalld" in by_name(report)["other-firewalls"]["message"]


def test_remove_leaves_every_other_table(host: Setup) -> None:
    s, lab = host, host.lab
    apply(s)
    before_nft, before_legacy = nft_ruleset(lab), legacy_rules(lab)
    proc = dockfence(lab, "remove")
    assert proc.returncode == 0 and "Removed" in proc.stdout, proc
    after_nft = nft_ruleset(lab)
    assert "dockfence" not in after_nft
    assert after_nft == _without(before_nft, "table inet dockfence {")
    assert legacy_rules(lab) == before_legacy
    got = probe_all(s, s.baseline)
    assert got == s.baseline, {n: (s.baseline[n], got[n]) for n in got if got[n] != s.baseline[n]}


def test_flushed_table_is_reported(host: Setup) -> None:
    """`nft flush ruleset` (what `systemctl restart nftables` does on Debian) takes dockfence's
    table away; with a record of an earlier apply, status and doctor say it is missing."""
    s, lab = host, host.lab
    if s.name != "proxy-off/20.10":
        pytest.skip("one setup is enough: the check does not depend on the daemon")
    apply(s)
    state = lab.base / "state"
    state.mkdir(exist_ok=True)
    if not any(state.iterdir()):  # until apply writes the record itself (issue 6)
        (state / "applied.nft").write_text("table inet dockfence {}\n")
    lab.host_exec("nft", "flush", "ruleset")
    env = {"DOCKFENCE_STATE_DIR": str(state)}
    code, report = doctor_json(s, env=env)
    table = by_name(report)["table"]
    assert code == 1 and table["level"] == "failure", table
    assert "missing (flushed?)" in table["message"], table
    status = dockfence(lab, "status", env=env)
    assert "missing (flushed?)" in status.stdout + status.stderr, status
    # without a record it is simply "not applied"
    code, report = doctor_json(s, env={"DOCKFENCE_STATE_DIR": str(lab.base / "none")})
    assert "not applied" in by_name(report)["table"]["message"]


def _without(listing: str, header: str) -> str:
    out, skip = [], False
    for line in listing.splitlines(keepends=True):
        if line.startswith(header):
            skip = True
        elif skip and line.rstrip("\n") == "}":
            skip = False
        elif not skip:
            out.append(line)
    return "".join(out)
