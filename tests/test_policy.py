"""Policy loading: valid files parse; every bad value is reported with its file and line."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
        ("version: true\n", 1, "version: must be 1", True),
        ("version: 1\ninterfaces: [5]\n", 2, "not an interface name", 5),
        ("version: 1\nlists:\n  port: 5\n", 3, "lists.port: expected a mapping or a list", 5),
        ("version: 1\nlists:\n  a: {file: a.txt, url: 'https://example.com/a'}\n", 3,
         "names a `file` or a `url` (one of them)", None),
        ("version: 1\nlists:\n  a: {file: a.txt, refresh: 1d}\n", 3,
         "`refresh` is for downloaded lists", "1d"),
        ("version: 1\nlists:\n  a: {url: 'https://example.com/a', refresh: soon}\n", 3,
         "lists.a.refresh: refresh is a duration", "soon"),
        (
            "version: 1\nhost:\n  allow:\n    - port: 22\n      from: [any, 1.5]\n",
            5,
            "host.allow.0.from.1: an address, a CIDR, a list name or `any`",
            1.5,
        ),
        ("version: 1\nhost:\n  allow:\n    - port: 22\n", 4,
         "missing required key 'host.allow.0.from'", None),
        ("version: 1\ncontainers: []\n", 2, "containers: expected a mapping, got a list", None),
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


def _alias_bomb() -> bytes:
    """Nine levels of nine aliases: 9**9 strings once expanded, 1 KB on disk."""
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        prev, cur = chr(ord("a") + level - 1), chr(ord("a") + level)
        rows.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return ("version: 1\n" + "\n".join(rows) + "\n").encode()


RULE = b"version: 1\ncontainers:\n  allow:\n    - container: x\n      port: "
# (bytes, line, words of the message, the value it must name or None)
HOSTILE = {
    "alias_bomb": (_alias_bomb(), 2, "anchors (&name) are not allowed", "&a"),
    "alias": (b"version: 1\nlists:\n  a: [203.0.113.1]\n  b: *a\n", 4,
              "aliases (*name) are not allowed", "*a"),
    "anchor": (b"version: 1\nlists:\n  a: &x [203.0.113.1]\n", 3, "anchors", "&x"),
    "merge_key": (b"version: 1\ncontainers:\n  <<: {default: allow}\n", 3,
                  "merge keys (<<) are not allowed", "<<"),
    "python_tag": (b"version: 1\nhost: !!python/object/apply:os.system [\"true\"]\n", 2,
                   "tags are not allowed", "!!python/object/apply:os.system"),
    "binary_tag": (b"version: 1\nlists:\n  a: [!!binary aGVsbG8=]\n", 3, "tags", "!!binary"),
    "local_tag": (b"version: 1\nhost: !mine {}\n", 2, "tags", "!mine"),
    "str_tag": (b"version: 1\ncontainers:\n  default: !!str deny\n", 3, "tags", "!!str"),
    "two_documents": (b"version: 1\n---\nversion: 1\n", 2, "more than one YAML document", None),
    "deep_flow": (b"version: 1\nlists: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", 2,
                  "nested more than 32 levels", None),
    "deep_block": (b"version: 1\n" + b"".join(b" " * i + b"k%d:\n" % i for i in range(500)),
                   34, "nested more than 32 levels", None),
    "not_utf8": (b"version: 1\nlists:\n  office: [203.0.113.0/28, caf\xe9]\n", 3,
                 "not UTF-8", b"\xe9"),
    "utf16": ("version: 1\n".encode("utf-16"), 1, "not UTF-8", None),
    "nul": (b"version: 1\ncontainers:\n  default: de\x00ny\n", 3, "control character U+0000",
            "\x00"),
    "escape_sequence": (b"version: 1\ninterfaces: [eth0\x1b[31m]\n", 2, "U+001B", "\x1b"),
    "huge_int": (RULE + b"9" * 5000 + b"\n      from: any\n", 5, "number too large", "9" * 5000),
    "big_int": (RULE + b"9" * 4000 + b"\n      from: any\n", 5, "a port is written", None),
    "huge_float": (b"version: 1.0e+99999\n", 1, "version", float("inf")),
    "sexagesimal": (RULE + b"22:30\n      from: any\n", 5, "a port is written", "22:30"),
    "int_key": (b"version: 1\n1: x\n", 2, "unknown key '1'", "x"),
    "null_key": (b"version: 1\n~: x\n", 2, "unknown key '~'", "x"),
    "list_key": (b"version: 1\n? [a, b]\n: x\n", 2, "a key is a plain word", None),
    "map_key": (b"version: 1\nlists:\n  {a: 1}: [203.0.113.1]\n", 3, "a key is a plain word",
                None),
    "int_list_name": (b"version: 1\nlists:\n  5: [203.0.113.1]\n", 3, "list name", "5"),
    "duplicate_list": (b"version: 1\nlists:\n  a: []\n  a: []\n", 4, "duplicate key", "a"),
    "too_many_values": (b"version: 1\nlists:\n  a: [" + b"1," * 400_000 + b"1]\n", 3,
                        "more than 300,000", None),
    "scalar_document": (b"hello\n", 1, "YAML mapping", None),
    "empty": (b"", 1, "YAML mapping", None),
    "truncated": (b"version: 1\nlists:\n  a: [203.0.113.1\n", 4, "not valid YAML", None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_names_line_and_value(name: str) -> None:
    data, line, needle, value = HOSTILE[name]
    with pytest.raises(PolicyError) as info:
        policy.parse(data, "evil.yaml")
    exc = info.value
    assert (exc.path, exc.line) == ("evil.yaml", line), str(exc)
    assert needle in str(exc)
    if value is not None:
        assert exc.value == value
    assert exc.exit_code == 2
    assert len(str(exc)) < 400  # a megabyte of offending value is cut short


def test_keys_are_their_text() -> None:
    """`yes:` names a list "yes" (YAML 1.1 would make the key True); values keep their types."""
    p = policy.parse("version: 1\nlists:\n  yes: [203.0.113.1]\nhost:\n  allow:\n"
                     "    - {port: 22, from: 'yes'}\n")
    assert p.host_rules[0].sources.names == ("yes",)
    assert p.host_rules[0].sources.admits(ipaddress.ip_address("203.0.113.1"))


def test_bytes_with_bom_parse_like_text() -> None:
    assert policy.parse(b"\xef\xbb\xbf" + POLICY.encode()) == policy.parse(POLICY)


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy: No such file") as info:
        policy.load(tmp_path / "absent.yaml")
    assert info.value.exit_code == 2


def test_directory_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="a directory, not a file"):
        policy.load(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Nobody writes to the FIFO: a blocking open would hang here forever."""
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="a FIFO, not a file"):
        policy.load(fifo)


def test_character_device_is_refused() -> None:
    with pytest.raises(PolicyError, match="a character device"):
        policy.load("/dev/zero")


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"version: 1\n" + b"#" * policy.MAX_POLICY_BYTES)
    with pytest.raises(PolicyError, match="larger than 8,388,608 bytes") as info:
        policy.load(big)
    assert info.value.line is None and info.value.path == str(big)


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    """Mode 000. Root reads anything, so as root the load runs in a child without the
    capabilities that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    path.chmod(0)
    code = ("import sys; from dockfence import policy\n"
            "try: policy.load(sys.argv[1])\n"
            "except policy.PolicyError as e: print(e); sys.exit(e.exit_code)\n")
    argv = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("as root this needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2, proc
    assert proc.stdout.strip() == f"{path}: cannot read policy: Permission denied", proc


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
