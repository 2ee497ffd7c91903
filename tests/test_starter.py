"""`dockfence init` and `dockfence schema`: pure, no Docker needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from dockfence import policy
from dockfence.compile import compile_policy
from dockfence.errors import PolicyError
from dockfence.inventory import Binding, Container, Inventory
from dockfence.starter import starting_policy

from helpers import scenario

REPO = Path(__file__).parent.parent
EXAMPLE = REPO / "dockfence" / "examples" / "policy.yaml"


def test_starting_policy_names_every_published_port_and_admits_nobody() -> None:
    inv = scenario()
    text = starting_policy(inv)
    pol = policy.parse(text, "init.yaml")
    named = {(r.container, str(r.port)) for r in pol.container_rules}
    published = {(c.name, f"{b.container_port}/{b.proto}") for c in inv.containers
                 for b in c.bindings if not b.loopback_only}
    assert named == published
    assert pol.container_default == "deny" and pol.host_default is None
    rs = compile_policy(pol, inv)
    assert rs.container_gates and all(g.sources.nobody for g in rs.container_gates)
    assert not rs.warnings  # every rule selects a running container


def test_starting_policy_skips_loopback_only_and_quotes_odd_names() -> None:
    inv = Inventory(containers=(
        Container("db", "d", None, (Binding("tcp", "127.0.0.1", 5432, 5432),)),
        Container("true", "t", None, (Binding("udp", "0.0.0.0", 53, 53),)),
        Container("sctp", "s", None, (Binding("sctp", "0.0.0.0", 9, 9),)),
    ))
    text = starting_policy(inv)
    pol = policy.parse(text, "init.yaml")
    assert [(r.container, str(r.port)) for r in pol.container_rules] == [("true", "53/udp")]
    assert "db 5432/tcp is published on 127.0.0.1:5432 only" in text
    assert "tcp and udp only" in text


def test_starting_policy_for_an_empty_host_is_valid() -> None:
    pol = policy.parse(starting_policy(Inventory()), "init.yaml")
    assert pol.container_rules == ()


def test_schema_accepts_the_example_and_rejects_mistakes() -> None:
    schema = policy.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    validator.validate(yaml.safe_load(EXAMPLE.read_text()))
    validator.validate(yaml.safe_load(starting_policy(scenario())))
    for bad in ({"version": 1, "containerz": {}}, {"version": 2},
                {"version": 1, "containers": {"default": "perhaps"}},
                {"version": 1, "containers": {"allow": [{"port": "80/sctp", "from": "any"}]}}):
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(bad)


@pytest.mark.parametrize("bad", [
    {"version": 1, "interfaces": []},
    {"version": 1, "host": {"allow": [{"port": 70000, "from": "any"}]}},
    {"version": 1, "host": {"allow": [{"port": "22", "from": "any", "extra": 1}]}},
    {"version": 1, "containers": {"allow": [{"host_port": 8081}]}},
    {"version": 1, "containers": {"labels": {}}},
    {"version": 1, "lists": {"a": {"file": "a.txt", "url": "https://example.com/a"}}},
    {"version": 1, "lists": {"a": {"file": "a.txt", "refresh": "1d"}}},
    {"version": 1, "lists": {"a": {"url": "ftp://example.com/a"}}},
    {"version": 1, "lists": {"a": {"url": "https://example.com/a", "refresh": "soon"}}},
    {"version": 1, "lists": {"a": {}}},
])
def test_schema_rejects_what_the_validator_rejects(bad: dict[str, object]) -> None:
    """Editors flag these as the loader does (the loader stays the authority)."""
    with pytest.raises(PolicyError):
        policy.parse(yaml.safe_dump(bad), "bad.yaml")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(policy.json_schema()).validate(bad)


def test_schema_describes_what_editors_show() -> None:
    text = json.dumps(policy.json_schema())
    for words in ("8080/tcp or 8000-8100/udp", "an empty list admits nobody", "refuses although",
                  "downloaded from (http or https)", "how old the saved copy may get"):
        assert words in text


def test_schema_command_prints_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "dockfence", "schema"], capture_output=True,
                          text=True, check=True, cwd=REPO)
    assert json.loads(proc.stdout)["title"] == "dockfence policy (version 1)"


def test_init_never_overwrites_a_file(tmp_path: Path) -> None:
    target = tmp_path / "policy.yaml"
    target.write_text("mine\n")
    proc = subprocess.run([sys.executable, "-m", "dockfence", "init", "-o", str(target)],
                          capture_output=True, text=True, cwd=REPO,
                          env={"DOCKER_HOST": "unix:///nonexistent.sock", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert "never overwrites" in proc.stderr
    assert target.read_text() == "mine\n"
