"""`dockfence init`: a starting policy for the containers running now. Pure: inventory -> text.

Every published port becomes a rule with an empty allow-list (nobody) for the administrator to
fill in, under `containers.default: deny`, so the file is valid and safe to apply as it stands.
"""

from __future__ import annotations

from .inventory import Binding, Container, Inventory

_HEADER = """\
# dockfence policy, started by `dockfence init` for the containers that were running.
# Fill in each `from:` with list names, addresses, CIDRs, or `any`; an empty list admits nobody.
# Then: dockfence check --policy FILE; dockfence plan --policy FILE; dockfence apply --policy FILE
version: 1
# interfaces: [eth0]         # optional: the outside-facing interfaces (default: all but
#                            # loopback and Docker's bridges)
lists:                       # named address lists for `from:` (IPv4 and IPv6, mixed)
  office: []                 # for example [203.0.113.0/28, "2001:db8:1::/64"]
# host:                      # uncomment to filter the host's own ports from outside too
#   default: deny            # host ports not listed below are closed from outside
#   allow:
#     - port: 22/tcp         # keep SSH open, or the next login is refused
#       from: any
containers:
  default: deny              # published ports no rule names, now or later, are closed
"""


def _where(bindings: list[Binding]) -> str:
    return ", ".join(dict.fromkeys(b.host_endpoint() for b in bindings))


def starting_policy(inv: Inventory) -> str:
    """The policy text: one rule per container port that is published beyond loopback."""
    rules: list[str] = []
    for c in sorted(inv.containers, key=lambda c: c.name):
        rules += _rules_for(c)
    body = "  allow:\n" + "".join(rules) if rules else "  allow: []               # nothing " \
        "is published yet\n"
    return _HEADER + body


def _rules_for(c: Container) -> list[str]:
    per_port: dict[tuple[int, str], list[Binding]] = {}
    for b in c.bindings:
        per_port.setdefault((b.container_port, b.proto), []).append(b)
    out = []
    for (port, proto), bindings in sorted(per_port.items()):
        if proto not in ("tcp", "udp"):
            out.append(f"    # {c.name} {port}/{proto} is published on {_where(bindings)}: "
                       "dockfence gates tcp and udp only (containers.default decides)\n")
            continue
        if all(b.loopback_only for b in bindings):
            out.append(f"    # {c.name} {port}/{proto} is published on {_where(bindings)} only: "
                       "this host only, nothing to allow\n")
            continue
        service = f" (compose service {c.service})" if c.service else ""
        out += [
            f"    # {c.name}{service}: {_where(bindings)} -> {port}/{proto}\n",
            f'    - container: "{c.name}"\n',
            f"      port: {port}/{proto}\n",
            "      from: []               # who may connect: fill in\n",
        ]
    return out
