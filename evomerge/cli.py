"""``evomerge run|resume|status|export|report|validate|demo`` — the command line.

User errors (bad config, missing paths, a run directory in use) print one line naming what to
fix and exit with status 2; a run that cannot succeed exits 3, one stopped by a signal before its
search 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Sequence

EXIT_USER_ERROR = 2
EXIT_CANNOT_SUCCEED = 3
"""The search ran but could not succeed: its first candidates all failed alike, or one hung
where its worker could not be replaced (the reason is printed; the run can be resumed)."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C or SIGTERM before the search took the signal over (128 + SIGINT, as shells
report it); a run so stopped is recorded as interrupted and can be resumed."""

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""Output piped into a reader that stopped reading (``| head``): quiet, as a shell's tools end."""


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _duration(seconds: float) -> str:
    """A run's time in a summary line: seconds while short, else h:mm:ss like the progress clock."""
    return f"{seconds:.1f}s" if seconds < 60 else _clock(seconds)


def _progress_display(console=None):
    """A rich progress line that fits 80 columns: what the run is doing (starting Ray, loading
    models, scoring the experts, searching), evaluations, the overall best, busy workers, search
    time (the clock ``status`` and the summary report as ``search``) and time left; with several
    populations, their bests on a second line, cut to the terminal's width.

    Returns the display (a context manager), ``update(progress)`` for the controller and
    ``phase(text)`` for the steps before the search.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.text import Text

    class SearchProgress(Progress):
        populations = ""

        def get_renderables(self):
            yield self.make_tasks_table(self.tasks)
            if self.populations:
                yield Text(self.populations, no_wrap=True, overflow="ellipsis")

    progress = SearchProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TextColumn("workers {task.fields[busy]}"),
        TextColumn("{task.fields[clock]}"),
        TextColumn("left {task.fields[left]}"),
        console=console,
        transient=False,
    )
    task = progress.add_task("starting", total=None, best="-", busy="-", clock="-", left="-")

    def phase(text: str) -> None:
        progress.update(task, description=text)

    def update(p) -> None:
        best = "-" if p.best is None else f"{p.best:.4f}"
        several = len(p.population_best) > 1
        progress.populations = "  " + "  ".join(
            f"{name} {'-' if v is None else f'{v:.4f}'}" for name, v in p.population_best.items()
        ) if several else ""
        progress.update(
            task, description="searching", completed=p.evaluations, total=p.total, best=best,
            busy=f"{p.busy}/{p.workers}", clock=_clock(p.elapsed), left=_clock(p.time_left),
        )

    return progress, update, phase


def cmd_run(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.runs import start_run

    config = load_config(args.config)
    _override_limits(config, args)
    progress, update, phase = _progress_display()
    with progress:
        summary = start_run(
            config,
            args.config,
            Path(args.run_dir) if args.run_dir else None,
            on_progress=update,
            on_ready=lambda path: progress.console.print(f"run directory: {path}"),
            on_phase=phase,
        )
    return _print_summary(summary)


def _override_limits(config, args: argparse.Namespace) -> None:
    """Command-line limits and placement replace the config's (cron jobs set them per night)."""
    if args.address is not None:
        config.workers.address = args.address
    if args.executor is not None:
        config.executor = args.executor
    if args.max_time is not None:
        config.budget.max_time = args.max_time
    if args.deadline is not None:
        config.budget.deadline = args.deadline


