"""The `dockfence` command: a thin layer over the engine. Exit codes: 0 ok, 1 operational
failure, 2 invalid policy or usage; nothing is changed on any failure."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any

import click

from .console import err, escape, out
from .errors import DockfenceError, UsageError

# Every command imports what it needs when it runs: `--help` and `check` never load the rule
# engine or rich, and only commands that ask Docker load the Docker client. (`--help` does not
# even load dataclasses or ipaddress: tests/test_cli.py.)
if TYPE_CHECKING:
    from . import engine
    from .plan import Change

DEFAULT_POLICY = "/etc/dockfence/policy.yaml"


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DockfenceError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
            sys.exit(exc.exit_code)
    return wrapper


policy_option = click.option(
    "--policy", "policy_path", envvar="DOCKFENCE_POLICY", default=DEFAULT_POLICY,
    show_default=True, type=click.Path(dir_okay=False),
    help="Policy file (default: $DOCKFENCE_POLICY, then /etc/dockfence/policy.yaml).")
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _warn(warnings: list[str]) -> None:
    # click, not rich: a no-op apply prints only this and must not pay for rich's imports
    for w in warnings:
        click.echo(click.style("warning:", fg="yellow") + f" {w}", err=True)


def _no_changes() -> None:
    click.echo(click.style("No changes.", fg="green") +
               " The live rules already match the policy.")


def _emit_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dockfence")
def main() -> None:
    """Who may reach which published Docker container port: source allow-lists enforced with
    nftables on every path into a container."""


@main.command()
@policy_option
@_errors
def check(policy_path: str) -> None:
    """Validate the policy file; print OK."""
    from . import policy

    policy.load(policy_path)
    click.echo("OK")


_MARK = {"add": ("+", "green"), "remove": ("-", "red"), "change": ("~", "yellow"),
         "keep": ("=", "dim")}


def _delta(ch: Change, limit: int = 10) -> str:
    """Which sources a change adds and removes, a few of each."""
    def few(items: list[str]) -> str:
        more = f" and {len(items) - limit:,} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = [f"adds {few(ch.added)}" if ch.added else "",
             f"removes {few(ch.removed)}" if ch.removed else ""]
    text = "; ".join(p for p in parts if p)
    return f"  [{text}]" if text else ""


def _show_plan(plan: engine.Plan, verbose: bool) -> None:
    if plan.live is None:
        out.print("dockfence is not installed on this host yet; apply would install:")
    elif plan.unchanged:
        out.print("[green]No changes.[/] The live rules already match the policy.")
    for ch in plan.changes:
        if ch.kind == "keep" and not verbose and plan.live is not None:
            continue
        mark, colour = _MARK[ch.kind]
        if ch.kind == "change":
            text = f"{ch.subject}: {ch.before} -> {ch.after}{_delta(ch)}"
        else:
            text = f"{ch.subject}: {ch.after if ch.after is not None else ch.before}"
        origin = f"  [dim]({escape(ch.origin)})[/]" if ch.origin and ch.kind != "remove" else ""
        out.print(f"[{colour}]{mark} {escape(text)}[/]{origin}", markup=True)
    if not plan.unchanged and plan.live is not None and all(
            c.kind == "keep" for c in plan.changes):
        out.print("~ the decisions are the same; comments or structure differ "
                  "(policy lines moved, or the table was edited by hand): apply rewrites it")


@main.command("plan")
@policy_option
@json_option
@click.option("-v", "--verbose", is_flag=True, help="Also list what stays the same.")
@_errors
def plan_cmd(policy_path: str, as_json: bool, verbose: bool) -> None:
    """Show what apply would change against the live kernel state; change nothing."""
    from . import engine

    plan = engine.make_plan(policy_path)
    if as_json:
        _emit_json({"unchanged": plan.unchanged, "installed": plan.live is not None,
                    "changes": [c.as_dict() for c in plan.changes], "warnings": plan.warnings})
        return
    _warn(plan.warnings)
    _show_plan(plan, verbose)


def _ask(seconds: int) -> Callable[[], bool]:
    """Wait for the operator to type `yes` on stdin; silence, EOF or anything else is a no."""
    def confirm() -> bool:
        err.print(f"The new rules are in force. Type yes within {seconds} s to keep them; "
                  "otherwise the previous rules come back.", markup=False)
        ready, _, _ = select.select([sys.stdin], [], [], seconds)
        answer = sys.stdin.readline().strip().lower() if ready else ""
        return answer in ("y", "yes")
    return confirm


@main.command()
@policy_option
@click.option("--force", is_flag=True, help="Apply even if it would deny your own SSH session.")
@click.option("--confirm", "confirm_seconds", type=click.IntRange(1, 3600), metavar="SECONDS",
              help="Keep the new rules only if you confirm within SECONDS (type yes); "
              "otherwise roll back. For remote sessions, like iptables-apply.")
@click.option("--full", is_flag=True,
              help="Read the whole live table back instead of trusting its stamp (rewrites a "
              "table edited by hand).")
@_errors
def apply(policy_path: str, force: bool, confirm_seconds: int | None, full: bool) -> None:
    """Make the host match the policy, as one atomic transaction."""
    from . import engine

    plan, cut = engine.apply(policy_path, force=force,
                             confirm=_ask(confirm_seconds) if confirm_seconds else None,
                             full=full)
    _warn(plan.warnings)
    if plan.unchanged:
        _no_changes()
        return
    _show_plan(plan, verbose=False)
    changed = sum(c.kind != "keep" for c in plan.changes)
    out.print(f"[bold green]Applied[/] ({changed} change(s)) as one transaction."
              + (f" Cut {cut} established connection(s) the policy now denies." if cut else ""))


@main.command()
@policy_option
@click.option("--metrics", "metrics_at", metavar="ADDRESS:PORT",
              help="Serve Prometheus metrics on this address only (e.g. 127.0.0.1:9464).")
@_errors
def watch(policy_path: str, metrics_at: str | None) -> None:
    """Keep the rules in step with Docker: a full apply now, then element updates on every
    container or network event, and a full apply on every policy edit or when the table was
    deleted; downloaded lists are fetched when due (SIGHUP: now), and what they change is an
    element update; print every refused attempt (floods summarised). Tells systemd when ready
    (Type=notify). Stop with Ctrl-C or SIGTERM: the rules stay."""
    from . import policy
    from . import watch as live_guard

    policy.load(policy_path)  # refuse to start on a bad policy: exit 2, nothing changed
    metrics = None
    if metrics_at:
        from .metrics import Metrics, parse_address

        address, port = parse_address(metrics_at)
        metrics = Metrics()
        try:
            metrics.serve(address, port)
        except OSError as exc:
            raise UsageError(f"--metrics {metrics_at}: {exc.strerror or exc}") from None

    lock = threading.Lock()

    def report(line: str) -> None:
        with lock:
            out.print(f"{time.strftime('%H:%M:%S')} {line}", markup=False)

    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())  # `systemctl reload`
    listener = threading.Thread(target=_report_refusals, args=(report, stop), daemon=True)
    listener.start()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            live_guard.run(policy_path, report, stop, metrics=metrics, reload=reload)
    finally:
        stop.set()
        listener.join(timeout=5)
        if metrics is not None:
            metrics.close()
    report("stopped; the rules stay in place")


def _report_refusals(report: Callable[[str], None], stop: threading.Event) -> None:
    """watch's second thread: every refused attempt as a line of its output (journald)."""
    from . import refusals
    from .nflog import GroupBusy

    try:
        refusals.listen(lambda r: report(r.line(stamped=False)), stop.is_set)
    except GroupBusy:
        report("refused attempts: another process reads them (`dockfence log --follow`?); "
               "not reported here")
    except (DockfenceError, OSError) as exc:
        report(f"refused attempts cannot be read: {exc}")


