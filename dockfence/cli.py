"""The `dockfence` command: a thin layer over the engine. Exit codes: 0 ok, 1 operational
failure, 2 invalid policy or usage; nothing is changed on any failure.

The command line is parsed with the standard library's argparse: click cost ~20 ms of start-up
on every command (its imports: inspect, uuid, platform, datetime), a seventh of the 150 ms a
no-op `apply` may take (issue 7, scripts/bench_commands.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import __version__
from .console import err, escape, out
from .errors import DockfenceError, UsageError

# Every command imports what it needs when it runs: `--help` and `check` never load the rule
# engine or rich, and only commands that ask Docker load the Docker client. (`--help` does not
# even load dataclasses or ipaddress: tests/test_cli.py.)
if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv6Address

    from . import engine
    from .model import Proto
    from .plan import Change

    IPAddress = IPv4Address | IPv6Address

DEFAULT_POLICY = "/etc/dockfence/policy.yaml"
# the top level's help is printed as written (it lists the commands): lines fit 80 columns
DESCRIPTION = """\
Who may reach which published Docker container port: source allow-lists enforced
with nftables on every path into a container."""
EPILOG = """\
Run `dockfence COMMAND -h` for what a command does and its options.
Exit codes: 0 ok, 1 operational failure (nothing changed), 2 invalid policy or usage."""

# --- argument types: a bad value is a usage error (exit 2) naming it --------------------------

def _file(text: str) -> str:
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
    return text


def _directory(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def _seconds(text: str) -> int:
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if not 1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{seconds} is not in the range 1..3600 seconds")
    return seconds


def _address(text: str) -> IPAddress:
    import ipaddress

    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> tuple[int, Proto]:
    from .explain import parse_port_arg

    try:
        return parse_port_arg(text)
    except ValueError as exc:  # name the value when the message does not ("invalid port 0")
        shown = str(exc) if repr(text) in str(exc) else f"{text!r}: {exc}"
        raise argparse.ArgumentTypeError(shown) from None


# --- the command table: each command is a function taking its options as keywords -------------

Option = tuple[tuple[str, ...], dict[str, Any]]
Command = Callable[..., int | None]
_COMMANDS: dict[str, tuple[Command, str, tuple[Option, ...]]] = {}


def opt(*flags: str, **settings: Any) -> Option:
    """One argparse argument of a command (add_argument's parameters)."""
    return flags, settings


def command(name: str, summary: str, *options: Option) -> Callable[[Command], Command]:
    """Register a command: its name, the line `dockfence -h` shows, its options; the function's
    docstring is its `-h` description."""
    def register(fn: Command) -> Command:
        _COMMANDS[name] = (fn, summary, options)
        return fn
    return register


# its default is read when the parser is built, on every run ($DOCKFENCE_POLICY as it is now)
POLICY = opt("--policy", dest="policy_path", metavar="FILE", type=_file,
             help=f"Policy file (default: $DOCKFENCE_POLICY, then {DEFAULT_POLICY}).")
JSON = opt("--json", dest="as_json", action="store_true", help="Machine-readable output.")


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, the terminal's width, or 80."""
    with contextlib.suppress(KeyError, ValueError):
        if (columns := int(os.environ["COLUMNS"])) > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's layout at the terminal's width, found without importing shutil as argparse
    does for every argument it adds (shutil pulls in bz2 and lzma: ~2 ms of start-up)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


class _ListingFormatter(_Formatter, argparse.RawDescriptionHelpFormatter):
    """The top level's help: its description (the list of commands) printed as written."""


def _parser() -> argparse.ArgumentParser:
    """The top level: `-h`, `--version`, and what names no command. One parser, not one per
    command (argparse subparsers: ~0.3 ms each, it looks up a translation for every message)."""
    width = max(map(len, _COMMANDS)) + 2
    listing = "\n".join(f"  {name:{width}}{summary}" for name, (_, summary, _) in _COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="dockfence", usage="%(prog)s [-h] [--version] COMMAND [ARGS...]",
        description=f"{DESCRIPTION}\n\ncommands:\n{listing}", epilog=EPILOG, allow_abbrev=False,
        formatter_class=_ListingFormatter)
    parser.add_argument("--version", action="version", version=f"dockfence, version "
                        f"{__version__}", help="show the version and exit")
    parser.add_argument("command", nargs="?", choices=list(_COMMANDS), metavar="COMMAND",
                        help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _command_parser(name: str) -> argparse.ArgumentParser:
    fn, _, options = _COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"dockfence {name}", description=fn.__doc__,
                                     allow_abbrev=False, formatter_class=_Formatter)
    for flags, settings in options:
        parser.add_argument(*flags, **settings)
    if POLICY in options:  # a string default goes through the type check, like a value
        parser.set_defaults(policy_path=os.environ.get("DOCKFENCE_POLICY") or DEFAULT_POLICY)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default: sys.argv[1:]) and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv or argv[0] not in _COMMANDS:  # -h, --version, no or an unknown command
            top = _parser()
            given = top.parse_args(argv)
            if given.command is None:  # `dockfence` alone: the help, as a usage error
                top.print_help(sys.stderr)
                return 2
            argv = [given.command, *given.args]  # `dockfence -- apply ...`
        name = argv[0]
        args = vars(_command_parser(name).parse_args(argv[1:]))
    except SystemExit as exc:  # -h, --version (0) and usage errors (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _COMMANDS[name][0](**args) or 0
    except DockfenceError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nAborted!", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `dockfence status | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError):  # no flush error at exit either
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run() -> NoReturn:
    """The program (`dockfence`, `python3 -m dockfence`): main(), then out of the process at
    once. Tearing the interpreter down would free what the command held object by object (~30
    ms after an apply of 100,000 addresses, ~40 ms with a million), and nothing is left to do
    (every thread has been joined or is a daemon, every file written is closed). Under a tracer
    or a profiler it exits as usual, so that they keep what they gathered."""
    code = main()
    if sys.gettrace() is not None or sys.getprofile() is not None:
        raise SystemExit(code)  # coverage or cProfile: they write their data at exit
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that left, a closed stream
            stream.flush()
    os._exit(code)


