"""`dockfence doctor`'s verdicts, from facts (pure: no root, no Docker). What it finds on real
hosts is tested per setup in test_setups."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from dockfence import cli, doctor, policy
from dockfence.compile import compile_policy
from dockfence.doctor import Check, Facts, Service, evaluate
from dockfence.inventory import Binding, Container, Inventory

from helpers import POLICY, scenario

ALL_UNITS = {u: Service(True, True, True) for u in doctor.UNITS}


def healthy() -> Facts:
    return Facts(nft_version="1.0.6", kernel_checked=True, docker_version="28.5.2",
                 firewall_backend="iptables", docker_chains=("nft",), userland_proxy=True,
                 userland_proxy_source="Docker's default",
                 ipv6_forwarding=True, br_netfilter=True, table_present=True,
                 policy_path="/etc/dockfence/policy.yaml", policy_matches=True, published=3,
                 systemd=True, services=dict(ALL_UNITS))


def verdicts(f: Facts) -> dict[str, Check]:
    return {c.name: c for c in evaluate(f)}


def test_a_healthy_host_is_all_ok() -> None:
    checks = evaluate(healthy())
    assert [c for c in checks if c.level != "ok"] == []
    assert not doctor.failed(checks)
    names = [c.name for c in checks]
    assert names[:2] == ["nft", "kernel"]  # the order an operator fixes things in
    for name in ("docker", "firewall-backend", "iptables", "userland-proxy", "ipv6-forwarding",
                 "br_netfilter", "other-firewalls", "table", "published-ports", *doctor.UNITS):
        assert name in names


@pytest.mark.parametrize(("version", "level"), [
    (None, "failure"), ("0.9.8", "failure"), ("1.0.2", "warning"), ("1.0.6", "ok"),
    ("1.1.1", "ok")])
def test_nft_version(version: str | None, level: str) -> None:
    check = verdicts(replace(healthy(), nft_version=version))["nft"]
    assert check.level == level
    if level != "ok":
        assert check.fix


def test_parse_nft_version() -> None:
    assert doctor.parse_nft_version("nftables v1.0.6 (Lester Gooch #5)\n") == "1.0.6"
    assert doctor.parse_nft_version("garbage") is None


def test_kernel_refusal_is_a_failure_and_unchecked_a_warning() -> None:
    refused = verdicts(replace(healthy(), kernel_error="Could not process rule"))["kernel"]
    assert refused.level == "failure" and "Could not process rule" in refused.message
    unchecked = verdicts(replace(healthy(), kernel_checked=False, is_root=False))["kernel"]
    assert unchecked.level == "warning" and "root" in unchecked.message


def test_docker_unreachable() -> None:
    v = verdicts(replace(healthy(), docker_error="cannot reach Docker at unix:///x"))
    assert v["docker"].level == "failure" and "DOCKER_HOST" in v["docker"].fix
    assert v["published-ports"].level == "warning"
    assert "iptables" not in v and "userland-proxy" not in v


@pytest.mark.parametrize(("version", "level"), [
    ("20.10.24+dfsg1", "ok"), ("28.5.2", "ok"), ("29.7.2", "ok"), ("19.03.15", "warning"),
    ("27.3.1", "warning")])
def test_docker_versions(version: str, level: str) -> None:
    assert verdicts(replace(healthy(), docker_version=version))["docker"].level == level


def test_firewall_backends() -> None:
    old = verdicts(replace(healthy(), firewall_backend=None))["firewall-backend"]
    assert old.level == "ok" and "28.1" in old.message
    nft29 = verdicts(replace(healthy(), firewall_backend="nftables", docker_chains=()))
    assert nft29["firewall-backend"].level == "ok" and "DOCKER-USER" in \
        nft29["firewall-backend"].message
    assert "iptables" not in nft29  # Docker 29's nftables backend: no iptables involved


@pytest.mark.parametrize(("chains", "level", "words"), [
    (("nft",), "ok", "iptables-nft"),
    (("legacy",), "ok", "iptables-legacy"),
    (("legacy", "nft"), "warning", "both"),
    ((), "warning", "--iptables=false"),
])
def test_iptables_variant(chains: tuple[str, ...], level: str, words: str) -> None:
    check = verdicts(replace(healthy(), docker_chains=chains))["iptables"]
    assert check.level == level and words in check.message


def test_userland_proxy_setting() -> None:
    assert doctor.userland_proxy_of(["dockerd"], None) == (True, "Docker's default")
    assert doctor.userland_proxy_of(["dockerd", "--userland-proxy=false"], None)[0] is False
    assert doctor.userland_proxy_of(["dockerd", "--userland-proxy"], None)[0] is True
    off = doctor.userland_proxy_of(["dockerd"], '{"userland-proxy": false}')
    assert off == (False, 'daemon.json "userland-proxy": false')
    # the flag wins over the file
    assert doctor.userland_proxy_of(["dockerd", "--userland-proxy=true"],
                                    '{"userland-proxy": false}')[0] is True
    assert doctor.userland_proxy_of(["dockerd"], "{not json")[0] is True
    assert doctor.config_file_of(["dockerd", "--config-file", "/x.json"]) == "/x.json"
    assert doctor.config_file_of(["dockerd", "--config-file=/y.json"]) == "/y.json"
    assert doctor.config_file_of(["dockerd"]) == "/etc/docker/daemon.json"
    off_check = verdicts(replace(healthy(), userland_proxy=False))["userland-proxy"]
    assert off_check.level == "ok" and off_check.message.startswith("off")
    unknown = verdicts(replace(healthy(), userland_proxy=None))["userland-proxy"]
    assert unknown.level == "warning"


def test_ipv6_forwarding() -> None:
    off = replace(healthy(), ipv6_forwarding=False)
    assert verdicts(off)["ipv6-forwarding"].level == "ok"
    with_v6 = verdicts(replace(off, ipv6_networks=("v6net",)))["ipv6-forwarding"]
    assert with_v6.level == "warning" and "v6net" in with_v6.message


NFT_CHAINS = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "ufw-before-input", "handle": 2}},
    {"chain": {"family": "inet", "table": "dockfence", "name": "forward", "handle": 3}},
    {"chain": {"family": "inet", "table": "firewalld", "name": "filter_INPUT", "handle": 4}},
    {"chain": {"family": "ip", "table": "docker-bridges", "name": "filter-FORWARD",
               "handle": 5}},
    {"table": {"family": "inet", "name": "myrules", "handle": 6}},
]}


def test_chains_and_tables_are_attributed() -> None:
    variants, ufw, tables = doctor.chain_owners(NFT_CHAINS)
    assert variants == {"nft"} and ufw
    assert doctor.other_tables(tables) == ("inet myrules",)
    assert doctor.chain_owners(None) == (set(), False, set())


def test_other_firewalls() -> None:
    assert verdicts(healthy())["other-firewalls"].level == "ok"
    v = verdicts(replace(healthy(), ufw_chains=True, firewalld=True,
                         other_tables=("inet myrules",)))["other-firewalls"]
    assert v.level == "warning"
    for word in ("ufw", "firewalld", "inet myrules", "drop is final"):
        assert word in v.message
    conf_only = verdicts(replace(healthy(), ufw_enabled_conf=True))["other-firewalls"]
    assert "not loaded here" in conf_only.message


def test_table_states() -> None:
    missing = replace(healthy(), table_present=False, policy_matches=None)
    flushed = verdicts(replace(missing, applied_record="/var/lib/dockfence/table.nft"))["table"]
    assert flushed.level == "failure" and "missing (flushed?)" in flushed.message
    assert "watch" in flushed.fix
    never = verdicts(missing)["table"]
    assert never.level == "failure" and "not applied" in never.message
    assert never.fix == "dockfence apply --policy /etc/dockfence/policy.yaml"
    differs = verdicts(replace(healthy(), policy_matches=False))["table"]
    assert differs.level == "warning" and "plan" in differs.fix
    bad = verdicts(replace(healthy(), policy_matches=None, policy_error="p.yaml:3: bad"))
    assert bad["table"].level == "failure" and "p.yaml:3" in bad["table"].message
    unknown = verdicts(replace(healthy(), policy_matches=None))["table"]
    assert unknown.level == "ok" and "not compared" in unknown.message


def test_published_ports() -> None:
    loose = verdicts(replace(healthy(), uncovered=("late [::]:8095/tcp",)))["published-ports"]
    assert loose.level == "failure" and "late" in loose.message
    assert "published after the last apply" in loose.message
    bare = replace(healthy(), table_present=False, uncovered=("web 0.0.0.0:8081/tcp",))
    assert "not applied" in verdicts(bare)["published-ports"].message
    bridges = verdicts(replace(healthy(), unknown_bridges=("br-1",)))["published-ports"]
    assert bridges.level == "warning" and "br-1" in bridges.message
    none = verdicts(replace(healthy(), published=0))["published-ports"]
    assert none.level == "ok" and "no container port" in none.message


def test_uncovered_ports_from_inventory_and_live_rules() -> None:
    inv = scenario()
    rs = compile_policy(policy.parse(POLICY, "/p.yaml"), inv)
    total, loose = doctor.uncovered_ports(inv, rs)
    # loopback-only (local 9000) and routed-mode (api's IPv6, no host port) are not counted
    assert total == 9 and loose == ()
    total, loose = doctor.uncovered_ports(inv, None)
    assert len(loose) == total
    late = Container("late", "l" * 12, None, (Binding("tcp", "::", 8095, 8080),))
    grown = Inventory(containers=(*inv.containers, late), bridges=inv.bridges)
    assert doctor.uncovered_ports(grown, rs) == (10, ("late [::]:8095/tcp",))


def test_services() -> None:
    none = verdicts(replace(healthy(), services={}))
    for unit in doctor.UNITS:
        assert none[unit].level == "warning" and f"contrib/{unit}" in none[unit].fix
    stopped = dict(ALL_UNITS, **{"dockfence-watch.service": Service(True, True, False)})
    v = verdicts(replace(healthy(), services=stopped))["dockfence-watch.service"]
    assert v.level == "warning" and "not running" in v.message
    disabled = {u: Service(True, False, False) for u in doctor.UNITS}
    assert verdicts(replace(healthy(), services=disabled))[doctor.UNITS[1]].level == "warning"
    bare = replace(healthy(), systemd=False, services={})
    assert all(verdicts(bare)[u].level == "warning" for u in doctor.UNITS)
    assert verdicts(replace(bare, watch_process=True))["dockfence-watch.service"].level == "ok"
    # warnings never fail the run
    assert not doctor.failed(evaluate(bare))


def test_json_shape() -> None:
    checks = evaluate(replace(healthy(), table_present=False, policy_matches=None))
    data = doctor.as_json(checks)
    assert data["ok"] is False and data["failures"] == 1 and data["warnings"] == 0
    assert {"name", "level", "message", "fix"} <= set(data["checks"][0])
    json.dumps(data)


def test_probe_table_renders_every_rule_kind() -> None:
    text = doctor.probe_table()
    for feature in ("ct original proto-dst", "flags interval", "vmap", "ct mark",
                    "ipv6_addr . inet_service", "hook input", "hook forward", "hook output"):
        assert feature in text, feature


def test_cli_exit_codes_and_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(doctor, "gather", lambda path: replace(healthy(), policy_path=path))
    assert cli.main(["doctor", "--policy", str(tmp_path / "p.yaml")]) == 0
    ok = capsys.readouterr()
    assert ok.out.splitlines()[0].startswith("ok"), ok
    monkeypatch.setattr(doctor, "gather",
                        lambda path: replace(healthy(), nft_version=None, policy_path=path))
    assert cli.main(["doctor", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["checks"][0] == {"name": "nft", "level": "failure", "message": "nft not found",
                                 "fix": "install nftables (apt-get install nftables)"}
