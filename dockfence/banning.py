"""`dockfence ban`, `unban` and `bans`: the record (it survives re-apply and restore), the live
ban sets (their timeouts expire bans by themselves), and the banned source's flows cut."""

from __future__ import annotations

import ipaddress
import os
import time

from . import bans
from .backends import nftables as nft
from .engine import LockoutError, host_lock, trusted_live
from .model import show_network
from .revoke import conntrack_flows, local_addresses, mark_revoked


def ban(target: str, seconds: int | None, reason: str = "", force: bool = False) -> int:
    """Ban an address or network: recorded (it survives re-apply and restore), then added to
    the live table, then its established flows to containers are cut. Returns how many."""
    net = bans.parse_target(target)
    client = (os.environ.get("SSH_CONNECTION") or "").split()[:1]
    if client and not force:
        try:
            if ipaddress.ip_address(client[0]) in net:
                raise LockoutError(f"{net} holds the address of your own SSH session "
                                   f"({client[0]}); pass --force if that is what you want")
        except ValueError:
            pass
    entry = bans.Ban(show_network(net), None if seconds is None else time.time() + seconds,
                     reason)
    with host_lock(wait=30):
        kept = bans.with_ban(bans.load(), entry)
        bans.save(kept)
        if nft.live_stamp_present():
            nft.replace_bans(net.version, bans.pieces(kept, time.time())[net.version])
            return _cut_banned(net)
    return 0


def unban(target: str) -> bool:
    """Lift a ban (recorded and live). False when it was not banned."""
    net = bans.parse_target(target)
    with host_lock(wait=30):
        current = bans.load()
        kept = bans.without(current, show_network(net))
        live = nft.live_bans() or {}
        if len(kept) == len(current) and show_network(net) not in live:
            return False
        bans.save(kept)
        if show_network(net) in live:  # what is left of the others stays (they may overlap)
            nft.replace_bans(net.version, bans.pieces(kept, time.time())[net.version])
        return True


def ban_of(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bans.Ban | None:
    """The recorded ban that covers this address, if any."""
    for b in bans.load():
        if address in ipaddress.ip_network(b.network):
            return b
    return None


def current_bans() -> list[dict[str, object]]:
    """Bans in force: the record, with what the kernel says is left of each."""
    live = nft.live_bans()
    kernel = None if live is None else bans.held(live)
    now = time.time()
    out: list[dict[str, object]] = []
    for b in bans.load():
        out.append({"network": b.network, "reason": b.reason,
                    "expires_in": b.remaining(now),
                    "in_kernel": kernel is not None and bans.covered(b.network, kernel)})
    return out


def _cut_banned(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """Mark the banned source's established flows into containers (NATed, proxied or routed)
    so the table drops them both ways; flows to the host's own ports are left alone."""
    rules = trusted_live()
    ports: dict[str, list[tuple[int, int]]] = {"tcp": [], "udp": []}
    for g in rules.container_gates if rules else ():
        ports[g.proto].append((g.ports.first, g.ports.last))
    local = local_addresses()
    hit = set()
    for f in conntrack_flows():
        try:
            if ipaddress.ip_address(f.src) not in net:
                continue
        except ValueError:
            continue
        to_container = f.dst not in local or any(
            lo <= f.dport <= hi for lo, hi in ports.get("udp" if f.proto == "udp" else "tcp", []))
        if to_container:
            hit.add((f.proto, f.src, f.dst, f.dport))
    mark_revoked(hit)
    return len(hit)
