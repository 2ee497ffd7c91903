"""`dockfence doctor`: does dockfence hold on this host? Line by line ok / warning / failure,
each with the fix. It changes nothing: the kernel check loads a table into a throwaway network
namespace, everything else only reads.

Split in two: `gather()` collects `Facts` at the edges (nft, /proc, the Docker API, systemd);
`evaluate()` turns facts into verdicts and is pure, so every verdict is unit-tested.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import discovery, engine, policy, statedir
from .backends import nftables as nft
from .compile import compile_policy
from .errors import DockfenceError
from .inventory import Binding, Container, Inventory, covered_by_patterns
from .model import Ruleset, find_gate
from .run import run

Level = Literal["ok", "warning", "failure"]

# Tested here: Debian 12's nftables; older 1.0.x should work, 0.9.x lacks what the rules use.
NFT_TESTED = (1, 0, 6)
NFT_MINIMUM = (1, 0, 0)
DOCKER_TESTED = ("20.10", "28.5")
UNITS = ("dockfence-watch.service", "dockfence-restore.service")
UNIT_DIRS = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
# Tables iptables-nft makes (Docker's chains, ufw's, hand-written iptables rules).
XTABLES_NAMES = {"filter", "nat", "mangle", "raw", "security", "broute"}
DOCKER_CHAINS = {"DOCKER", "DOCKER-USER", "DOCKER-FORWARD", "DOCKER-ISOLATION-STAGE-1"}


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Service:
    installed: bool = False
    enabled: bool | None = None  # None: unknown (no systemd)
    active: bool | None = None


@dataclass
class Facts:
    """What gather() found. None means "could not be found out" (said so in the verdict)."""

    is_root: bool = True
    nft_version: str | None = None  # "1.0.6"; None: nft not installed
    kernel_error: str | None = None  # why the kernel refused a table like dockfence's
    kernel_checked: bool = False
    docker_error: str | None = None
    docker_version: str | None = None
    firewall_backend: str | None = None  # /info FirewallBackend.Driver (Engine 28.1+)
    docker_chains: tuple[str, ...] = ()  # iptables variants holding Docker's chains
    ufw_chains: bool = False  # ufw's chains are loaded here (either variant)
    ufw_enabled_conf: bool = False  # /etc/ufw/ufw.conf says ENABLED=yes
    firewalld: bool = False  # firewalld's table or process in this namespace
    other_tables: tuple[str, ...] = ()  # "inet foo": tables nobody above accounts for
    userland_proxy: bool | None = None
    userland_proxy_source: str = ""
    ipv6_forwarding: bool | None = None
    ipv6_networks: tuple[str, ...] = ()  # Docker networks with IPv6
    br_netfilter: bool | None = None
    table_present: bool = False
    applied_record: str | None = None  # a record of an earlier apply (statedir)
    policy_path: str = ""
    policy_error: str | None = None
    policy_matches: bool | None = None  # None: not compared (no policy, no Docker, no table)
    published: int = 0  # published ports reachable from outside
    uncovered: tuple[str, ...] = ()  # of those, the ones the live table does not gate
    unknown_bridges: tuple[str, ...] = ()  # Docker bridges the live table does not know
    systemd: bool = False
    services: dict[str, Service] = field(default_factory=dict)
    watch_process: bool = False  # a `dockfence watch` runs in this network namespace


# --- pure helpers over raw facts ----------------------------------------------------------------

def parse_nft_version(text: str) -> str | None:
    m = re.search(r"v(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else None


def _tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def userland_proxy_of(argv: list[str], daemon_json: str | None) -> tuple[bool, str]:
    """dockerd's userland-proxy setting: its flag wins over daemon.json; the default is on."""
    for arg in argv:
        if arg.startswith("--userland-proxy="):
            return arg.split("=", 1)[1].lower() != "false", f"dockerd flag {arg}"
        if arg == "--userland-proxy":
            # a bare boolean flag means true; `--userland-proxy false` is not how Go parses it
            return True, "dockerd flag --userland-proxy"
    if daemon_json:
        try:
            value = json.loads(daemon_json).get("userland-proxy")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, bool):
            return value, f'daemon.json "userland-proxy": {str(value).lower()}'
    return True, "Docker's default"


