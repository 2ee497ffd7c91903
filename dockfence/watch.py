"""`dockfence watch`: the live guard that keeps the table in step with Docker.

One long-lived Docker event stream feeds a queue. Bursts are coalesced (a short quiet window),
only the containers the events name are inspected, the kept policy is compiled against the
updated inventory, and the elements that differ (verdict-map entries, bridge names, the stamp)
change in one netlink transaction, recorded first in the state journal. A full validated apply
runs at start, after every reconnect to Docker (the daemon may have changed anything
meanwhile), when the policy file changes, when the table's shape must change, and when the
table is no longer the one watch wrote (deleted by `nft flush ruleset`, replaced by someone's
`apply`). Errors never remove rules: a bad policy edit keeps the last good rules, and while
Docker is unreachable the rules stay as they are.

Downloaded lists are fetched by a thread of their own (a slow server must not hold up the
events): the loop decides when a round is due and applies what it brought, so every change to
the kernel is still made by the loop, one at a time, under the host lock.
"""

from __future__ import annotations

import gc
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import discovery, engine, listfiles, listurls, state
from . import record as applied
from .backends import netlink, staged
from .backends import nftables as nft
from .compile import compile_policy
from .errors import DockfenceError, OperationalError, PolicyError
from .incremental import Chains, ElementUpdate, closed_meanwhile, element_update, list_update
from .inventory import Container, Inventory
from .model import Ruleset
from .policy import Policy, load
from .revoke import revoke
from .stamp import Stamp, inventory_digest

if TYPE_CHECKING:
    from .metrics import Metrics

QUIET = 0.02  # a burst ends after this long without events...
BURST = 0.25  # ...or after this long in all
CHECK = 0.5  # seconds between checks of the policy file and of the table itself
LOCK_WAIT = 5.0  # how long to wait for another dockfence (a manual apply) to finish
GONE = "table inet dockfence disappeared"
# Ports an element update added jump to their allow-list's shared chain, which has no
# per-port counters; once events have been quiet this long, a full apply gives each its own.
REBUILD_AFTER = 3.0
LISTS_EVERY = 30.0  # seconds between looks at whether a downloaded list is due
# how long the downloads thread waits for the host lock to keep a copy (a manual apply holds it
# while it downloads)
KEEP_WAIT = 2 * listurls.TOTAL
JOURNAL_LIMIT = 4 << 20  # bytes of journal before the record is rewritten as one table


def notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET (Type=notify units)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.send(message.encode())
    except OSError:
        pass  # systemd gone or not ours: nothing to tell


@dataclass
class Guard:
    """What watch knows is in the kernel, and what it was made from."""

    policy: Policy
    containers: dict[str, Container]  # running containers by id
    bridges: list[str]
    routed: dict[str, set[int]]  # network id -> IP versions in routed mode
    backend: str
    ruleset: Ruleset
    chains: Chains
    handle: int | None  # the table's kernel handle when watch last wrote it
    stamp: Stamp | None  # and its stamp (a staged apply keeps the handle, not the stamp)
    # the ruleset of the table as render() wrote it (each port with its own chain), when watch
    # knows that is what the kernel holds; None: some elements may jump to shared chains
    rendered: Ruleset | None = None

    def inventory(self) -> Inventory:
        return discovery.make_inventory(self.containers.values(), self.bridges, self.backend)

    def holds(self, handle: int | None) -> bool:
        """Is the live table (whose handle is `handle`) still the one watch last wrote?"""
        return handle is not None and handle == self.handle and nft.live_stamp() == self.stamp


class _Connected:
    """The event stream is subscribed: a full sync now misses nothing."""


@dataclass(frozen=True)
class _Lost:
    why: str


@dataclass(frozen=True)
class _Downloaded:
    """A download round is over: its copies are kept (or the last good ones stay)."""

    warnings: tuple[str, ...]
    error: str | None = None  # the round failed unexpectedly


Item = discovery.Event | _Connected | _Lost | _Downloaded


def _pump(out: queue.Queue[Item], stop: threading.Event) -> None:
    """The event stream, reconnecting after any failure."""
    while not stop.is_set():
        try:
            for ev in discovery.event_stream(lambda: out.put(_Connected())):
                out.put(ev)
                if stop.is_set():
                    return
            out.put(_Lost("Docker closed the event stream"))
        except DockfenceError as exc:
            out.put(_Lost(str(exc)))
        stop.wait(1.0)