@main.command("log")
@click.option("-f", "--follow", is_flag=True, help="Keep printing refused attempts as they "
              "happen.")
@json_option
@_errors
def log_cmd(follow: bool, as_json: bool) -> None:
    """Refused attempts: when, from where, what was asked for, and the policy line that said no.
    Recorded while `dockfence watch` (or `dockfence log --follow`) runs; floods are summarised.
    """
    from . import refusals
    from .nflog import GroupBusy

    def show(r: refusals.Record) -> None:
        if as_json:
            click.echo(json.dumps(refusals.as_json(r)))
        else:
            click.echo(r.line())

    if not follow:
        for r in refusals.read_history():
            show(r)
        if not refusals.recorded():
            err.print("[yellow]note:[/] nothing records refused attempts now: run `dockfence "
                      "watch` (or `dockfence log --follow`)", markup=True)
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        try:
            refusals.listen(show, stop.is_set)  # no watch running: read the kernel ourselves
        except GroupBusy:
            for r in refusals.tail_history(stop.is_set):  # watch reads them: follow its history
                show(r)


@main.command()
@json_option
@_errors
def status(as_json: bool) -> None:
    """What is enforced now: every published port and who may reach it."""
    from dataclasses import asdict

    from rich.table import Table

    from . import status as enforced

    st = enforced.status(networks=as_json)
    if as_json:
        _emit_json({"installed": st.installed, "firewall_backend": st.firewall_backend,
                    "ports": [asdict(p) for p in st.ports],
                    "host": {"rules": [{**dict(zip(("port", "who", "decided_by"), r, strict=True)),
                                        **asdict(n)}
                                       for r, n in zip(st.host_rules, st.host_counts,
                                                       strict=True)],
                             "others": st.host_default},
                    "defaults": {k: asdict(v) for k, v in st.defaults.items()},
                    "warnings": st.warnings})
        return
    if not st.installed:
        missing = any("missing (flushed?)" in w for w in st.warnings)
        out.print("[bold red]table inet dockfence is missing (flushed?).[/]" if missing else
                  "[yellow]dockfence is not applied on this host.[/]", markup=True)
    table = Table(title="Published container ports", title_justify="left")
    for col in ("container", "host address:port", "container port", "who may connect",
                "decided by"):
        table.add_column(col)
    for col in ("allowed", "refused"):  # new connections since the last apply
        table.add_column(col, justify="right")
    for p in st.ports:
        who = f"[yellow]{escape(p.who)}[/]" if p.warning else escape(p.who)
        table.add_row(p.container, escape(p.host), p.container_port, who, escape(p.decided_by),
                      _count(p.allowed), _count(p.refused))
    out.print(table)
    if st.host_default is not None:
        host = Table(title="Host ports", title_justify="left")
        for col in ("port", "who may connect", "decided by"):
            host.add_column(col)
        for col in ("allowed", "refused"):
            host.add_column(col, justify="right")
        for row, n in zip(st.host_rules, st.host_counts, strict=True):
            host.add_row(*(escape(cell) for cell in row), _count(n.allowed), _count(n.refused))
        d = st.defaults.get("host.default")
        host.add_row("any other", st.host_default, "host.default",
                     _count(d and d.allowed), _count(d and d.refused))
        out.print(host)
    elif st.installed:
        out.print("Host ports: not managed (the policy has no `host:` section).")
    if st.defaults:
        out.print("Since the last apply: " + "; ".join(
            f"{name} {n.allowed:,} allowed, {n.refused:,} refused" if name.endswith("default")
            else f"{name} {n.refused:,} " + ("dropped" if name == "revoked" else "refused")
            for name, n in st.defaults.items() if name != "host.default"), markup=False)
    _warn(st.warnings)