def config_file_of(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith("--config-file="):
            return arg.split("=", 1)[1]
        if arg == "--config-file" and i + 1 < len(argv):
            return argv[i + 1]
    return "/etc/docker/daemon.json"


def chain_owners(nft_doc: dict[str, Any] | None) -> tuple[set[str], bool, set[str]]:
    """From `nft -j list chains`: does iptables-nft hold Docker's chains, ufw's chains, and
    which tables exist ("family name")."""
    docker, ufw, tables = False, False, set()
    for obj in (nft_doc or {}).get("nftables", []):
        if "table" in obj:
            tables.add(f"{obj['table']['family']} {obj['table']['name']}")
        chain = obj.get("chain")
        if not chain:
            continue
        tables.add(f"{chain['family']} {chain['table']}")
        docker = docker or chain["name"] in DOCKER_CHAINS
        ufw = ufw or chain["name"].startswith(("ufw-", "ufw6-"))
    return ({"nft"} if docker else set()), ufw, tables


def other_tables(tables: Iterable[str]) -> tuple[str, ...]:
    """Tables besides dockfence's, Docker's and iptables-nft's standard ones."""
    out = []
    for t in sorted(set(tables)):
        family, _, name = t.partition(" ")
        if name == nft.TABLE and family == nft.FAMILY:
            continue
        if name == "docker-bridges" or "firewalld" in name:
            continue  # Docker 29's own, and firewalld (reported by itself)
        if name in XTABLES_NAMES and family in ("ip", "ip6", "arp", "bridge"):
            continue
        out.append(t)
    return tuple(out)


def uncovered_ports(inv: Inventory, live: Ruleset | None) -> tuple[int, tuple[str, ...]]:
    """(published ports reachable from outside, those not gated by the live table). Routed-mode
    bindings are dropped unless allowed (fail closed): covered."""
    exposed: list[tuple[Container, Binding]] = [
        (c, b) for c in inv.containers for b in c.bindings
        if not b.loopback_only and b.host_port is not None and b.proto in ("tcp", "udp")]
    gates = live.container_gates if live else ()
    loose = [f"{c.name} {b.host_endpoint()}/{b.proto}" for c, b in exposed
             if live is None or find_gate(gates, b.proto, b.host_port, b.host_address) is None]
    return len(exposed), tuple(dict.fromkeys(loose))


# --- verdicts -------------------------------------------------------------------------------

def _nft_check(f: Facts) -> Check:
    if f.nft_version is None:
        return Check("nft", "failure", "nft not found",
                     "install nftables (apt-get install nftables)")
    v = _tuple(f.nft_version)
    if v < NFT_MINIMUM:
        return Check("nft", "failure", f"nftables {f.nft_version} is too old (dockfence needs "
                     f"{'.'.join(map(str, NFT_MINIMUM))} or newer)", "upgrade nftables")
    if v < NFT_TESTED:
        return Check("nft", "warning", f"nftables {f.nft_version}: older than the tested "
                     f"{'.'.join(map(str, NFT_TESTED))}", "the kernel check below decides; "
                     "upgrade nftables if it fails")
    return Check("nft", "ok", f"nftables {f.nft_version}")


def _kernel_check(f: Facts) -> Check:
    if not f.kernel_checked:
        why = ("needs root" if not f.is_root else "nft missing" if f.nft_version is None
               else "no throwaway network namespace: `unshare --net` failed")
        return Check("kernel", "warning", f"kernel features not checked ({why})",
                     "run `dockfence doctor` as root, outside a container that forbids "
                     "namespaces")
    if f.kernel_error:
        return Check("kernel", "failure", "the kernel refused a table like dockfence's: "
                     f"{f.kernel_error}", "a kernel with nf_tables, nft_ct, nft_nat, "
                     "nft_objref and interval sets (any mainstream kernel since 5.4); "
                     "`apply` would refuse here and change nothing")
    return Check("kernel", "ok", "nf_tables accepts every feature the rules use (inet table, "
                 "conntrack original destination, interval sets, verdict maps)")


def _docker_checks(f: Facts) -> list[Check]:
    if f.docker_error:
        return [Check("docker", "failure", f"Docker not reachable: {f.docker_error}",
                      "start dockerd, or set DOCKER_HOST to its socket")]
    out = []
    ver = f.docker_version or "?"
    tested = any(ver.startswith(t) for t in DOCKER_TESTED)
    newer = _tuple(ver) >= (29,) if ver != "?" else False
    if tested or newer:
        note = " (checked by hand on 29.7.2, both backends)" if newer else ""
        out.append(Check("docker", "ok", f"Docker {ver} reachable{note}"))
    else:
        out.append(Check("docker", "warning", f"Docker {ver}: not one of the tested versions "
                         f"({', '.join(DOCKER_TESTED)}, 29)", "dockfence relies only on its own "
                         "drops; check the verdicts with `dockfence explain` and real probes"))
    backend = f.firewall_backend
    if backend is None:
        out.append(Check("firewall-backend", "ok", "iptables (Docker before 28.1 does not "
                         "report it)"))
    elif backend in ("iptables", "nftables"):
        extra = (": no DOCKER-USER chain; dockfence's drops hold in any table"
                 if backend == "nftables" else "")
        out.append(Check("firewall-backend", "ok", f"{backend}{extra}"))
    else:
        out.append(Check("firewall-backend", "warning", f"unknown Docker firewall backend "
                         f"{backend!r}", "dockfence's own table still applies; verify with "
                         "probes"))
    chains = set(f.docker_chains)
    if backend == "nftables" and not chains:
        pass  # Docker 29's own tables: no iptables involved
    elif chains == {"nft"}:
        out.append(Check("iptables", "ok", "Docker's chains are in iptables-nft"))
    elif chains == {"legacy"}:
        out.append(Check("iptables", "ok", "Docker drives iptables-legacy: its rules and "
                         "dockfence's nftables table both see every packet, and a drop in "
                         "either is final"))
    elif chains == {"nft", "legacy"}:
        out.append(Check("iptables", "warning", "Docker's chains are in both iptables-legacy "
                         "and iptables-nft (left over from switching the alternative)",
                         "remove the stale set (`iptables-legacy -F/-X` or `iptables-nft -F/-X` "
                         "on the side Docker no longer uses), then restart Docker"))
    else:
        out.append(Check("iptables", "warning", "no Docker chains found in iptables (dockerd "
                         "with --iptables=false?): published ports are then served by "
                         "docker-proxy on the host, which dockfence filters on input",
                         "check dockerd's flags and /etc/docker/daemon.json"))
    if f.userland_proxy is None:
        out.append(Check("userland-proxy", "warning", "could not tell whether docker-proxy "
                         "is used (dockerd not found in this network namespace)",
                         "run doctor in dockerd's network namespace"))
    elif f.userland_proxy:
        out.append(Check("userland-proxy", "ok", f"on ({f.userland_proxy_source}): IPv6 to "
                         "IPv4-only containers goes through docker-proxy on the host, which "
                         "dockfence filters on the input path"))
    else:
        out.append(Check("userland-proxy", "ok", f"off ({f.userland_proxy_source}): every "
                         "published port goes through Docker's NAT, which dockfence filters "
                         "on the forward path; IPv4-only containers are not reachable over "
                         "IPv6"))
    return out


def _kernel_settings(f: Facts) -> list[Check]:
    out = []
    if f.ipv6_forwarding is None:
        out.append(Check("ipv6-forwarding", "warning", "cannot read "
                         "net.ipv6.conf.all.forwarding"))
    elif f.ipv6_forwarding:
        out.append(Check("ipv6-forwarding", "ok", "on: IPv6 is routed to containers; "
                         "dockfence drops direct routing to container addresses"))
    elif f.ipv6_networks:
        out.append(Check("ipv6-forwarding", "warning", "off, but Docker network(s) "
                         f"{', '.join(f.ipv6_networks)} have IPv6: their containers are not "
                         "reachable over IPv6 through NAT",
                         "sysctl -w net.ipv6.conf.all.forwarding=1 (Docker 28+ does it when "
                         "ip6tables is on)"))
    else:
        out.append(Check("ipv6-forwarding", "ok", "off (no Docker network has IPv6)"))
    if f.br_netfilter is None:
        out.append(Check("br_netfilter", "ok", "not loaded: traffic bridged between containers "
                         "skips netfilter (dockfence only filters what comes from outside)"))
    else:
        state = "on" if f.br_netfilter else "off"
        out.append(Check("br_netfilter", "ok", f"loaded, bridge-nf-call-iptables {state}: "
                         "traffic between containers on one bridge is accepted by dockfence "
                         "(it comes from a Docker bridge)"))
    return out


def _other_firewalls(f: Facts) -> Check:
    found = []
    if f.ufw_chains:
        found.append("ufw (its chains are loaded)")
    elif f.ufw_enabled_conf:
        found.append("ufw (enabled in /etc/ufw/ufw.conf, chains not loaded here)")
    if f.firewalld:
        found.append("firewalld")
    found += [f"nftables table {t}" for t in f.other_tables]
    if not found:
        return Check("other-firewalls", "ok", "none besides Docker's rules")
    return Check("other-firewalls", "warning", f"also filtering here: {'; '.join(found)}. A "
                 "packet gets through only if every one of them lets it (a drop is final in "
                 "any table); dockfence's table is untouched by their reloads",
                 "decide host ports in one place; allow in ufw/firewalld what dockfence "
                 "admits, or its drops win (see README: Living beside ufw and firewalld)")


def _table_check(f: Facts) -> Check:
    if not f.table_present:
        if f.applied_record:
            return Check("table", "failure", "table inet dockfence is missing (flushed?): it "
                         f"was applied before ({f.applied_record}) and is gone, so nothing is "
                         "filtered (`nft flush ruleset`, e.g. `systemctl restart nftables`, "
                         "removes it)", "dockfence apply (a running `dockfence watch` puts it "
                         "back by itself)")
        return Check("table", "failure", "dockfence is not applied: nothing is filtered",
                     f"dockfence apply --policy {f.policy_path}")
    if f.policy_error:
        return Check("table", "failure", f"applied, but the policy cannot be read: "
                     f"{f.policy_error}", "fix the policy (`dockfence check`)")
    if f.policy_matches is None:
        return Check("table", "ok", "applied (not compared with the policy: Docker unreachable)")
    if not f.policy_matches:
        return Check("table", "warning", f"applied, but differs from {f.policy_path} and the "
                     "running containers", "dockfence plan, then dockfence apply (or run "
                     "dockfence watch)")
    return Check("table", "ok", f"applied and matches {f.policy_path} and the running "
                 "containers")


def _services(f: Facts) -> list[Check]:
    out = []
    for unit in UNITS:
        s = f.services.get(unit, Service())
        what = "re-applies on Docker events" if "watch" in unit else "restores the table at boot"
        fix = f"cp contrib/{unit} /etc/systemd/system/ && systemctl enable --now {unit}"
        if not f.systemd:
            if "watch" in unit and f.watch_process:
                out.append(Check(unit, "ok", "no systemd; a `dockfence watch` runs"))
            else:
                command = "watch" if "watch" in unit else "apply"
                out.append(Check(unit, "warning", f"no systemd here: nothing {what} unless your "
                                 "init system runs it",
                                 f"start `dockfence {command}` from your init system"))
        elif not s.installed:
            out.append(Check(unit, "warning", f"not installed: nothing {what}", fix))
        elif not s.enabled:
            out.append(Check(unit, "warning", "installed but not enabled", fix))
        elif "watch" in unit and not s.active:
            out.append(Check(unit, "warning", "enabled but not running",
                             f"systemctl start {unit}; journalctl -u {unit}"))
        else:
            out.append(Check(unit, "ok", "enabled" + (" and running" if s.active else "")))
    return out


def _ports_check(f: Facts) -> Check:
    if f.docker_error:
        return Check("published-ports", "warning", "not checked: Docker not reachable")
    if not f.published:
        return Check("published-ports", "ok", "no container port is published")
    if f.uncovered:
        shown = ", ".join(f.uncovered[:5]) + (" ..." if len(f.uncovered) > 5 else "")
        why = ("dockfence is not applied" if not f.table_present else
               "published after the last apply")
        return Check("published-ports", "failure", f"{len(f.uncovered)} of {f.published} "
                     f"published port(s) not gated ({why}): {shown}",
                     "dockfence apply (or run dockfence watch)")
    if f.unknown_bridges:
        return Check("published-ports", "warning", f"Docker network bridge(s) "
                     f"{', '.join(f.unknown_bridges)} appeared after the last apply: ports first "
                     "published there are not filtered", "dockfence apply")
    return Check("published-ports", "ok", f"all {f.published} published port(s) are gated")


def evaluate(f: Facts) -> list[Check]:
    """Every verdict, in the order an operator would fix them."""
    return [_nft_check(f), _kernel_check(f), *_docker_checks(f), *_kernel_settings(f),
            _other_firewalls(f), _table_check(f), _ports_check(f), *_services(f)]


def failed(checks: list[Check]) -> bool:
    return any(c.level == "failure" for c in checks)


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not failed(checks),
            "failures": sum(c.level == "failure" for c in checks),
            "warnings": sum(c.level == "warning" for c in checks),
            "checks": [asdict(c) for c in checks]}


