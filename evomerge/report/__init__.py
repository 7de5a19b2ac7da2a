"""``evomerge report``: a self-contained HTML report of a run, written once or served live.

:func:`build_report` writes the page (plots embedded) and its plots as PNG files beside it;
:class:`~evomerge.report.serve.ReportServer` serves it on 127.0.0.1 and renders it again whenever
the run has written something since, so an overnight search can be watched from a browser.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.report.document import SECTIONS, Report, render_report

REPORT_NAME = "report.html"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.html``); returns its path."""
    target = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    return render_report(run_dir).write(target)


__all__ = ["REPORT_NAME", "SECTIONS", "Report", "build_report", "render_report"]
