"""A big table loaded in stages: its address sets filled beside the live rules, then one small
transaction switches to them.

`nft -f` of a table holding 100,000 addresses spends most of its second in nft itself (parsing
them, building and checking their intervals); the kernel's own insert is a third of it. From
STAGE_MIN blocks on, apply instead:

1. declares the new table's address sets, empty, under names of a new generation
   (`allow_0_g7_v4`), which no rule references: one small `nft -f`;
2. fills them over netlink, blocks encoded by C loops (netlink.block_ops), in transactions of
   FILL_BLOCKS blocks: packets never see these sets, so a half-filled one decides nothing;
3. in one `nft -f`, empties every chain of the table and deletes every object but the sets of
   step 1, then declares the new table around them. It names no element of an existing set,
   so nft reads none back (8 ms at 100,000 addresses); what grows with the lists is only the
   kernel freeing the previous generation's sets.

Packets see the old rules until step 3 commits, then the new ones: one atomic switch, as with
a whole-table load. Anything that fails before it leaves the live rules as they were; the sets
of an interrupted load are unreferenced, and the next load deletes them. The table keeps its
kernel handle: readers that must know whether it changed compare its stamp too
(nftables.live_generation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import addresses
from ..errors import OperationalError
from ..run import later
from ..stamp import Stamp
from . import netlink
from . import nftables as nft

if TYPE_CHECKING:
    from ..model import Ruleset

# Below this many address blocks a whole-table load costs tens of milliseconds: the three
# steps would cost as much.
STAGE_MIN = 10_000
# Blocks per fill transaction (a netlink batch near 5 MB in IPv6). The kernel's insert is most
# of a fill, and costs more in smaller transactions (100,000 IPv6 blocks: 0.36 s in batches of
# 65,536, 0.38 s of 16,384, 0.50 s of 4,096); encoding them takes 0.07 s.
FILL_BLOCKS = 65_536
# The kinds `nft delete` takes, in an order the kernel accepts once the chains are empty:
# maps first (their elements jump to chains), chains last but for the stateful objects.
_DELETE_ORDER = ("map", "set", "chain", "counter", "limit", "quota")
_SAFE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class NotStaged(Exception):
    """This table is loaded whole instead (too small, a block nft alone can write, an object
    this module does not know in the live table)."""


def blocks_in(rs: Ruleset) -> int:
    """How many address blocks the allow-lists and `except` lists of a table hold (each list
    once, as render() declares it)."""
    return sum(len(s.v4) + len(s.v6) + len(s.deny_v4) + len(s.deny_v6)
               for s in nft.chain_order(rs))


class Staged:
    """A staged load under way: its sets declared and being filled (see begin)."""

    def __init__(self, table: str, sets: dict[str, tuple[int, tuple[int, ...], str]],
                 doomed: str, filled: Callable[[], None]) -> None:
        self.table, self.sets, self.doomed, self.filled = table, sets, doomed, filled

    def switch(self, held: dict[int, list[tuple[int, int | None]]]) -> None:
        """Wait for the fill, then step 3: the new rules, bans `held` (bans.pieces) carried
        into their sets as a whole-table load would. OperationalError when the kernel refused
        the fill or the switch: the live rules are then as they were, the new sets gone."""
        try:
            self.filled()
            nft.apply_text(self.doomed + nft.with_bans(self.table, held))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Give up: wait for the fill to end, then delete its sets (best effort: the next
        staged load deletes what is left)."""
        with contextlib.suppress(Exception):  # what failed is what the caller reports
            self.filled()
        where = f"{nft.FAMILY} {nft.TABLE}"
        with contextlib.suppress(OperationalError):
            nft.apply_text("".join(f"delete set {where} {name}\n" for name in self.sets))


def _reaches_the_end(rs: Ruleset) -> bool:
    """Does a list hold the last address of its family (255.255.255.255, or ffff:...)? Its
    interval has no end element, which netlink.block_ops does not write; nft does."""
    for s in nft.chain_order(rs):
        for version, blocks in ((4, s.v4), (6, s.v6), (4, s.deny_v4), (6, s.deny_v6)):
            bits = addresses.BITS[version]
            # blocks are sorted and disjoint: the last one ends highest
            if blocks and ((blocks[-1] >> 8) + (1 << (bits - (blocks[-1] & 0xFF)))) >> bits:
                return True
    return False


