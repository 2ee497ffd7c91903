"""Policy loading: valid files parse; every bad value is reported with its file and line."""

from __future__ import annotations

import ipaddress

import pytest

from dockfence import policy
from dockfence.errors import PolicyError

from helpers import POLICY


def test_example_policy_parses() -> None:
    p = policy.parse(POLICY, "p.yaml")
    assert p.host_default == "deny"
    assert p.container_default == "deny"
    django = p.container_rules[0]
    assert django.container == "django" and str(django.port) == "8080/tcp"
    assert django.line == 12
    assert django.sources.admits(ipaddress.ip_address("203.0.113.15"))
    assert not django.sources.admits(ipaddress.ip_address("203.0.113.16"))
    assert django.sources.admits(ipaddress.ip_address("2001:db8:1::abcd"))
    assert django.sources.admits(ipaddress.ip_address("198.51.100.7"))
    assert p.host_rules[0].sources.any


@pytest.mark.parametrize(
    "text, line, needle, value",
    [
        ("version: 2\n", 1, "version", 2),
        ("version: 1\nfoo: 1\n", 2, "unknown key 'foo'", 1),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 70000\n"
            "      from: any\n",
            5,
            "1 to 65535",
            70000,
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 90-80/tcp\n"
            "      from: any\n",
            5,
            "low to high",
            "90-80/tcp",
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 80/icmp\n"
            "      from: any\n",
            5,
            "a port is written",
            "80/icmp",
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 80\n"
            "      from: [nolist]\n",
            6,
            "unknown list name",
            "nolist",
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 80\n"
            "      from: [10.0.0.1/8]\n",
            6,
            "did you mean 10.0.0.0/8",
            "10.0.0.1/8",
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 80\n"
            "      from: [203.0.113.300]\n",
            6,
            "not an IP address",
            "203.0.113.300",
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: 'x; drop'\n      port: 80\n"
            "      from: any\n",
            4,
            "container or compose service name",
            "x; drop",
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - port: 80\n      from: any\n",
            4,
            "name the `container`",
            None,
        ),
        (
            "version: 1\ncontainers:\n  allow:\n    - container: x\n      port: 80\n"
            "      host_port: 81\n      from: any\n",
            4,
            "exactly one of",
            None,
        ),
        ("version: 1\ncontainers:\n  default: maybe\n", 3, "'deny' or 'allow'", "maybe"),
        (
            'version: 1\ninterfaces: ["eth0; flush ruleset"]\n',
            2,
            "not an interface name",
            "eth0; flush ruleset",
        ),
        (
            "version: 1\nlists:\n  office: [fe80::/10, nonsense]\n",
            3,
            "not an IP address",
            "nonsense",
        ),
        ("version: 1\nlists:\n  any: [203.0.113.0/24]\n", 3, "not `any`", "any"),
        (
            "version: 1\nhost:\n  allow:\n    - port: 22\n      from: any\n      extra: 1\n",
            6,
            "unknown key 'extra'",
            1,
        ),
        ("version: 1\nversion: 1\n", 2, "duplicate key", None),
        ("version: [1\n", 2, "not valid YAML", None),
        ("- 1\n- 2\n", 1, "YAML mapping", None),
    ],
)
def test_bad_policy_names_line_and_value(text: str, line: int, needle: str, value: object) -> None:
    with pytest.raises(PolicyError) as info:
        policy.parse(text, "bad.yaml")
    exc = info.value
    assert exc.path == "bad.yaml"
    assert exc.line == line, str(exc)
    assert needle in str(exc)
    if value is not None:
        assert exc.value == value
    assert exc.exit_code == 2


def test_missing_file_is_a_policy_error(tmp_path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        policy.load(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "text, first, last, proto",
    [
        ("8080", 8080, 8080, "tcp"),
        ("8080/udp", 8080, 8080, "udp"),
        ("8000-8100/tcp", 8000, 8100, "tcp"),
        (22, 22, 22, "tcp"),
        ("1-65535", 1, 65535, "tcp"),
    ],
)
def test_port_forms(text: object, first: int, last: int, proto: str) -> None:
    spec = policy.parse_port(text)
    assert (spec.ports.first, spec.ports.last, spec.proto) == (first, last, proto)


@pytest.mark.parametrize("text", ["0", "65536", "http", "80/sctp", True, "80-", "-80", 1.5])
def test_bad_port_forms(text: object) -> None:
    with pytest.raises(ValueError):
        policy.parse_port(text)


@pytest.mark.parametrize("name, ok", [
    ("eth0", True), ("wg*", True), ("br-0123456789ab", True), ("abcdefghijklmn*", True),
    ("lo", False), ("*", False), ("abcdefghijklmnop", False), ("eth 0", False),
    ("eth0/1", False), ('x"y', False),
])
def test_interface_names(name: str, ok: bool) -> None:
    text = f"version: 1\ninterfaces: ['{name}']\n"
    if ok:
        assert policy.parse(text).interfaces == (name,)
    else:
        with pytest.raises(PolicyError):
            policy.parse(text)


def test_an_empty_from_admits_nobody() -> None:
    """`from: []` is an explicit "nobody" (what `dockfence init` writes for you to fill in)."""
    pol = policy.parse("version: 1\ncontainers:\n  allow:\n    - container: x\n"
                       "      port: 80\n      from: []\n")
    assert pol.container_rules[0].sources.nobody
