"""Orchestration: lock, discover, compile, plan, apply atomically, verify, roll back; the
revocation of flows the new rules deny is in dockfence.revoke."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import discovery, listfiles, record, state
from .backends import nftables as nft
from .errors import OperationalError, UsageError
from .run import later
from .stamp import Stamp, inventory_digest

# The no-op apply needs none of the policy validator, compiler, renderer's callers, explainer,
# diff, bans or counters, nor the rules' types: each loads where it is used.
if TYPE_CHECKING:
    from . import policy
    from .backends.staged import Staged
    from .inventory import Inventory
    from .model import Ruleset
    from .plan import Change


class LockoutError(UsageError):
    """Refused: the policy would deny the SSH session that runs the command."""


@contextmanager
def host_lock(wait: float = 0.0) -> Iterator[None]:
    """One dockfence at a time per network namespace (tests run several namespaces at once).
    `wait`: seconds to wait for another dockfence to finish (watch waits; commands do not)."""
    netns = os.stat("/proc/self/ns/net").st_ino
    os.makedirs("/run/dockfence", exist_ok=True)
    deadline = time.monotonic() + wait
    with open(f"/run/dockfence/lock.{netns}", "w") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OperationalError("another dockfence is changing this host; "
                                           "try again") from None
                time.sleep(0.05)
        yield


@dataclass
class Plan:
    """What apply would do (or did), against the live table."""

    policy: policy.Policy | None  # None: nothing changed, so the policy was not even parsed
    inventory: Inventory
    desired: Ruleset | None  # None with policy
    live: Ruleset | None
    changes: list[Change]
    unchanged: bool  # the live table enforces and says exactly what apply would write
    stamp: Stamp  # what the table carries once applied
    warnings: list[str] = field(default_factory=list)


def desired_state(policy_path: str, inv: Inventory | Callable[[], Inventory] | None = None,
                  ) -> tuple[policy.Policy, Inventory, Ruleset]:
    """The policy, Docker's inventory (given, being asked: later(), or None: asked now) and
    the rules they make."""
    from . import policy
    from .compile import compile_policy

    # Docker answers while the policy is read (its lists can take a second)
    asked = later(discovery.inventory, "docker") if inv is None else inv
    pol = policy.load(policy_path)
    inv = asked() if callable(asked) else asked
    return pol, inv, compile_policy(pol, inv)


def stamp_of(pol: policy.Policy, inv: Inventory) -> Stamp:
    return Stamp(pol.digest, inventory_digest(inv))


def live_rules() -> Ruleset | None:
    """What dockfence enforces now, read back from the kernel; None if not applied."""
    doc = nft.live_json()
    return None if doc is None else nft.parse_live(doc)


def trusted_live() -> Ruleset | None:
    """What dockfence enforces now: the record of the last apply while the table carries the
    stamp it was recorded with (one small set read, whatever the lists hold), else the whole
    table read back. Like apply, this trusts the stamp; `plan` and `doctor` read everything."""
    exists, live_st = nft.read_stamp()
    if not exists:
        return None
    return (record.ruleset(live_st) if live_st else None) or live_rules()


def enforced(pol: policy.Policy, inv: Inventory) -> tuple[bool, bool]:
    """(dockfence is applied, the live table was made from this policy and inventory), told by
    the table's stamp without reading the table."""
    exists, live = nft.read_stamp()
    return exists, live == stamp_of(pol, inv)


def make_plan(policy_path: str) -> Plan:
    """What apply would change, against the whole live table read back (exact: a table edited
    by hand shows, whatever its stamp says)."""
    from .plan import diff

    listing = nft.live_json_later()  # nft lists the table while the policy is read and compiled
    pol, inv, desired = desired_state(policy_path)
    st = stamp_of(pol, inv)
    doc = listing()
    live = nft.parse_live(doc) if doc is not None else None
    unchanged = (live is not None and nft.same_table(live, desired)
                 and nft.same_structure(doc, nft.render(desired, st, elements=False)))  # type: ignore[arg-type]
    return Plan(pol, inv, desired, live, diff(live, desired), unchanged, st,
                list(desired.warnings))


class RolledBack(OperationalError):
    """The new rules were not confirmed in time; the previous ones are back."""