def _count(n: int | None) -> str:
    return "" if n is None else f"{n:,}"


@main.command("explain")
@click.argument("source")
@click.argument("port")
@click.option("--to", "to", metavar="ADDRESS", help="Destination address (a host address, or a "
              "container address for direct routing).")
@policy_option
@json_option
@_errors
def explain_cmd(source: str, port: str, to: str | None, policy_path: str, as_json: bool) -> None:
    """Would SOURCE get through to PORT[/PROTO]? The verdict and the policy line that decided."""
    import ipaddress
    from dataclasses import replace

    from . import banning, engine
    from .explain import explain as explain_verdict
    from .explain import parse_port_arg

    try:
        src = ipaddress.ip_address(source)
        dst = ipaddress.ip_address(to) if to else None
        port_no, proto = parse_port_arg(port)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    pol, inv, rs = engine.desired_state(policy_path)
    ex = explain_verdict(rs, inv, src, port_no, proto, dst)
    ban = banning.ban_of(src)
    if ban is not None and ex.verdict is not None:
        ex = replace(ex, verdict="deny", decided_by=f"dockfence ban {ban.network}",
                     reason="banned (" + (f"{ban.reason}; " if ban.reason else "") +
                     ("until unbanned" if ban.expires is None else "expires in "
                      f"{ban.remaining(time.time())}s") + "): every allow-list refuses it")
    applied, in_force = engine.enforced(pol, inv)
    if as_json:
        _emit_json({**ex.as_dict(), "policy": pol.path, "applied": applied,
                    "in_force": in_force})
        return
    words = {"allow": "[bold green]ALLOWED[/]", "deny": "[bold red]DENIED[/]",
             "depends": "[bold yellow]DEPENDS ON THE HOST ADDRESS[/]",
             None: "[bold]NOT FILTERED[/]"}
    out.print(f"{words[ex.verdict]}  {escape(ex.source)} -> {escape(ex.target)}  "
              f"(port {ex.port}/{ex.proto})", markup=True)
    out.print(f"  decided by: {ex.decided_by}", markup=False)
    out.print(f"  why: {ex.reason}", markup=False)
    if not applied:
        err.print("[yellow]note:[/] dockfence is not applied on this host: this is what the "
                  "policy would do once applied", markup=True)
    elif not in_force:
        err.print("[yellow]note:[/] the live rules differ from this policy and the running "
                  "containers (see `dockfence plan`): this is what applying it would do",
                  markup=True)