def _duration_arg(value: str) -> float:
    from evomerge.config import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _deadline_arg(value: str) -> str:
    from evomerge.config import resolve_deadline

    try:
        resolve_deadline(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _path_arg(value: str) -> str:
    """A path that is not blank: an empty ``--run-dir ""`` (an unset shell variable) would
    otherwise fall back to the config's run_dir unnoticed."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _address_arg(value: str) -> str:
    from evomerge.config import check_address

    try:
        return check_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port_arg(value: str) -> int:
    """A TCP port, checked as the command line is read: the socket layer refuses others with an
    OverflowError, and ``serve`` binds only once its model has loaded."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", type=_address_arg, help="join a Ray cluster: 'auto' or ray://host:10001 (default: start Ray on this machine)"
    )
    parser.add_argument("--executor", choices=("ray", "inline"), help="override the config's executor")
    parser.add_argument("--max-time", type=_duration_arg, help="total searching time, e.g. 8h or 1h30m (overrides budget.max_time)")
    parser.add_argument("--deadline", type=_deadline_arg, help="stop asking at this time, e.g. 07:00 or 2026-11-26T07:00")


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.runs import resume_run

    progress, update, phase = _progress_display()
    with progress:
        progress.console.print(f"resuming {args.run_dir}")
        summary = resume_run(
            Path(args.run_dir), on_progress=update, adjust=lambda config: _override_limits(config, args), on_phase=phase
        )
    return _print_summary(summary)