def _unchanged_by_stamp(policy_path: str, text: str | None,
                        asked: Callable[[], Inventory]) -> Plan | None:
    """The no-op answer in constant time: the digests of the policy's files and of Docker's
    inventory (`asked`: being asked) equal the live table's stamp, and the last apply recorded
    its warnings. Nothing is parsed, compiled, rendered or read back. None when that cannot be
    told."""
    digest = listfiles.inputs_digest(policy_path, text)
    if digest is None:
        return None
    live = nft.live_stamp()
    inv = asked()
    st = Stamp(digest, inventory_digest(inv))
    warnings = record.warnings(st) if live == st else None
    if warnings is None:
        return None
    return Plan(None, inv, None, None, [], True, st, warnings)


def apply(policy_path: str, force: bool = False, confirm: Callable[[], bool] | None = None,
          full: bool = False, lock_wait: float = 0.0, rebuild: bool = False,
          download: bool = True, inventory: Callable[[], Inventory] | None = None,
          ) -> tuple[Plan, int]:
    """Make the kernel match the policy in one transaction. Returns the plan and how many
    established connections were cut because the new policy denies them.

    Unless `full`, a table whose stamp says it was made from these very inputs is trusted, and
    so is the record of what the last apply wrote: nothing big is read back. `full` reads the
    live table as plan does (a table edited by hand is rewritten).

    `inventory`: Docker's inventory, already being asked (run.later(discovery.inventory)).

    With `confirm`, the new rules stay only if it returns True (the operator could still reach
    the host); otherwise the previous table is restored, in one transaction too, and nothing
    was cut.

    Without `download`, downloaded lists are read from their saved copies as they are (watch
    downloads beside its loop, and never under this lock)."""
    with host_lock(lock_wait):
        saved = state.Record()  # what `restore` loads at the next boot
        # Docker answers while the policy's inputs are digested and the stamp is read (dockerd
        # takes ~20 ms, /info alone ~10: most of what a no-op apply waits for)
        quick_try = not full and not rebuild and saved.exists()
        asked = inventory or (later(discovery.inventory, "docker") if quick_try else None)
        # Downloaded lists due for a refresh first: the digest below covers their saved copies,
        # so an unchanged download is still a no-op. A failed one keeps its last good copy.
        from . import listurls

        text = listfiles.read_text(policy_path)  # read once: a big inline list is megabytes
        fetched = listurls.refresh_lists(policy_path, text=text) if download else []
        ssh = None if force else os.environ.get("SSH_CONNECTION")
        if quick_try and asked is not None:
            quick = _unchanged_by_stamp(policy_path, text, asked)
            # Over SSH, rules that would deny the session's next login are refused even when
            # they are already in force: checked on the recorded rules (the same, by stamp).
            if quick is not None and not (ssh and _locks_out(quick.stamp, quick.inventory, ssh)):
                quick.warnings[:0] = fetched
                return quick, 0
        from .plan import diff

        exists, live_st = nft.read_stamp()
        live = record.ruleset(live_st) if exists and live_st and not full else None
        # without a record, nft lists the table while the policy is read and compiled
        listing = nft.live_json_later() if exists and live is None else None
        try:
            pol, inv, desired = desired_state(policy_path, asked)
        except listurls.MissingCopy as exc:  # say why the download failed, too
            raise listurls.MissingCopy("\n".join([*fetched, str(exc)])) from None
        risk = lockout(desired, inv, ssh)
        if risk:
            raise LockoutError(risk)
        st = stamp_of(pol, inv)
        doc = None
        if listing is not None:
            doc = listing()
            live = nft.parse_live(doc) if doc is not None else None
        # a rebuild loads the same decisions: the counters keep what they counted
        counts = (nft.live_counters() or {}) if rebuild else None
        # rebuild: the same decisions, but load the table as render() writes it (watch's element
        # updates leave new ports without chains of their own)
        unchanged = not rebuild and live is not None and nft.same_table(live, desired) and (
            doc is None or nft.same_structure(doc, nft.render(desired, st, elements=False)))
        plan = Plan(pol, inv, desired, live, diff(live, desired), unchanged, st,
                    fetched + list(desired.warnings))
        if unchanged:
            if live_st != st:  # same rules from other bytes (a comment, a restart): restamp
                nft.replace_stamp(st)
            if live_st != st or not saved.exists():
                saved.save_table(nft.render(desired, st))
            record.save(st, desired)
            return plan, 0
        previous = nft.live_text() if confirm is not None and exists else None
        # A big table's sets are filled beside the live rules from now on (see
        # backends.staged), while the whole table is rendered and recorded for `restore`.
        stage = _stage(desired, st, counts, plan)
        # Recorded first: if that fails nothing changes (a stale record would bring back older
        # rules at the next boot); if the kernel refuses, the old record is put back.
        try:
            table = nft.render(desired, st, counts=counts)
            forget = saved.save_table(table)
        except BaseException:
            if stage is not None:
                stage.abort()
            raise
        try:
            if stage is None:
                loaded = load_later(table)
                # While nft loads: the record of these rules. It is keyed by the new stamp, so
                # it describes nothing until the table carries that stamp.
                record.save(st, desired)
                loaded()
            else:
                try:
                    record.save(st, desired)
                except BaseException:
                    stage.abort()
                    raise
                _switch(stage, table, plan)
        except BaseException:
            forget()
            record.forget()
            raise
        if nft.live_stamp() != st:
            forget()
            _restore(previous if confirm is not None or live is None else
                     nft.render(live, live_st), exists)
            raise OperationalError("the kernel does not show the rules just applied; the "
                                   "previous rules were restored")
        if confirm is not None and not confirm():
            forget()
            _restore(previous, exists)
            raise RolledBack("not confirmed: the previous rules were restored")
        from .revoke import revoke

        return plan, revoke(live, desired, inv)