_LEVEL = {"ok": "[green]ok[/]      ", "warning": "[yellow]warning[/] ",
          "failure": "[bold red]FAILURE[/] "}


@main.command()
@policy_option
@json_option
@_errors
def doctor(policy_path: str, as_json: bool) -> None:
    """Check whether dockfence holds on this host, line by line, with the fix for each problem.
    Changes nothing. Exit 0 when nothing fails, 1 otherwise."""
    from . import doctor as doc

    checks = doc.evaluate(doc.gather(policy_path))
    if as_json:
        _emit_json(doc.as_json(checks))
    else:
        for c in checks:
            out.print(f"{_LEVEL[c.level]}{escape(c.name)}: {escape(c.message)}", markup=True,
                      soft_wrap=True)
            if c.fix and c.level != "ok":
                out.print(f"         fix: {escape(c.fix)}", markup=True, soft_wrap=True)
        summary = doc.as_json(checks)
        out.print(f"{summary['failures']} failure(s), {summary['warnings']} warning(s): "
                  + ("dockfence holds on this host." if summary["ok"] else
                     "dockfence does not hold on this host until the failures are fixed."),
                  markup=False)
    sys.exit(1 if doc.failed(checks) else 0)


@main.command()
@click.argument("address")
@click.option("--for", "duration", default="forever", show_default=True, metavar="DURATION",
              help="How long: 90, 90s, 10m, 1h, 2d, 1w, or forever (fail2ban's -1 too).")