def _print_summary(summary: dict) -> int:
    """One line on how the run ended; the exit status: ``EXIT_CANNOT_SUCCEED`` for a run that
    stopped because it cannot succeed (its candidates all fail), or that finished its budget
    without one candidate scored (a budget below ``max_failures_at_start``), else 0."""
    best = summary["best"]
    times = f"search {_duration(summary['search_seconds'])}, wall {_duration(summary['wall_seconds'])}"
    if summary["state"] == "failed":
        reason, count = summary["stop_reason"], summary["evaluations"]
        print(f"error: the search could not go on: {reason} ({count} evaluations, {times})", file=sys.stderr)
        return EXIT_CANNOT_SUCCEED
    if summary["state"] == "finished" and best is None and summary["evaluations"]:
        print(
            f"error: stopped: {summary['stop_reason']}, and all {summary['evaluations']} candidates failed"
            f" ({times}); `evomerge status` on the run directory shows why",
            file=sys.stderr,
        )
        return EXIT_CANNOT_SUCCEED
    line = f"stopped: {summary['stop_reason']}; {summary['evaluations']} evaluations ({times})"
    if best:
        line += f"; best {best['fitness']:.4f} ({best['candidate_id']})"
    print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from evomerge.runs import run_status

    status = run_status(Path(args.run_dir))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    best = status["best"]
    print(f"{status['name']} [{status['state']}] {status['run_dir']}")
    ev = status["evaluations"]
    cancelled = f", {ev['cancelled']} cancelled" if ev["cancelled"] else ""
    print(f"evaluations: {ev['total']} ({ev['failed']} failed{cancelled}); search {_duration(status['search_seconds'])},"
          f" wall {_duration(status['wall_seconds'])}")
    if best is not None:
        print(f"best: {best['fitness']:.4f} {best['candidate_id']}")
    elif ev["total"] and not ev["ok"]:
        print(f"best: - (every evaluation failed; `evomerge report {args.run_dir}` lists why)")
    else:
        print("best: -")
    if status["examples_scored"]:  # what racing saves on; none before the first evaluation
        raced = f" ({status['stopped_early']} evaluations stopped early by racing)" if status["stopped_early"] else ""
        print(f"examples scored: {status['examples_scored']}{raced}")
    if status["stop_reason"]:
        print(f"stopped: {status['stop_reason']}")
    if status["error"]:
        print(f"error: {status['error']}")
    for pop in status["populations"]:
        fit = "-" if pop["best_fitness"] is None else f"{pop['best_fitness']:.4f}"
        budget = pop["budget"] if pop["budget"] is not None else "∞"
        print(f"  {pop['name']:<16} {pop['strategy']:<10} {pop['evaluations']}/{budget} best {fit}")
        if "pareto_front" in pop:  # several objectives: the non-dominated evaluations
            print(f"    Pareto front ({', '.join(pop['objectives'])}): {len(pop['pareto_front'])} candidates")
            for point in pop["pareto_front"]:
                values = "  ".join(f"{v:.4f}" for v in point["objectives"].values())
                print(f"      {point['candidate_id']:<20} {values}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import export_best

    document = export_best(Path(args.run_dir), Path(args.out), args.candidate)
    print(f"exported {document['candidate_id']} (fitness {document['fitness']:.4f}) to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evomerge.report import REPORT_NAME, build_report

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / REPORT_NAME
    if not args.serve:
        print(f"report: {build_report(run_dir, out)}")
        return 0
    from evomerge.report.serve import ReportServer

    server = ReportServer(run_dir, out, args.port).start()
    print(f"serving the report of {run_dir} at {server.url} (also written to {out}); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait(args.stop_after)  # None: until Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.fitness import resolve_blackbox_fitness, resolve_whitebox_fitness, with_options
    from evomerge.plan import RunPlan

    config = load_config(args.config)
    plan = RunPlan.from_config(config, args.config)
    if not args.no_files:
        plan.check_files()
    resolve = resolve_whitebox_fitness if config.api is None else resolve_blackbox_fitness
    with_options(resolve(config.fitness.name), config.fitness.name, config.fitness.options)
    print(f"{args.config}: ok ({len(config.models.experts)} experts, {config.merge.method}, "
          f"{len(config.populations)} population(s))")
    return 0


DEMO_NAMES = ("digits", "lm")
"""The shipped demos: each is ``evomerge/demos/<name>.yaml`` in the package."""


def _demo_config(name: str) -> Path:
    """The shipped demo's config, copied to ``./runs/<name>.yaml``.

    The copy's relative paths put the models and the run directory under ``./runs/`` of whatever
    directory the user is in (the package itself may be read-only), and the user can edit it and
    rerun with ``--config``. An edited copy is never overwritten.
    """
    from importlib.resources import files

    from evomerge.errors import ConfigError

    if name not in DEMO_NAMES:
        raise ConfigError(f"unknown demo '{name}' (shipped: {', '.join(DEMO_NAMES)}); for your own config use --config PATH")
    shipped = (files("evomerge") / "demos" / f"{name}.yaml").read_text()
    path = Path("runs") / f"{name}.yaml"
    if path.exists() and path.read_text() != shipped:
        raise ConfigError(
            f"{path} is an edited copy of the {name} demo: run it with evomerge demo --config {path}, or delete it to run the shipped one"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(shipped)
    return path


def _demo_for(config):
    """The shipped demo a config belongs to (its models and data are built before the search)."""
    from evomerge import demo, demo_lm
    from evomerge.errors import ConfigError

    demos = {"digits-demo": demo, "tiny-lm-demo": demo_lm}
    if config.name not in demos:
        raise ConfigError(
            f"evomerge demo runs the shipped demos ({', '.join(demos)}), not '{config.name}'; use evomerge run for your own configs"
        )
    return demos[config.name]


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from evomerge.config import load_config
    from evomerge.errors import ConfigError
    from evomerge.runs import start_run
    from evomerge.store import RunStore, clear_run_dir

    if args.name is not None and args.config is not None:
        raise ConfigError("give a demo name or --config PATH, not both")
    config_path = args.config or _demo_config(args.name or DEMO_NAMES[0])
    config = load_config(config_path)
    demo = _demo_for(config)
    console = Console()
    if args.config is None:
        console.print(f"config: {config_path} (edit it and rerun with evomerge demo --config {config_path})")
    console.print(demo.PREPARING)
    demo.prepare(config)
    run_dir = config.run_path()
    if (run_dir / "run.db").exists():
        clear_run_dir(run_dir)  # the demo owns its run directory; a fresh search each time
    progress, update, phase = _progress_display()
    with progress:
        summary = start_run(
            config, str(config_path), on_progress=update, on_phase=phase,
            on_ready=lambda p: progress.console.print(f"run directory: {p}"),
        )
    code = _print_summary(summary)
    if code:
        return code
    store = RunStore(run_dir, readonly=True)
    try:
        bests = {p.name: best.genome for p in config.populations if (best := store.best(p.name)) is not None}
    finally:
        store.close()
    if not bests:
        console.print("[red]no candidate succeeded[/red]")
        return EXIT_CANNOT_SUCCEED
    table = Table(title=demo.TABLE_TITLE)
    table.add_column("model")
    table.add_column("score", justify="right")
    for label, score in demo.comparison_table(config, bests):
        table.add_row(label, f"{score:.4f}")
    console.print(table)
    console.print(f"run directory: {run_dir}\nnext: evomerge status {run_dir}   |   evomerge export {run_dir} --out merged-model")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from evomerge.server.app import serve

    serve(args.model, args.adapters, args.host, args.port, args.served_model_name, args.max_loras)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from evomerge import __version__

    parser = argparse.ArgumentParser(prog="evomerge", description="Search for the best way to merge fine-tuned models.")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    parser.set_defaults(own_sigterm=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a search from a config file")
    p.add_argument("config")
    p.add_argument("--run-dir", type=_path_arg, help="where the run is stored (overrides run_dir in the config)")
    _add_limits(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("resume", help="continue a run stopped in any way (signal, crash, kill) from its directory")
    p.add_argument("run_dir")
    _add_limits(p)
    p.set_defaults(fn=cmd_resume)
    p = sub.add_parser("status", help="show a run's progress (safe while it runs)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output for scripts and cron jobs")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("export", help="save a run's best merge as a Hugging Face model directory")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output directory (created; must be empty)")
    p.add_argument("--candidate", help="export this candidate instead of the best (an id from status, the report or load_run)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("report", help="an HTML report of a run, with plots (also while it runs)")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the HTML file to write (default: RUN_DIR/report.html); plots go beside it")
    p.add_argument("--serve", action="store_true", help="serve it on 127.0.0.1, fresh on every visit, while the run goes")
    p.add_argument("--port", type=_port_arg, default=8765, help="--serve: the port (default 8765; 0 picks a free one)")
    p.add_argument("--stop-after", type=_duration_arg, help="--serve: stop serving after this long, e.g. 12h (default: Ctrl-C)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("validate", help="check a config without running it")
    p.add_argument("config")
    p.add_argument(
        "--no-files",
        action="store_true",
        help="skip checking that local model and data paths exist (a config written for another machine)",
    )
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("demo", help="build a shipped demo's experts and search their merge (CPU, minutes)")
    p.add_argument("name", nargs="?", help=f"which demo: {' or '.join(DEMO_NAMES)} (default {DEMO_NAMES[0]}); models and run go under ./runs/")
    p.add_argument("--config", help="a copy of a demo's config to run instead (e.g. runs/digits.yaml, edited)")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser(
        "serve", help="serve a base model and LoRA adapters (merge service, runtime LoRA, OpenAI completions)"
    )
    p.add_argument("--model", required=True, help="the base model: a local directory or a hub id")
    p.add_argument("--adapters", help="directory of LoRA adapters (one subdirectory each, safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=_port_arg, default=8000)
    p.add_argument("--served-model-name", help="name clients use for the base (default: --model as given)")
    p.add_argument(
        "--max-loras", type=int, help="adapters /v1/load_lora_adapter keeps loaded at once; unloading frees one (default 16)"
    )
    # uvicorn stops on SIGTERM and then re-raises it: the service ends as killed by SIGTERM, which
    # is how systemd expects a stopped service to end, not with EXIT_INTERRUPTED.
    p.set_defaults(fn=cmd_serve, own_sigterm=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from evomerge.errors import UserError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        with nullcontext() if args.own_sigterm else _sigterm_interrupts():
            return args.fn(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a worker's, a service's socket): a bug, with its traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        return EXIT_BROKEN_PIPE


def _stdout_closed() -> bool:
    """Whether standard output leads into a pipe nobody reads any more: `evomerge status RUN | head`,
    where the reader has what it wanted."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))  # a pipe whose reader is gone
    except (OSError, ValueError):
        return False


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (systemd, kill) unwinds like Ctrl-C: cleanup runs, the run is recorded as
    interrupted and resumable, the exit is ``EXIT_INTERRUPTED``. The search and ``serve`` put
    their own handlers over this one while they run. Main thread only: signals go there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
