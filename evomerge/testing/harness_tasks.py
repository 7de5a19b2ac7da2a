"""Tiny local lm-eval tasks over local JSONL files, for the lm_eval fitness's tests and suite.

Three tasks about one-digit sums, in the character vocabulary of ``evomerge.models.zoo.tiny_lm``:
``tiny_sums_mc`` (multiple choice, 60 documents, metrics acc and acc_norm), ``tiny_sums_gen``
(generate_until with a ``first_number`` regex filter, 20 documents, exact_match) and
``tiny_sums_ll`` (loglikelihood of the answer on the same 20 documents: its per-document
``perplexity`` value is that log-likelihood), and the group ``tiny_sums`` of all three. lm-eval reads a
YAML's ``data_files`` relative to the working directory, so the shipped YAML files are templates
that :func:`tiny_task_dir` fills with the absolute path of the shipped JSONL files.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASK_NAMES = ("tiny_sums_gen", "tiny_sums_ll", "tiny_sums_mc")
"""In the order the lm_eval fitness lays out their documents (alphabetical)."""


def tiny_task_dir(dest: Path) -> Path:
    """``dest`` holding the tiny tasks' YAML files, ready for ``include_path``."""
    dest.mkdir(parents=True, exist_ok=True)
    for template in sorted(TASKS_DIR.glob("*.yaml.in")):
        text = template.read_text(encoding="utf-8").format(data_dir=TASKS_DIR.resolve())
        (dest / template.name.removesuffix(".in")).write_text(text, encoding="utf-8")
    return dest


@functools.lru_cache(maxsize=None)
def tiny_harness_options() -> dict:
    """``fitness.options`` of the lm_eval fitness over both tiny tasks, written once per process."""
    return {"tasks": list(TASK_NAMES), "include_path": str(tiny_task_dir(Path(tempfile.mkdtemp(prefix="evomerge-tasks-"))))}