def _locks_out(st: Stamp, inv: Inventory, ssh: str) -> bool:
    """Would the rules recorded for this stamp lock the SSH session out? True when unknown."""
    recorded = record.ruleset(st)
    return recorded is None or lockout(recorded, inv, ssh) is not None


def _stage(desired: Ruleset, st: Stamp, counts: dict[str, int] | None,
           plan: Plan) -> Staged | None:
    """A staged load of a big table under way, or None: load it whole."""
    from .backends import staged  # only where something changes: not on the no-op's path

    try:
        return staged.begin(desired, st, counts)
    except staged.NotStaged:
        return None
    except (OperationalError, OSError) as exc:  # refused to declare the sets: nothing changed
        _whole_instead(plan, exc)
        return None


def _switch(stage: Staged, table: str, plan: Plan) -> None:
    """Switch to the staged sets; if the kernel refuses, load `table` whole (the live rules
    are as they were until one of them commits)."""
    from . import bans

    try:
        stage.switch(bans.pieces(bans.load(), time.time()))
    except OperationalError as exc:
        _whole_instead(plan, exc)
        load(table)


def _whole_instead(plan: Plan, refused: Exception) -> None:
    plan.warnings.append(f"a staged load was refused ({refused}); loaded the whole table "
                         "instead")


def load(table: str) -> None:
    """The one place a whole table is handed to the kernel: one atomic transaction. Bans are
    not the policy's: the rebuilt table carries them over from their record."""
    load_later(table)()


def load_later(table: str) -> Callable[[], object]:
    """load(), with nft working from now on: the returned function waits for it (and raises
    what load() would)."""
    from . import bans

    held = bans.pieces(bans.load(), time.time())
    return nft.apply_text_later(nft.transaction(nft.with_bans(table, held)))


def restore() -> bool:
    """Load the last recorded table (and watch's updates since) in one transaction, without
    Docker or the policy, bans included. False when nothing was recorded; StateError (nothing
    changed) when the record is damaged."""
    loaded = state.Record().load()
    if loaded is None:
        return False
    with host_lock():
        load(loaded[1])
    return True


def _restore(previous: str | None, existed: bool) -> None:
    record.forget()
    if previous is None or not existed:
        nft.apply_text(nft.removal())
    else:
        nft.apply_text(nft.removal() + previous)


def remove() -> bool:
    with host_lock():
        record.forget()
        state.Record().forget()  # nothing to bring back at the next boot
        if not nft.read_stamp()[0]:
            return False
        nft.apply_text(nft.removal())
        return True


def lockout(rs: Ruleset, inv: Inventory, ssh_connection: str | None) -> str | None:
    """If this command runs over SSH, refuse rules that would deny that very session's port:
    established flows survive, but the next login would not."""
    if not ssh_connection:
        return None
    from .explain import explain

    try:
        client, _, server, port = ssh_connection.split()
        verdict = explain(rs, inv, ipaddress.ip_address(client), int(port), "tcp",
                          ipaddress.ip_address(server))
    except ValueError:
        return None
    if verdict.verdict == "deny":
        return (f"this policy would lock you out: your SSH session from {client} to port {port} "
                f"would be denied ({verdict.decided_by}); allow it under host.allow, or pass "
                "--force if that is what you want")
    return None