# --- output helpers ---------------------------------------------------------------------------

def _echo(text: str, stream: TextIO | None = None) -> None:
    """One line, flushed at once (the order of stdout and stderr lines stays as written)."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _style(word: str, colour: int, stream: TextIO) -> str:
    """`word` in an ANSI colour on a terminal (not with $NO_COLOR), as itself elsewhere."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return f"\x1b[{colour}m{word}\x1b[0m" if tty and not os.environ.get("NO_COLOR") else word


def _warn(warnings: list[str]) -> None:
    # plain writes, not rich: a no-op apply prints only this and must not pay for rich's imports
    for w in warnings:
        _echo(_style("warning:", 33, sys.stderr) + f" {w}", sys.stderr)


def _no_changes() -> None:
    _echo(_style("No changes.", 32, sys.stdout) + " The live rules already match the policy.")


def _emit_json(data: object) -> None:
    _echo(json.dumps(data, indent=2, default=str))


# --- the commands -------------------------------------------------------------------------------

@command("check", "Validate the policy file; print OK.", POLICY)
def check(policy_path: str) -> None:
    """Validate the policy file; print OK."""
    from . import policy

    policy.load(policy_path)
    _echo("OK")


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


@command("plan", "Show what apply would change; change nothing.", POLICY, JSON,
         opt("-v", "--verbose", action="store_true", help="Also list what stays the same."))
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


@command("apply", "Make the host match the policy, as one atomic transaction.", POLICY,
         opt("--force", action="store_true",
             help="Apply even if it would deny your own SSH session."),
         opt("--confirm", dest="confirm_seconds", type=_seconds, metavar="SECONDS",
             help="Keep the new rules only if you confirm within SECONDS (1 to 3600; type "
             "yes); otherwise roll back. For remote sessions, like iptables-apply."),
         opt("--full", action="store_true",
             help="Read the whole live table back instead of trusting its stamp (rewrites a "
             "table edited by hand)."))
def apply(policy_path: str, force: bool, confirm_seconds: int | None, full: bool) -> None:
    """Make the host match the policy, as one atomic transaction."""
    from . import discovery
    from .run import later

    # Docker is asked first: dockerd answers (~20 ms, /info alone ~10) while the rest of the
    # engine is imported and the policy's inputs are digested
    asked = later(discovery.inventory, "docker")
    from . import engine

    plan, cut = engine.apply(policy_path, force=force,
                             confirm=_ask(confirm_seconds) if confirm_seconds else None,
                             full=full, inventory=asked)
    _warn(plan.warnings)
    if plan.unchanged:
        _no_changes()
        return
    _show_plan(plan, verbose=False)
    changed = sum(c.kind != "keep" for c in plan.changes)
    out.print(f"[bold green]Applied[/] ({changed} change(s)) as one transaction."
              + (f" Cut {cut} established connection(s) the policy now denies." if cut else ""))


@command("watch", "Keep the rules in step with Docker and the policy.", POLICY,
         opt("--metrics", dest="metrics_at", metavar="ADDRESS:PORT",
             help="Serve Prometheus metrics on this address only (e.g. 127.0.0.1:9464)."))
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

        address, port = parse_address(metrics_at)  # a bad ADDRESS:PORT: exit 2, named
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


@command("log", "Refused attempts, and the policy line that said no.",
         opt("-f", "--follow", action="store_true",
             help="Keep printing refused attempts as they happen."),
         JSON)
def log_cmd(follow: bool, as_json: bool) -> None:
    """Refused attempts: when, from where, what was asked for, and the policy line that said no.
    Recorded while `dockfence watch` (or `dockfence log --follow`) runs; floods are summarised.
    """
    from . import refusals
    from .nflog import GroupBusy

    def show(r: refusals.Record) -> None:
        _echo(json.dumps(refusals.as_json(r)) if as_json else r.line())

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


@command("status", "What is enforced now: every published port and who may reach it.", JSON)
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


@command("explain", "Would SOURCE reach PORT? The verdict and the deciding line.",
         opt("source", metavar="SOURCE", type=_address,
             help="The client's address (IPv4 or IPv6)."),
         opt("port", metavar="PORT", type=_port,
             help="The port it connects to: PORT, PORT/tcp or PORT/udp."),
         opt("--to", metavar="ADDRESS", type=_address, help="Destination address (a host "
             "address, or a container address for direct routing)."),
         POLICY, JSON)
def explain_cmd(source: IPAddress, port: tuple[int, Proto], to: IPAddress | None,
                policy_path: str, as_json: bool) -> None:
    """Would SOURCE get through to PORT[/PROTO]? The verdict and the policy line that decided."""
    from dataclasses import replace

    from . import banning, engine
    from .explain import explain as explain_verdict

    pol, inv, rs = engine.desired_state(policy_path)
    ex = explain_verdict(rs, inv, source, *port, to)
    ban = banning.ban_of(source)
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


@command("doctor", "Check that dockfence holds here, with the fix for each problem.",
         POLICY, JSON)
def doctor(policy_path: str, as_json: bool) -> int:
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
    return 1 if doc.failed(checks) else 0


@command("ban", "Refuse an address or CIDR everywhere dockfence filters.",
         opt("address", metavar="ADDRESS", help="An address or a CIDR."),
         opt("--for", dest="duration", default="forever", metavar="DURATION",
             help="How long: 90, 90s, 10m, 1h, 2d, 1w, or forever (fail2ban's -1 too; "
             "default: forever)."),
         opt("--reason", default="", metavar="TEXT",
             help="A note kept with the ban (shown by `bans`)."),
         opt("--force", action="store_true",
             help="Ban even the address of your own SSH session."))
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


@command("unban", "Lift a ban.",
         opt("address", metavar="ADDRESS", help="A banned address or CIDR."))
def unban(address: str) -> None:
    """Lift a ban."""
    from . import banning

    if banning.unban(address):
        out.print(f"Unbanned {escape(address)}.")
    else:
        out.print(f"{escape(address)} was not banned.")


@command("bans", "The bans in force and how long each has left.", JSON)
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


@command("schema", "Print the policy's JSON Schema (for editors).")
def schema() -> None:
    """Print the policy's JSON Schema (for editors' YAML language servers)."""
    from . import policy

    _echo(json.dumps(policy.json_schema(), indent=2))


@command("init", "Print a starting policy for the containers running now.",
         opt("-o", "--output", type=_file, metavar="FILE",
             help="Write the policy to this new file (never overwritten) instead of stdout."))
def init(output: str | None) -> None:
    """Print a starting policy for the containers running now: every published port as a rule
    with an empty allow-list to fill in, everything else denied."""
    from .discovery import inventory
    from .starter import starting_policy

    if output is not None and os.path.lexists(output):  # say so before asking Docker
        raise UsageError(f"{output} exists: dockfence init never overwrites a file")
    text = starting_policy(inventory())
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
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


@command("remove", "Delete everything dockfence installed (and nothing else).")
def remove() -> None:
    """Delete everything dockfence installed (and nothing else)."""
    from . import engine

    if engine.remove():
        out.print("Removed table inet dockfence.")
    else:
        out.print("Nothing to remove: dockfence is not installed.")


@command("restore", "Load the rules applied last (at boot, before Docker).")
def restore() -> None:
    """Load the rules applied last (recorded in $DOCKFENCE_STATE_DIR, default
    /var/lib/dockfence) without Docker or the policy: for boot, before Docker starts."""
    from . import engine

    if engine.restore():
        out.print("Restored the rules applied last (table inet dockfence).")
    else:
        out.print("Nothing saved: dockfence has not applied anything on this host.")


@command("demo", "Prove it with real packets in a sandboxed Docker host.",
         opt("--docker-bin-dir", type=_directory, metavar="DIRECTORY",
             help="Run the sandbox's dockerd from this directory (e.g. Docker 28.5)."),
         opt("--keep", action="store_true",
             help="Leave the sandbox running (prints how to remove it)."))
def demo(docker_bin_dir: str | None, keep: bool) -> int:
    """Build a sandboxed Docker host in network namespaces, apply the django/postgres example
    policy, and prove with real packets who gets in. Needs root; touches only its namespaces."""
    from .demo import run_demo  # the lab is only needed here

    if os.geteuid() != 0:
        raise UsageError("the demo creates network namespaces and runs dockerd: run as root")
    return run_demo(out, docker_bin_dir=docker_bin_dir, keep=keep)