@click.option("--reason", default="", help="A note kept with the ban (shown by `bans`).")
@click.option("--force", is_flag=True, help="Ban even the address of your own SSH session.")
@_errors
def ban(address: str, duration: str, reason: str, force: bool) -> None:
    """Refuse ADDRESS (or a CIDR) on every published port and host port dockfence filters,
    `from: any` included, and cut its established flows to containers. Survives re-apply,
    watch and restore; expires by itself."""
    from . import banning
    from .bans import parse_duration

    cut = banning.ban(address, parse_duration(duration), reason, force=force)
    out.print(f"Banned {escape(address)}" + (f" for {escape(duration)}" if duration !=
                                            "forever" else "") +
              (f"; cut {cut} established flow(s)" if cut else "") + ".")


@main.command()
@click.argument("address")
@_errors
def unban(address: str) -> None:
    """Lift a ban."""
    from . import banning

    if banning.unban(address):
        out.print(f"Unbanned {escape(address)}.")
    else:
        out.print(f"{escape(address)} was not banned.")


@main.command("bans")
@json_option
@_errors
def bans_cmd(as_json: bool) -> None:
    """The bans in force and how long each has left."""
    from rich.table import Table

    from . import banning

    rows = banning.current_bans()
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        out.print("No bans.")
        return
    table = Table(title="Bans", title_justify="left")
    for col in ("address", "expires in", "reason", "enforced"):
        table.add_column(col)
    for r in rows:
        left = r["expires_in"]
        table.add_row(str(r["network"]), "never" if left is None else f"{left}s",
                      escape(str(r["reason"])), "yes" if r["in_kernel"] else
                      "no (dockfence not applied)")
    out.print(table)


@main.command()
def schema() -> None:
    """Print the policy's JSON Schema (for editors' YAML language servers)."""
    from . import policy

    doc = policy.json_schema()
    click.echo(json.dumps(doc, indent=2))


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the policy to this new file (never overwritten) instead of stdout.")
@_errors
def init(output: str | None) -> None:
    """Print a starting policy for the containers running now: every published port as a rule
    with an empty allow-list to fill in, everything else denied."""
    from .discovery import inventory
    from .starter import starting_policy

    if output is not None and os.path.lexists(output):  # say so before asking Docker
        raise UsageError(f"{output} exists: dockfence init never overwrites a file")
    text = starting_policy(inventory())
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        with open(output, "x", encoding="utf-8") as fh:
            fh.write(text)
    except FileExistsError:
        raise UsageError(f"{output} exists: dockfence init never overwrites a file") from None
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None
    err.print(f"wrote {escape(output)}; fill in each `from:`, then `dockfence plan "
              f"--policy {escape(output)}`", markup=False)


@main.command()
@_errors
def remove() -> None:
    """Delete everything dockfence installed (and nothing else)."""
    from . import engine

    if engine.remove():
        out.print("Removed table inet dockfence.")
    else:
        out.print("Nothing to remove: dockfence is not installed.")


@main.command()
@_errors
def restore() -> None:
    """Load the rules applied last (recorded in $DOCKFENCE_STATE_DIR, default
    /var/lib/dockfence) without Docker or the policy: for boot, before Docker starts."""
    from . import engine

    if engine.restore():
        out.print("Restored the rules applied last (table inet dockfence).")
    else:
        out.print("Nothing saved: dockfence has not applied anything on this host.")


@main.command()
@click.option("--docker-bin-dir", type=click.Path(file_okay=False), default=None,
              help="Run the sandbox's dockerd from this directory (e.g. Docker 28.5).")
@click.option("--keep", is_flag=True, help="Leave the sandbox running (prints how to remove it).")
@_errors
def demo(docker_bin_dir: str | None, keep: bool) -> None:
    """Build a sandboxed Docker host in network namespaces, apply the django/postgres example
    policy, and prove with real packets who gets in. Needs root; touches only its namespaces."""
    from .demo import run_demo  # the lab is only needed here

    if os.geteuid() != 0:
        raise click.UsageError("the demo creates network namespaces and runs dockerd: run as root")
    sys.exit(run_demo(out, docker_bin_dir=docker_bin_dir, keep=keep))