class Watcher:
    def __init__(self, policy_path: str, report: Callable[[str], None],
                 stop: threading.Event, metrics: Metrics | None = None,
                 reload: threading.Event | None = None) -> None:
        self.path = policy_path
        self.reload = reload or threading.Event()  # set: download every list now (SIGHUP)
        self.metrics = metrics
        self.report = report
        self.stop = stop
        self.events: queue.Queue[Item] = queue.Queue()
        self.guard: Guard | None = None
        self.link: discovery.DockerLink | None = None
        self.connected = False
        self.pending = ""  # why a full sync is due
        self.mtime = self._mtime()
        self.record = state.Record()
        self.received = time.monotonic()
        self.rebuild_at: float | None = None  # see REBUILD_AFTER
        self.lists_checked = float("-inf")  # see LISTS_EVERY
        self.lists_due = False
        self.rounds: queue.Queue[bool] = queue.Queue()  # to the downloads thread: force?
        self.downloading = False  # a round is in flight
        self.fetched = False  # a round is over and what it kept is not applied yet
        self.after_download = ""  # a full apply that waits for a list's first copy
        self.revocations: queue.Queue[tuple[str, Ruleset, Ruleset, Inventory]] = queue.Queue()

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> None:
        threading.Thread(target=_pump, args=(self.events, self.stop), daemon=True,
                         name="docker-events").start()
        threading.Thread(target=self._revoke, daemon=True, name="revoke").start()
        threading.Thread(target=self._download, daemon=True, name="downloads").start()
        notify("STATUS=waiting for Docker")
        while not self.stop.is_set():
            self._step(self._next_batch())
            self._ask_download()

    def _step(self, batch: list[Item]) -> None:
        changed: list[discovery.Event] = []
        for item in batch:
            if isinstance(item, _Connected):
                self.connected = True
                self.pending = "start" if self.guard is None else "Docker is back: full resync"
                self._drop_link()
            elif isinstance(item, _Lost):
                if self.connected:
                    self.report(f"Docker unreachable ({item.why}); the rules stay in "
                                "place, resync when it returns")
                self.connected = False
                self._drop_link()
            elif isinstance(item, _Downloaded):
                self._downloaded(item)
            else:
                changed.append(item)
        self._check_policy_and_table()
        if not self.connected:
            if self.pending.startswith(GONE):
                self._restore_without_docker()
            return
        if self.pending:
            self._full(self.pending)
        elif self.guard is None:  # no full apply got through: the next one covers everything
            self.fetched = False
        elif changed:
            self._incremental(changed)
        elif self.fetched:
            self._apply_downloaded()
        elif self.rebuild_at is not None and time.monotonic() >= self.rebuild_at:
            self._full("ports added since the last full apply get their own counters",
                       rebuild=True)

    def _next_batch(self) -> list[Item]:
        try:
            first = self.events.get(timeout=CHECK)
        except queue.Empty:
            return []
        batch = [first]
        self.received = time.monotonic()  # the first event of the burst: what latency counts from
        deadline = time.monotonic() + BURST
        while (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(self.events.get(timeout=min(QUIET, left)))
            except queue.Empty:
                break
        return batch

    def _check_policy_and_table(self) -> None:
        mtime = self._mtime()
        if mtime != self.mtime:
            self.mtime = mtime
            self.pending = self.pending or "policy file changed"
            self.lists_checked = float("-inf")  # it may name a new list: look now
        now = time.monotonic()
        if now >= self.lists_checked + LISTS_EVERY and not self.downloading:
            self.lists_checked = now
            self.lists_due = listurls.refresh_due(self.path)
        if self.guard is None or self.pending.startswith(GONE):
            return
        try:
            handle = netlink.table_handle(nft.TABLE)
            ours = self.guard.holds(handle)
        except (OSError, OperationalError) as exc:
            self.report(f"cannot read the table's handle and stamp: {exc}")
            return
        if handle is None:
            self.pending = f"{GONE} (nft flush ruleset? a firewall reload?): putting it back"
            self.report(self.pending)
        elif not self.pending and not ours:
            self.pending = "table inet dockfence was replaced by someone else: full resync"

    def _drop_link(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def _restore_without_docker(self) -> None:
        """The table went while no full apply can run (Docker unreachable, the policy file
        broken): the record brings the last rules back now."""
        try:
            engine.restore()
        except DockfenceError as exc:
            self.report(f"cannot restore the recorded rules: {exc}")
            return
        assert self.guard is not None
        self.guard.handle, self.guard.stamp = netlink.table_handle(nft.TABLE), nft.live_stamp()
        self.pending = ""
        self.report("restored the recorded rules")

    # --- full sync ---------------------------------------------------------------------------

    def _full(self, reason: str, rebuild: bool = False) -> None:
        started = time.monotonic()
        self.rebuild_at = None
        self.fetched = False  # it reads the copies the last round kept
        try:
            # the saved copies as they are: downloads run in their own thread, never here
            plan, cut = engine.apply(self.path, lock_wait=LOCK_WAIT, rebuild=rebuild,
                                     download=False)
            pol, desired = plan.policy, plan.desired
            if pol is None or desired is None:  # nothing changed, told by the stamp alone
                pol, _, desired = engine.desired_state(self.path, plan.inventory)
            link = self.link = self.link or discovery.DockerLink()
            bridges, routed = link.networks()
        except (PolicyError, listurls.MissingCopy) as exc:
            self._applied(started, False)
            if isinstance(exc, listurls.MissingCopy):  # a new list: tried again after a round
                self.report(f"{reason}: {exc}; the current rules stay until it is downloaded")
                self.after_download = reason
            else:
                self.report(f"{reason}: policy rejected, keeping the current rules: {exc}")
            self.pending = ""  # wait for the next edit rather than repeating the error
            if self.guard is not None:
                if netlink.table_handle(nft.TABLE) is None:  # and the table went meanwhile
                    self._restore_without_docker()
                self._ready()
            return
        except DockfenceError as exc:
            self._applied(started, False)
            self.report(f"{reason}: {exc}; retrying")
            self._drop_link()
            self.stop.wait(CHECK)
            return
        self.guard = Guard(
            policy=pol,
            containers={c.id: c for c in plan.inventory.containers},
            bridges=list(plan.inventory.bridges), routed=routed, backend=plan.inventory.
            firewall_backend, ruleset=desired, chains=nft.allow_chains(desired),
            handle=netlink.table_handle(nft.TABLE), stamp=nft.live_stamp(),
            rendered=None if plan.unchanged else desired)
        if plan.unchanged:  # possibly a table with ports a former watch added: normalise it
            self.rebuild_at = time.monotonic() + REBUILD_AFTER
        if sorted(set(bridges)) != sorted(set(plan.inventory.bridges)):
            self.pending = "networks changed during the sync"  # once more, from the start
        else:
            self.pending = ""
        self.record = state.Record()  # apply may have started a new generation
        # The kept policy and ruleset are long-lived (100,000 networks are as many objects):
        # out of the collector's sight, so no collection pauses an event for them.
        gc.collect()
        gc.freeze()
        self._applied(started, True)
        changed = sum(c.kind != "keep" for c in plan.changes)
        self.report(f"{reason}: " + ("no changes" if plan.unchanged else
                                     f"applied {changed} change(s)" +
                                     (f", cut {cut} connection(s)" if cut else "")))
        for w in plan.warnings:
            self.report(f"warning: {w}")
        self._ready()

    def _applied(self, started: float, ok: bool, new_table: bool = True,
                 event: bool = True) -> None:
        """Tell the metrics (if any) how an apply or an element update went (`event`: one
        that Docker's events asked for)."""
        if self.metrics is None:
            return
        g = self.guard
        stamp = g.stamp.text() if ok and g is not None and g.stamp is not None else None
        self.metrics.applied(time.monotonic() - started, ok, g.ruleset if ok and g else None,
                             stamp, new_table)
        if ok and event:
            self.metrics.event_enforced(time.monotonic() - self.received)

    def _ready(self) -> None:
        notify("READY=1\nSTATUS=in step with Docker")

    # --- element updates ---------------------------------------------------------------------

    def _incremental(self, events: list[discovery.Event]) -> None:
        g = self.guard
        assert g is not None
        what = ", ".join(map(str, events[:3])) + (" ..." if len(events) > 3 else "")
        try:
            link = self.link = self.link or discovery.DockerLink()
            bridges, routed = g.bridges, g.routed
            if any(e.kind == "network" and e.action in ("create", "destroy") for e in events):
                bridges, routed = link.networks()
                if any(routed.get(n, f) != f for n, f in g.routed.items()):
                    self.pending = f"{what}: a network's routing mode changed"
                    return
            containers = dict(g.containers)
            for cid in dict.fromkeys(e.id for e in events
                                     if e.kind == "container" or e.action in ("connect",
                                                                              "disconnect")):
                c = link.running(cid, routed)
                if c is None:
                    containers.pop(cid, None)
                else:
                    containers[cid] = c
        except DockfenceError as exc:
            self.report(f"{what}: {exc}; full resync")
            self.pending = "resync after a Docker error"
            self._drop_link()
            return
        answered = time.monotonic()  # Docker has answered every inspect: the rest is ours
        inv = discovery.make_inventory(containers.values(), bridges, g.backend)
        try:
            rs = compile_policy(g.policy, inv)
        except DockfenceError as exc:  # e.g. two containers on one host port, two allow-lists
            self.report(f"{what}: {exc}; the current rules stay")
            return
        stamp = replace(g.stamp, inventory=inventory_digest(inv)) if g.stamp else None
        update = element_update(g.ruleset, rs, g.chains, stamp, g.rendered)
        if update is None:
            self.pending = f"{what}: the table's shape changes"
            self._close_meanwhile(g, rs, what)
            self._full(self.pending)
            return
        done = time.monotonic()
        if update:
            committed = self._commit(what, update, rs, stamp)
            if committed is None:
                return
            done = committed
        old = g.ruleset
        g.containers, g.bridges, g.routed, g.ruleset = containers, bridges, routed, rs
        g.stamp = stamp
        if not update:
            return
        self._applied(answered, True, new_table=False)
        if any(op.set not in (nft.STAMP_SET, nft.BRIDGE_SET) for op in update.ops):
            self.rebuild_at = time.monotonic() + REBUILD_AFTER
        elif g.rendered is old:  # Docker's bridges only: still what render() writes
            self._exact(rs, stamp)
        took, ours = (done - self.received) * 1000, (done - answered) * 1000
        # Docker answers an inspect only once the container's start (or stop) is complete: the
        # event comes earlier, so `took` is mostly Docker's own work
        self.report(f"{what}: updated {len(update.ops)} element set(s) in {took:.0f} ms "
                    f"({ours:.1f} ms after Docker's answer)")
        if any(not op.add and op.set != nft.STAMP_SET for op in update.ops):
            # flows the new elements deny: reading conntrack can take a while on a busy host,
            # so it runs beside the loop, never between an event and the next update
            self.revocations.put((what, old, rs, inv))

    def _commit(self, what: str, update: ElementUpdate, rs: Ruleset,
                stamp: Stamp | None) -> float | None:
        """Send an element update to the table watch last wrote, recorded first (the next boot
        loads it) and made durable right after. When it was sent; None when it failed (a full
        resync is then due)."""
        assert self.guard is not None
        try:
            with engine.host_lock(LOCK_WAIT):
                if not self.guard.holds(netlink.table_handle(nft.TABLE)):
                    raise OperationalError("the table changed under watch")
                undo = self.record.append(update.text, durable=False)
                try:
                    netlink.commit(nft.TABLE, staged.aimed(update.ops))
                except BaseException:
                    undo()
                    raise
                done = time.monotonic()
                self.record.sync()
                if self.record.journal_size() > JOURNAL_LIMIT:
                    # compaction: the table as it now is (equal to a full render of it)
                    self.record.save_table(nft.render(rs, stamp))
                return done
        except (DockfenceError, OSError) as exc:
            self.report(f"{what}: {exc}; full resync")
            self.pending = "resync after a failed update"
            return None

    def _exact(self, rs: Ruleset, stamp: Stamp | None) -> None:
        """The table is again exactly what render() writes for `rs` (every port with its own
        chain), under a new stamp: recorded as apply records it, so that `status`, `log` and a
        no-op `apply` trust the stamp rather than read a table of a million addresses back."""
        assert self.guard is not None
        self.guard.rendered = rs
        if stamp is not None:
            applied.save(stamp, rs)

    # --- downloaded lists --------------------------------------------------------------------

    def _ask_download(self) -> None:
        """A round of downloads when one is due (or SIGHUP asked for one), run by the downloads
        thread: one at a time (a SIGHUP meanwhile: another round after it), and none while the
        last round's copies wait to be applied (the loop reads them outside the host lock)."""
        if self.downloading or self.fetched or not (self.lists_due or self.reload.is_set()):
            return
        force = self.reload.is_set()
        self.reload.clear()
        self.lists_due, self.downloading = False, True
        self.rounds.put(force)

    def _download(self) -> None:
        """The downloads thread. A copy is written under the host lock (apply reads copies
        under it); every round ends with an item on the events queue, whatever happened."""
        while True:
            force = self.rounds.get()
            try:
                warnings = listurls.refresh_lists(
                    self.path, force=force, keeping=lambda: engine.host_lock(KEEP_WAIT))
                item = _Downloaded(tuple(warnings))
            except Exception as exc:  # reported by the loop; the next round runs
                item = _Downloaded((), f"{type(exc).__name__}: {exc}")
            self.events.put(item)

    def _downloaded(self, item: _Downloaded) -> None:
        self.downloading, self.fetched = False, True
        if item.error:
            self.report(f"downloading lists failed: {item.error}; the saved copies stay in "
                        "force")
        for warning in item.warnings:
            self.report(f"warning: {warning}")
        if self.after_download:  # the full apply that waited for a list's first copy
            self.pending = self.pending or self.after_download
            self.after_download = ""

    def _apply_downloaded(self) -> None:
        """What a download round kept: when a list changed, only the elements of its sets
        change, in one transaction (a full apply when the table's structure must change too).
        A failed download kept the last good copy, and so the rules."""
        g = self.guard
        assert g is not None
        self.fetched = False
        started = time.monotonic()
        what = "downloaded lists refreshed"
        if g.stamp is not None and listfiles.inputs_digest(self.path) == g.stamp.policy:
            return  # the same copies as before
        try:
            pol = load(self.path)
            inv = g.inventory()
            rs = compile_policy(pol, inv)
        except DockfenceError as exc:  # the policy file broke meanwhile: its edit is reported
            self.report(f"{what}: {exc}; the current rules stay")
            return
        stamp = replace(g.stamp, policy=pol.digest) if g.stamp else None
        update = list_update(g.ruleset, rs, stamp)
        if update is None:
            self.pending = f"{what}: the table's structure changes"
            return
        if update and self._commit(what, update, rs, stamp) is None:
            return
        old = g.ruleset
        exact = g.rendered is old
        g.rendered = rs if exact else None
        g.policy, g.ruleset, g.chains, g.stamp = pol, rs, nft.allow_chains(rs), stamp
        if not update:
            return
        if exact:
            self._exact(rs, stamp)
        self._applied(started, True, new_table=False, event=False)
        sets = sorted({op.set for op in update.ops} - {nft.STAMP_SET})
        self.report(f"{what}: updated the elements of {', '.join(sets)} in "
                    f"{(time.monotonic() - started) * 1000:.0f} ms")
        self.revocations.put((what, old, rs, inv))  # flows from addresses a list dropped

    def _close_meanwhile(self, g: Guard, rs: Ruleset, what: str) -> None:
        """Before a full apply: a port newly published on one host address must not take the
        allow-list of the port's gate on every address meanwhile (see closed_meanwhile). Not
        recorded: it only narrows, and the full apply right after replaces it."""
        interim = closed_meanwhile(g.ruleset, rs)
        update = None if interim is None else element_update(g.ruleset, interim, g.chains,
                                                             None, g.rendered)
        if not update:
            return
        try:
            with engine.host_lock(LOCK_WAIT):
                if g.holds(netlink.table_handle(nft.TABLE)):
                    netlink.commit(nft.TABLE, staged.aimed(update.ops))
        except (DockfenceError, OSError) as exc:
            self.report(f"{what}: cannot close the port meanwhile: {exc}")
            return
        assert interim is not None
        closed = [f"{o.where()}/{o.proto}" for o, n in zip(g.ruleset.container_gates,
                                                            interim.container_gates, strict=True)
                  if o is not n]
        self.report(f"{what}: new connections to port {', '.join(closed)} refused until the "
                    "full apply lands")

    def _revoke(self) -> None:
        while True:
            what, old, new, inv = self.revocations.get()
            try:
                cut = revoke(old, new, inv)
            except DockfenceError as exc:
                self.report(f"{what}: cutting connections failed: {exc}")
                continue
            if cut:
                self.report(f"{what}: cut {cut} connection(s)")


def run(policy_path: str, report: Callable[[str], None], stop: threading.Event,
        metrics: Metrics | None = None, reload: threading.Event | None = None) -> None:
    """Watch until `stop` is set; the rules stay in place afterwards. Setting `reload`
    downloads every list the policy names now, whatever the age of its copy."""
    try:
        Watcher(policy_path, report, stop, metrics, reload).run()
    finally:
        notify("STOPPING=1")