# --- gathering facts (the side effects) -----------------------------------------------------

# A policy and host that use every kind of rule render() emits: the kernel check loads exactly
# what dockfence would, so a kernel that refuses it would refuse `apply` too.
_PROBE_POLICY = """\
version: 1
host:
  default: deny
  allow:
    - port: 22/tcp
      from: [198.51.100.0/24, "2001:db8::/32"]
containers:
  default: deny
  allow:
    - container: web
      port: 8080/tcp
      from: [203.0.113.0/24, "2001:db8:1::/64"]
    - host_port: 5353/udp
      from: any
"""
_PROBE_INVENTORY = Inventory(
    containers=(Container("web", "w" * 12, None, (
        Binding("tcp", "0.0.0.0", 8081, 8080), Binding("tcp", "::", None, 8080),
        Binding("udp", "0.0.0.0", 5353, 5353)), ("172.17.0.2", "2001:db8:78::2"),
        routed_addresses=("2001:db8:78::2",)),),
    bridges=("docker0",),
)


def probe_table() -> str:
    return nft.render(compile_policy(policy.parse(_PROBE_POLICY, "doctor"), _PROBE_INVENTORY))


def _try(fn: Callable[[], Any], default: Any = None) -> Any:
    try:
        return fn()
    except (DockfenceError, OSError, ValueError, KeyError):
        return default


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _flag(path: str) -> bool | None:
    text = _read(path)
    return None if text is None else text.strip() == "1"


