"""The HTML report of one run: every section, its plots embedded as PNG, one self-contained file.

Each section is always present; one that does not apply to the run (no M2N2 population, a
white-box run's API usage) says so instead of disappearing, so a reader always finds the same
layout. The page has no script: a live page (``evomerge report --serve``) reloads itself with a
``<meta http-equiv="refresh">`` while the run is going.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from evomerge import analysis
from evomerge.errors import RunDirError
from evomerge.report import figures
from evomerge.store import RunStore

SECTIONS = {
    "overview": "Overview",
    "progress": "Fitness over evaluations and wall time",
    "archive": "M2N2 archive: training coverage and per-example entropy",
    "recipe": "Best recipe",
    "workers": "Worker utilisation",
    "failures": "Failures",
    "usage": "API usage and cost",
    "experts": "Best merge, the base and the experts on the fitness data, per task",
}
"""Section ids (the HTML anchors) and titles, in page order."""

LIVE_REFRESH_SECONDS = 10
FAILURE_REASONS = 20
"""Failure reasons the report lists, most frequent first, each with a traceback: a run whose errors
all differ (an address, a size in the message) would otherwise make a page of megabytes."""

_STYLE = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1rem 2rem 3rem; color: #1d2433; background: #fff; }
header { border-bottom: 2px solid #d9dee8; margin-bottom: 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #e6e9f0; padding-bottom: .2rem; }
.meta { color: #556; margin-top: 0; }
nav a { margin-right: .9rem; font-size: .9rem; }
table.data { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
table.data th, table.data td { border: 1px solid #d9dee8; padding: .25rem .6rem; text-align: right; }
table.data th { background: #f3f5f9; }
table.data td:first-child, table.data th:first-child { text-align: left; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.note { color: #556; font-style: italic; }
details pre { white-space: pre-wrap; font-size: .8rem; background: #f6f7fa; padding: .5rem; }
.state-running { color: #b06000; } .state-finished { color: #1a7f37; } .state-killed, .state-failed { color: #b42318; }
"""


@dataclass
class Report:
    """A rendered report: the HTML page and its plots (name → PNG bytes, also embedded)."""

    html: str
    plots: dict[str, bytes] = field(default_factory=dict)

    def write(self, out: Path) -> Path:
        """Write the page to ``out`` and each plot beside it in ``<stem>-plots/<name>.png``.

        Where it cannot be written (a directory, a path under a file, a read-only place such as
        another user's run directory) the user picks another ``--out``: a ``RunDirError`` naming it.
        """
        out = Path(out)
        if out.is_dir():
            raise RunDirError(f"--out {out} is a directory; give the HTML file to write")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            folder = out.parent / f"{out.stem}-plots"
            folder.mkdir(exist_ok=True)
            for name, png in self.plots.items():
                (folder / f"{name}.png").write_bytes(png)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(self.html, encoding="utf-8")
            tmp.replace(out)  # a browser reloading the file never sees half a page
        except OSError as exc:
            raise RunDirError(f"cannot write the report to {out} ({exc.strerror or exc}: {exc.filename}); choose another --out") from None
        return out


def _table(frame: pd.DataFrame, index: bool = False) -> str:
    return frame.to_html(index=index, classes="data", border=0, na_rep="–", float_format=lambda v: f"{v:.4g}")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


