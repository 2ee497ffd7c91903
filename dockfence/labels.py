"""Allow rules that containers carry as labels, within what the policy lets labels grant. Pure.

A label `dockfence.allow.8080/tcp: "office, 198.51.100.7"` adds its sources to the container's
port 8080/tcp, like a policy rule, but only as far as `containers.labels.may_allow` goes: labels
are written by whoever deploys a container, who may not be the host's administrator. Label text
is parsed into ports and networks here; nothing of it reaches a rule as text.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import addresses
from .inventory import MAX_LABELS, MAX_VALUE, PREFIX, Container
from .listurls import LIST_NAME_RE
from .model import IPNetwork, PortSpec, Sources, parse_port

if TYPE_CHECKING:
    from .policy import Policy

ALLOW_PREFIX = "dockfence.allow."
MAX_TOKENS = 256  # entries in one label's value
_TOKEN_RE = re.compile(r"^[0-9A-Za-z:./_-]{1,64}$")


@dataclass(frozen=True)
class LabelRule:
    """What one label validly grants."""

    container: str
    key: str
    port: PortSpec
    sources: Sources

    @property
    def origin(self) -> str:
        return f"label on {self.container} ({self.key})"


def _show(value: str, limit: int = 60) -> str:
    """A label value as a warning may show it: escaped, and short whatever its length."""
    text = value.encode("unicode_escape").decode("ascii")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _within(net: IPNetwork, limit: Sources) -> bool:
    """Is the network inside what `limit` admits? Its collapsed blocks are the fewest aligned
    CIDRs, so a CIDR inside their union lies inside one of them."""
    if limit.any:
        return True
    blocks = limit.v4 if net.version == 4 else limit.v6
    first, last = addresses.span(net.version, addresses.of_network(net))
    i = bisect_right(blocks, first << 8 | 0xFF) - 1
    return i >= 0 and addresses.span(net.version, blocks[i])[1] >= last


def _token(token: str, policy: Policy, limit: Sources) -> tuple[Sources, str]:
    """(what one entry of a label's value grants, problem): the grant is empty when refused."""
    if not token.isascii() or not _TOKEN_RE.match(token):
        return Sources(), "not a list name, address, CIDR or `any`"
    if token == "any":
        return (Sources(any=True), "") if limit.any else (Sources(), "`any` is more than may_allow")
    if token in policy.lists:
        listed = policy.lists[token]
        # as integer blocks: a 100,000-entry list is checked without an object per entry
        if limit.any or not (addresses.subtract(4, listed.v4, limit.v4)
                             or addresses.subtract(6, listed.v6, limit.v6)):
            return listed, ""
        return Sources(), f"list {token} is more than may_allow"
    if LIST_NAME_RE.match(token):
        return Sources(), "unknown list name"
    try:
        net = addresses.parse_network(token)
    except ValueError as exc:
        return Sources(), str(exc)
    if not _within(net, limit):
        return Sources(), "more than may_allow"
    return Sources.of([net]), ""


def label_rules(policy: Policy, c: Container) -> tuple[list[LabelRule], list[str]]:
    """The rules a container's labels validly grant, and a warning for every part refused
    (naming the container, the label and the value)."""
    limit = policy.label_limit
    mine = [(k, v) for k, v in c.labels if k.startswith(PREFIX)]
    if limit is None or not mine:
        return [], []
    where = f"container {c.name}"
    if len(mine) > MAX_LABELS:
        return [], [f"{where}: {len(mine)} dockfence labels (at most {MAX_LABELS}): "
                    "all ignored"]
    rules: list[LabelRule] = []
    warnings: list[str] = []
    for key, value in mine:
        bad = f"{where}: label {_show(key)} = {_show(value)}"
        if not key.startswith(ALLOW_PREFIX):
            warnings.append(f"{bad}: unknown dockfence label (dockfence.allow.PORT[/PROTO])")
            continue
        try:
            port = parse_port(key[len(ALLOW_PREFIX):])
        except ValueError as exc:
            warnings.append(f"{bad}: {exc}; grants nothing")
            continue
        if len(value) > MAX_VALUE:
            warnings.append(f"{bad}: longer than {MAX_VALUE} characters; grants nothing")
            continue
        tokens = [t.strip() for t in value.split(",") if t.strip()]
        if len(tokens) > MAX_TOKENS:
            warnings.append(f"{bad}: more than {MAX_TOKENS} entries; grants nothing")
            continue
        grants: list[Sources] = []
        granted: list[str] = []
        for token in tokens:
            got, problem = _token(token, policy, limit)
            if problem:
                warnings.append(f"{bad}: {_show(token)}: {problem}; that part grants nothing")
                continue
            grants.append(got)
            granted.append(token)
        if granted:
            rules.append(LabelRule(c.name, key, port, Sources.of_blocks(
                (b for g in grants for b in g.v4), (b for g in grants for b in g.v6),
                any(g.any for g in grants), tuple(granted))))
    return rules, warnings
