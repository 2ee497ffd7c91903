"""The `dockfence` command: a thin layer over the engine. Exit codes: 0 ok, 1 operational
failure, 2 invalid policy or usage; nothing is changed on any failure."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import engine, policy
from . import watch as live_guard
from .errors import DockfenceError
from .explain import explain as explain_verdict
from .explain import parse_port_arg
from .plan import Change

DEFAULT_POLICY = "/etc/dockfence/policy.yaml"
# Piped output (logs, CI) gets a wide fixed width instead of rich's 80 columns.
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)


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
    for w in warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", markup=True)


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
@_errors
def apply(policy_path: str, force: bool, confirm_seconds: int | None) -> None:
    """Make the host match the policy, as one atomic transaction."""
    plan, cut = engine.apply(policy_path, force=force,
                             confirm=_ask(confirm_seconds) if confirm_seconds else None)
    _warn(plan.warnings)
    if plan.unchanged:
        out.print("[green]No changes.[/] The live rules already match the policy.")
        return
    _show_plan(plan, verbose=False)
    changed = sum(c.kind != "keep" for c in plan.changes)
    out.print(f"[bold green]Applied[/] ({changed} change(s)) as one transaction."
              + (f" Cut {cut} established connection(s) the policy now denies." if cut else ""))


@main.command()
@policy_option
@_errors
def watch(policy_path: str) -> None:
    """Keep the rules in step with Docker: a full apply now, then element updates on every
    container or network event, and a full apply on every policy edit or when the table was
    deleted. Tells systemd when ready (Type=notify). Stop with Ctrl-C or SIGTERM: the rules
    stay."""
    policy.load(policy_path)  # refuse to start on a bad policy: exit 2, nothing changed

    def report(line: str) -> None:
        out.print(f"{time.strftime('%H:%M:%S')} {line}", markup=False)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        live_guard.run(policy_path, report, stop)
    report("stopped; the rules stay in place")


@main.command()
@json_option
@_errors
def status(as_json: bool) -> None:
    """What is enforced now: every published port and who may reach it."""
    st = engine.status()
    if as_json:
        _emit_json({"installed": st.installed, "firewall_backend": st.firewall_backend,
                    "ports": [asdict(p) for p in st.ports],
                    "host": {"rules": [dict(zip(("port", "who", "decided_by"), r, strict=True))
                                       for r in st.host_rules], "others": st.host_default},
                    "warnings": st.warnings})
        return
    if not st.installed:
        out.print("[yellow]dockfence is not applied on this host.[/]", markup=True)
    table = Table(title="Published container ports", title_justify="left")
    for col in ("container", "host address:port", "container port", "who may connect",
                "decided by"):
        table.add_column(col)
    for p in st.ports:
        who = f"[yellow]{escape(p.who)}[/]" if p.warning else escape(p.who)
        table.add_row(p.container, escape(p.host), p.container_port, who, escape(p.decided_by))
    out.print(table)
    if st.host_default is not None:
        host = Table(title="Host ports", title_justify="left")
        for col in ("port", "who may connect", "decided by"):
            host.add_column(col)
        for row in st.host_rules:
            host.add_row(*(escape(cell) for cell in row))
        host.add_row("any other", st.host_default, "host.default")
        out.print(host)
    elif st.installed:
        out.print("Host ports: not managed (the policy has no `host:` section).")
    _warn(st.warnings)


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
    try:
        src = ipaddress.ip_address(source)
        dst = ipaddress.ip_address(to) if to else None
        port_no, proto = parse_port_arg(port)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    pol, inv, rs = engine.desired_state(policy_path)
    ex = explain_verdict(rs, inv, src, port_no, proto, dst)
    applied, in_force = engine.enforced(rs)
    if as_json:
        _emit_json({**ex.as_dict(), "policy": pol.path, "applied": applied,
                    "in_force": in_force})
        return
    words = {"allow": "[bold green]ALLOWED[/]", "deny": "[bold red]DENIED[/]",
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


@main.command()
@_errors
def remove() -> None:
    """Delete everything dockfence installed (and nothing else)."""
    if engine.remove():
        out.print("Removed table inet dockfence.")
    else:
        out.print("Nothing to remove: dockfence is not installed.")


@main.command()
@_errors
def restore() -> None:
    """Load the rules applied last (recorded in $DOCKFENCE_STATE_DIR, default
    /var/lib/dockfence) without Docker or the policy: for boot, before Docker starts."""
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