class _Page:
    def __init__(self) -> None:
        self.sections: dict[str, str] = {}
        self.plots: dict[str, bytes] = {}

    def image(self, name: str, png: bytes, alt: str) -> str:
        self.plots[name] = png
        data = base64.b64encode(png).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def render_report(run_dir: str | Path, live: bool = False) -> Report:
    """The report of the run in ``run_dir`` as it is now (safe while the run writes).

    ``live`` adds the self-reload of a page served while the run goes.
    """
    run_dir = Path(run_dir)
    evaluations = analysis.load_run(run_dir)
    store = RunStore(run_dir, readonly=True)
    try:
        info = store.run_info()
        populations = store.populations()
        counts = store.counts()
        best = store.best()
        events = store.events()
    finally:
        store.close()
    page = _Page()
    ok = evaluations[evaluations["status"] == "ok"]
    full = ok[ok["fidelity"] >= 1.0]  # racing: an estimate from a few examples is not comparable with full scores

    # overview
    rows = []
    for pop in populations:
        c = counts.get(pop["name"], {})
        mine = full[full["population"] == pop["name"]]
        rows.append({
            "population": pop["name"],
            "strategy": pop["strategy"],
            "evaluations": sum(c.values()),
            "budget": "∞" if pop["budget"] is None else pop["budget"],
            "failed": c.get("failed", 0),
            "best": mine["fitness"].max() if len(mine) else float("nan"),
            "median": mine["fitness"].median() if len(mine) else float("nan"),
            "stopped early": int((ok["population"] == pop["name"]).sum()) - len(mine),
        })
    resumes = sum(e["kind"] == "run_resumed" for e in events)
    stop = (info["summary"] or {}).get("stop_reason")
    facts = [
        f"run directory <code>{html.escape(str(run_dir.resolve()))}</code>",
        f"started {_clock(info['created'])}, last write {_clock(info['updated'])}",
        f"searching time {info['active_seconds']:.1f} s" + (f", resumed {resumes}×" if resumes else ""),
    ]
    if stop:
        facts.append(f"stopped: {html.escape(str(stop))}")
    page.sections["overview"] = "<p>" + "<br>".join(facts) + "</p>" + _table(pd.DataFrame(rows))

    # progress
    curves = analysis.progress_curves(evaluations)
    scored = curves.groupby("population", sort=False)["best"].transform(lambda best: best.notna().any())
    if scored.any():
        unscored = [pop["name"] for pop in populations if pop["name"] not in set(curves["population"][scored])]
        page.sections["progress"] = page.image("progress", figures.progress(curves[scored]), "fitness per population") + _note(
            f"solid: best so far; dashed: median of the last {analysis.MEDIAN_WINDOW} evaluations."
            + _stopped_early_note(len(ok) - len(full))
            + (f" Not drawn, no fully scored evaluation: {', '.join(unscored)}." if unscored else "")
        )
    else:
        page.sections["progress"] = _note(_nothing_scored(info["state"], evaluations))

    # M2N2 archive
    history = analysis.archive_history(run_dir)
    if len(history):
        page.sections["archive"] = page.image("archive", figures.archive(history), "archive coverage and entropy") + _note(
            "coverage: share of training examples some archive member solves; entropy: how evenly the members"
            " share each example's score. Rebuilt from the recorded evaluations with the strategy's own archive rule."
        )
    else:
        page.sections["archive"] = _note("no M2N2 or GA population in this run.")

    # best recipe
    recipe = analysis.best_recipe(run_dir) if best is not None else None
    if recipe is not None:
        title = f"{recipe.candidate_id} (fitness {recipe.fitness:.4f})"
        body = page.image("recipe", figures.recipe(recipe.tables, title), "best recipe heat map")
        if recipe.fixed:
            body += _note("fixed: " + ", ".join(f"{k} = {v:g}" for k, v in recipe.fixed.items()))
        page.sections["recipe"] = body + "".join(_table(t, index=True) for t in recipe.tables.values())
    else:
        page.sections["recipe"] = _note(_nothing_scored(info["state"], evaluations))

    # workers
    busy = analysis.worker_utilisation(evaluations)
    if busy.empty:
        page.sections["workers"] = _note("no evaluation scored by a worker yet.")
    else:
        share = busy.mean().rename("busy share").to_frame()
        page.sections["workers"] = page.image("workers", figures.workers(busy), "worker utilisation") + _table(share, index=True)

    # failures
    failed = analysis.failures(evaluations)
    if failed.empty:
        page.sections["failures"] = _note("no failed evaluation.")
    else:
        shown = failed.head(FAILURE_REASONS)
        traces = "".join(
            f"<details><summary>{html.escape(r.example)}: {html.escape(str(r.error))}</summary><pre>{html.escape(r.traceback)}</pre></details>"
            for r in shown.itertuples() if r.traceback
        )
        rest = failed.iloc[FAILURE_REASONS:]
        more = _note(
            f"and {len(rest)} more reasons ({int(rest['count'].sum())} failed evaluations): evomerge.analysis.failures"
            f"(evomerge.load_run(RUN_DIR)) lists them all."
        ) if len(rest) else ""
        page.sections["failures"] = _table(shown.drop(columns="traceback")) + more + traces

    # API usage
    usage = analysis.api_usage(evaluations)
    if usage is None:
        page.sections["usage"] = _note("not a black-box run and no judge: no API usage recorded.")
    else:
        column = "usage.cost" if "usage.cost" in evaluations else next(c for c in evaluations if c.startswith("usage."))
        page.sections["usage"] = page.image("usage", figures.usage(evaluations, column), "API usage") + _table(usage, index=True)

    # experts
    comparison = analysis.expert_comparison(run_dir)
    if comparison.empty:
        page.sections["experts"] = _note("the experts were not scored in this run (score_experts: false, or an executor that cannot).")
    else:
        page.sections["experts"] = page.image("experts", figures.experts(comparison), "best merge and experts") + _table(
            comparison
        ) + _note("merge_better / merge_worse / same: examples on which the best merge scores above, below or level with the expert.")
        ratios = analysis.task_ratios(run_dir)
        if not ratios.empty:
            page.sections["experts"] += _table(ratios, index=True) + _note(
                "per task: the best merge's score and its ratio to each model alone (1 keeps that model's score;"
                " – where the model scores 0 or below)."
            )

    return Report(_assemble(info, evaluations, best, page.sections, live), page.plots)