def begin(rs: Ruleset, stamp: Stamp, counts: dict[str, int] | None) -> Staged:
    """Steps 1 and 2, started now: the sets are declared here and filled on a thread of their
    own while the caller renders and records the whole table (as `restore` will load it).
    NotStaged when this table is better loaded whole; OperationalError when the kernel
    refused to declare the sets (nothing changed)."""
    if blocks_in(rs) < STAGE_MIN:
        raise NotStaged("small table")
    if _reaches_the_end(rs):
        raise NotStaged("a block reaching the last address")  # it has no end element
    live = netlink.table_objects(nft.TABLE) or []
    generation = 1 + max((nft.staged_generation(n) or 0 for k, n in live if k == "set"),
                         default=0)
    table, sets = nft.render_staged(rs, stamp, counts, generation)
    fills = [(name, addresses.BITS[version], blocks)
             for name, (version, blocks, _) in sets.items()]
    doomed = _deletions(live, set(sets))
    nft.apply_text("\n".join([f"table {nft.FAMILY} {nft.TABLE} {{", nft.TABLE_COMMENT,
                          *(decl for _, _, decl in sets.values()), "}", ""]))

    def fill() -> None:
        # each batch is encoded while the kernel inserts the one before (its send releases
        # the interpreter): the kernel's insert is most of the fill
        sending: Callable[[], None] | None = None
        for name, bits, blocks in fills:
            for at in range(0, len(blocks), FILL_BLOCKS):
                ops = netlink.block_ops(True, name, bits, blocks[at:at + FILL_BLOCKS])
                if sending is not None:
                    sending()
                sending = later(functools.partial(_commit, name, ops), "fill")
        if sending is not None:
            sending()

    return Staged(table, sets, doomed, later(fill, "fill"))


def _commit(name: str, ops: list[netlink.Op]) -> None:
    try:
        netlink.commit(nft.TABLE, ops)
    except OSError as exc:
        raise OperationalError(f"cannot fill set {name}: {exc}") from None


def _deletions(live: list[tuple[str, str]], keep: set[str]) -> str:
    """The commands that empty every chain of the live table and delete every object not in
    `keep`, in an order the kernel takes in one transaction."""
    for kind, name in live:
        if kind not in _DELETE_ORDER:
            raise NotStaged(f"a {kind} in the live table")
        if not _SAFE_NAME.fullmatch(name):
            raise NotStaged(f"an object named {name!r} in the live table")
    where = f"{nft.FAMILY} {nft.TABLE}"
    lines = [f"flush chain {where} {name}" for kind, name in live if kind == "chain"]
    for order in _DELETE_ORDER:
        lines += [f"delete {kind} {where} {name}" for kind, name in live
                  if kind == order and name not in keep]
    return "".join(line + "\n" for line in lines)


def aimed(ops: list[netlink.Op]) -> list[netlink.Op]:
    """Element updates written for render()'s set names (`allow_0_v4`), aimed at the sets the
    live table holds (`allow_0_g7_v4` after a staged load). OperationalError when a name is
    ambiguous (the sets of an interrupted staged load): a full apply is then due."""
    names = {op.set for op in ops}
    if not any(map(nft.is_address_set, names)):
        return ops  # maps, bridges, the stamp: named alike in every load
    live: dict[str, list[str]] = {}
    for kind, name in netlink.table_objects(nft.TABLE) or ():
        if kind == "set":
            live.setdefault(nft.unstaged(name), []).append(name)
    target = {}
    for n in names:
        found = live.get(n, [n])
        if len(found) > 1:
            raise OperationalError(f"the live table holds {' and '.join(sorted(found))}: "
                                   "a staged load was interrupted")
        target[n] = found[0]
    return [dataclasses.replace(op, set=target[op.set]) for op in ops]