def _same_netns_pids(comm: set[str]) -> list[tuple[int, list[str]]]:
    """Processes in this network namespace whose name is in comm (an entry ending in * is a
    prefix), with their argv."""
    prefixes = tuple(c[:-1] for c in comm if c.endswith("*"))
    try:
        mine = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return []
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            name = Path(f"/proc/{entry.name}/comm").read_text().strip()
            if name not in comm and not (prefixes and name.startswith(prefixes)):
                continue
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino != mine:
                continue
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            out.append((int(entry.name), [a.decode(errors="replace") for a in argv if a]))
        except OSError:
            continue
    return out


def _legacy_docker_chains() -> tuple[bool, bool]:
    """(Docker's chains, ufw's chains) in iptables-legacy, for both families."""
    docker = ufw = False
    for names, tool in (("/proc/net/ip_tables_names", "iptables-legacy-save"),
                        ("/proc/net/ip6_tables_names", "ip6tables-legacy-save")):
        if not (_read(names) or "").strip():
            continue  # no legacy table exists: nothing to list (and nothing gets created)
        text = _try(lambda tool=tool: run([tool], check=False).stdout, "")
        docker = docker or bool(re.search(r"^:DOCKER(-USER|-FORWARD)? ", text, re.M))
        ufw = ufw or bool(re.search(r"^:ufw6?-", text, re.M))
    return docker, ufw