def _nothing_scored(state: str, evaluations: pd.DataFrame) -> str:
    """Why a section that needs a fully scored evaluation is empty: not yet, or never in this run."""
    failed = int((evaluations["status"] != "ok").sum())
    if failed == len(evaluations):
        what = "no evaluation recorded" if failed == 0 else f"all {failed} evaluations failed (see Failures)"
    else:
        what = "no fully scored evaluation (racing stopped every successful one early)"
    return f"{what} yet." if state == "running" else f"{what}: nothing to show."


def _stopped_early_note(stopped: int) -> str:
    """Why the curves and the overview's best and median leave some evaluations out (racing)."""
    if not stopped:
        return ""
    return (f" Best and median are over fully scored evaluations only: {stopped} evaluations were stopped early by"
            " racing (fitness.racing), their fitness a mean over part of the examples.")


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _assemble(info: dict, evaluations: pd.DataFrame, best, sections: dict[str, str], live: bool) -> str:
    name = html.escape(info["name"])
    state = html.escape(info["state"])
    refresh = f'<meta http-equiv="refresh" content="{LIVE_REFRESH_SECONDS}">' if live and info["state"] == "running" else ""
    best_text = "–" if best is None else f"{best.fitness:.4f} ({html.escape(best.candidate_id)})"
    nav = "".join(f'<a href="#{key}">{html.escape(title.split(":")[0])}</a>' for key, title in SECTIONS.items())
    body = "".join(
        f'<section id="{key}"><h2>{html.escape(title)}</h2>{sections[key]}</section>' for key, title in SECTIONS.items()
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>evomerge report: {name}</title><link rel="icon" href="data:,">{refresh}'
        f"<style>{_STYLE}</style></head><body><header><h1>{name}</h1>"
        f'<p class="meta"><span class="state-{state}">{state}</span> · {len(evaluations)} evaluations · best {best_text}'
        f" · report made {_clock(time.time())}</p><nav>{nav}</nav></header>{body}</body></html>"
    )
