"""Prometheus metrics for `dockfence watch --metrics ADDRESS:PORT`.

The kernel's counters are read at scrape time (one small `nft list counters`); the table's
counters restart at every apply (it is replaced whole), so this module folds them into totals
that only grow while watch runs, as Prometheus counters must. Labels come from the rules watch
applied last, so a scrape never re-reads the (possibly huge) allow-lists. prometheus_client is
imported here only: `dockfence --help` stays fast."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from typing import Any

from .backends import nftables as nft
from .errors import UsageError
from .model import Ruleset

IN_SYNC_EVERY = 30.0  # seconds between comparisons of the live table with the applied one

LabelSet = tuple[str, str, str, str]  # kind, container, host_port, proto


def parse_address(text: str) -> tuple[str, int]:
    """`127.0.0.1:9464`, `[::1]:9464`: an explicit address (never a wildcard by omission)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
        if not sep or not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise UsageError(f"--metrics {text!r}: expected ADDRESS:PORT, e.g. 127.0.0.1:9464 or "
                         "[::1]:9464") from None
    return host, number


def _container(label: str) -> str:
    return label.split()[0] if label and ";" not in label else ""


def labelled(rs: Ruleset) -> dict[str, tuple[LabelSet, str]]:
    """Counter name -> (labels, "allowed"|"refused") for every counter the rules hold."""
    out: dict[str, tuple[LabelSet, str]] = {}

    def both(stem: str, labels: LabelSet) -> None:
        out[f"{stem}_allowed"] = (labels, "allowed")
        out[f"{stem}_refused"] = (labels, "refused")

    for g in rs.container_gates:
        both(nft.gate_stem(g), ("container", _container(g.label), g.where(), g.proto))
    for g in rs.host.gates if rs.host else ():
        both(nft.host_stem(g), ("host", "", str(g.ports), g.proto))
    for d in rs.direct:
        both(nft.direct_stem(d), ("direct", _container(d.label), str(d.port), d.proto))
    for sources, name in nft.allow_chains(rs):  # ports watch added since the last full apply
        both(name, ("allow-list", ", ".join(sources.names) or name, "", ""))
    out[nft.COUNTER_BANNED] = (("banned", "", "", ""), "refused")
    out[nft.COUNTER_UNKNOWN] = (("containers.default", "", "", ""),
                                "allowed" if rs.unknown_published == "allow" else "refused")
    out[nft.COUNTER_DIRECT] = (("direct routing", "", "", ""), "refused")
    out[nft.COUNTER_REVOKED] = (("revoked", "", "", ""), "refused")
    if rs.host is not None:
        out[nft.COUNTER_HOST] = (("host.default", "", "", ""),
                                 "allowed" if rs.host.default == "allow" else "refused")
    return out


class Metrics:
    """What watch reports (applied, event_enforced) plus the kernel's counters at scrape time.
    Thread-safe: watch calls in from its loop, the HTTP server scrapes from its own thread."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._rules: Ruleset | None = None
        self._canonical: str | None = None
        self._last: dict[str, int] = {}  # counter values at the previous read
        self._totals: dict[tuple[LabelSet, str], int] = {}
        self._in_sync: tuple[float, bool] | None = None
        self.applies = Counter("dockfence_applies", "Successful applies by watch",
                               registry=self.registry)
        self.failures = Counter("dockfence_apply_failures", "Applies that failed",
                                registry=self.registry)
        self.duration = Gauge("dockfence_last_apply_duration_seconds",
                              "How long the last apply took", registry=self.registry)
        self.latency = Histogram("dockfence_event_to_enforced_seconds",
                                 "From noticing a Docker event or policy edit to the rules "
                                 "being in force", registry=self.registry,
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.registry.register(self)  # the kernel counters, collected at scrape time
        self._server: Any = None

    # --- what watch reports --------------------------------------------------------------

    def applied(self, duration: float, ok: bool, rules: Ruleset | None = None,
                stamp: str | None = None, new_table: bool = True) -> None:
        """After every apply attempt (and every element update, `new_table` False); `rules` and
        `stamp`: what is in force now on success (the table's stamp says when it is not)."""
        self.duration.set(duration)
        if not ok:
            self.failures.inc()
            return
        self.applies.inc()
        with self._lock:
            if rules is not None and stamp is not None:
                replaced = new_table and stamp != self._canonical
                self._rules, self._canonical, self._in_sync = rules, stamp, None
                if replaced:  # a new table: all its counters hold is new (what the old one
                    self._last = {}  # counted since the last scrape is lost)
                    self._fold(nft.live_counters() or {})

    def event_enforced(self, latency: float) -> None:
        self.latency.observe(latency)

    # --- scrape ----------------------------------------------------------------------------

    def _fold(self, values: dict[str, int]) -> None:
        """Add what each kernel counter counted since the last read to the totals. A counter
        that went down was recreated by an apply: everything it holds is new."""
        if self._rules is None:
            self._last = values
            return
        names = labelled(self._rules)
        for name, value in values.items():
            if name not in names:
                continue
            before = self._last.get(name, 0)
            delta = value - before if value >= before else value
            key = names[name]
            self._totals[key] = self._totals.get(key, 0) + delta
        self._last = values

    def _sync(self) -> bool | None:
        if self._canonical is None:
            return None
        now = time.monotonic()
        if self._in_sync is None or now - self._in_sync[0] > IN_SYNC_EVERY:
            live = nft.live_stamp()  # one small set: cheap whatever the lists hold
            self._in_sync = (now, live is not None and live.text() == self._canonical)
        return self._in_sync[1]

    def describe(self) -> list[Any]:
        return []  # collected lazily: no kernel read at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            self._fold(nft.live_counters() or {})
            families = {
                kind: CounterMetricFamily(
                    f"dockfence_{kind}_connections",
                    f"New connections dockfence {kind} (per port; defaults by name)",
                    labels=["kind", "container", "host_port", "proto"])
                for kind in ("allowed", "refused")}
            for (labels, kind), value in sorted(self._totals.items()):
                families[kind].add_metric(list(labels), value)
            if self._rules is not None:
                # explicit zeros: a port nobody tried yet is a series, not a gap
                for labels, kind in labelled(self._rules).values():
                    if (labels, kind) not in self._totals:
                        families[kind].add_metric(list(labels), 0)
            yield from families.values()
            entries = GaugeMetricFamily("dockfence_list_entries",
                                        "Networks in each allow-list in force",
                                        labels=["list"])
            seen: set[str] = set()
            for g in self._rules.container_gates + (self._rules.host.gates if self._rules.host
                                                    else ()) if self._rules else ():
                name = ", ".join(g.sources.names) or str(g.sources)
                if name not in seen and not g.sources.any:
                    seen.add(name)
                    entries.add_metric([name], g.sources.count)
            yield entries
            live_bans = nft.live_bans()
            if live_bans is not None:
                yield GaugeMetricFamily("dockfence_bans", "Address blocks banned now (dockfence "
                                        "ban, fail2ban); overlapping bans count as their "
                                        "disjoint blocks", value=len(live_bans))
            sync = self._sync()
            if sync is not None:
                yield GaugeMetricFamily("dockfence_table_in_sync",
                                        "1 if the live table is what watch applied last",
                                        value=1 if sync else 0)

    # --- serving -----------------------------------------------------------------------------

    def serve(self, address: str, port: int) -> None:
        """Answer on this address only, from a daemon thread."""
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=address, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