def _services_state() -> tuple[bool, dict[str, Service]]:
    systemd = Path("/run/systemd/system").is_dir()
    services = {}
    for unit in UNITS:
        installed = any(Path(d, unit).exists() for d in UNIT_DIRS)
        enabled = active = None
        if systemd and installed:
            enabled = _try(lambda u=unit: run(["systemctl", "is-enabled", u],
                                              check=False).returncode == 0, False)
            active = _try(lambda u=unit: run(["systemctl", "is-active", u],
                                             check=False).returncode == 0, False)
        services[unit] = Service(installed, enabled, active)
    return systemd, services


def gather(policy_path: str) -> Facts:
    f = Facts(is_root=os.geteuid() == 0, policy_path=policy_path)
    version = _try(lambda: run(["nft", "--version"]).stdout)
    f.nft_version = parse_nft_version(version) if version else None
    # a throwaway namespace first: without one (no CAP_SYS_ADMIN) the kernel is not asked at all
    sandbox = _try(lambda: run(["unshare", "--net", "--", "true"], check=False).returncode == 0)
    if f.nft_version and f.is_root and sandbox:
        f.kernel_checked = True
        try:
            nft.canonical_of(probe_table())
        except DockfenceError as exc:
            f.kernel_error = str(exc)

    # Docker's chains, ufw's and everybody else's tables
    chains = _try(lambda: json.loads(run(["nft", "-j", "list", "chains"]).stdout))
    tables = _try(lambda: json.loads(run(["nft", "-j", "list", "tables"]).stdout))
    variants, f.ufw_chains, names = chain_owners(chains)
    names |= chain_owners(tables)[2]
    legacy_docker, legacy_ufw = _legacy_docker_chains()
    f.docker_chains = tuple(sorted(variants | ({"legacy"} if legacy_docker else set())))
    f.ufw_chains = f.ufw_chains or legacy_ufw
    f.ufw_enabled_conf = bool(re.search(r"^ENABLED=yes", _read("/etc/ufw/ufw.conf") or "",
                                        re.M | re.I))
    f.firewalld = any("firewalld" in t for t in names) or bool(_same_netns_pids({"firewalld"}))
    f.other_tables = other_tables(names)

    f.ipv6_forwarding = _flag("/proc/sys/net/ipv6/conf/all/forwarding")
    if Path("/proc/sys/net/bridge").is_dir():
        f.br_netfilter = _flag("/proc/sys/net/bridge/bridge-nf-call-iptables")

    dockerd = _same_netns_pids({"dockerd"})
    if dockerd:
        argv = dockerd[0][1]
        f.userland_proxy, f.userland_proxy_source = userland_proxy_of(
            argv, _read(config_file_of(argv)))
        if f.userland_proxy and _same_netns_pids({"docker-proxy"}):
            f.userland_proxy_source += "; docker-proxy is running"

    live_doc = _try(nft.live_json)
    f.table_present = live_doc is not None
    f.applied_record = statedir.applied_record()
    live = _try(lambda: nft.parse_live(live_doc)) if live_doc is not None else None
    inv: Inventory | None = None
    try:
        daemon = discovery.daemon_facts()
        f.docker_version = daemon.version
        f.firewall_backend = daemon.firewall_backend
        f.ipv6_networks = daemon.ipv6_networks
        inv = discovery.inventory()
    except DockfenceError as exc:
        f.docker_error = str(exc)
    if inv is not None:
        f.published, f.uncovered = uncovered_ports(inv, live)
        if live is not None:
            f.unknown_bridges = tuple(sorted(b for b in set(inv.bridges) - set(live.docker_bridges)
                                             if not covered_by_patterns(b)))
    if f.table_present:
        try:
            pol = policy.load(policy_path)
            if inv is not None:
                # the engine's own notion of "the live table is what apply would write"
                f.policy_matches = engine.enforced(pol, inv)[1]
        except DockfenceError as exc:
            f.policy_error = str(exc)

    f.systemd, f.services = _services_state()
    f.watch_process = any(
        "watch" in argv and any("dockfence" in a for a in argv[:3])
        for _, argv in _same_netns_pids({"dockfence", "python*"}))
    return f

