"""``evomerge export``: a run's best merge as a directory other tools load as it is.

A full-model merge becomes a Hugging Face model directory (``save_pretrained``, safetensors, the
tokenizer); a merge of LoRA factors (``lora_compose``) becomes a peft adapter directory for the run's base. Beside
the weights: ``recipe.yaml`` (what evomerge searched and found), ``README.md`` (a model card with
the recipe and the scores) and, where mergekit can express the recipe, ``mergekit.yaml``, which
rebuilds the same weights with ``mergekit-yaml mergekit.yaml OUT``. The directory is written under
a temporary name and moved into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import RunDirError
from evomerge.merge.method import LORA_FACTORS
from evomerge.mergekit_recipe import NotExpressible, mergekit_config
from evomerge.plan import RunPlan
from evomerge.records import Candidate
from evomerge.space.merge_space import Recipe
from evomerge.store import RunStore

RECIPE_NAME = "recipe.yaml"
MERGEKIT_NAME = "mergekit.yaml"
CARD_NAME = "README.md"


def export_best(run_dir: Path, out: Path) -> dict[str, Any]:
    """Save the best candidate of the run in ``run_dir`` to ``out`` (created; must be empty)."""
    from evomerge.runs import load_run_config

    store = RunStore(run_dir, readonly=True)
    try:
        best = store.best()
        config = load_run_config(store)
        baselines = store.baselines()
        evaluations = store.evaluation_counts()
    finally:
        store.close()
    if best is None:
        raise RunDirError(f"{run_dir}: no successful evaluation to export yet")
    out = Path(out)
    _check_out(out)
    from evomerge.workers.whitebox import WhiteBoxWorker  # torch: only once there is something to export

    plan = RunPlan.from_config(config)
    worker = WhiteBoxWorker(plan, worker_id="export")
    candidate = Candidate(best.candidate_id, best.population, best.genome)
    decoded = worker.codecs[best.population].decode(best.genome)
    recipe = worker.materialize(candidate)
    scored_on = config.fitness.data.source if config.fitness.data is not None else "its tasks"
    scores: dict[str, float] = {f"fitness ({config.fitness.name} on {scored_on})": best.fitness}
    if config.fitness.test_data is not None:
        scores[f"test ({config.fitness.test_data.source})"] = worker.score_on(config.fitness.test_data).fitness
    document = {
        "candidate_id": best.candidate_id,
        "population": best.population,
        "fitness": best.fitness,
        "scores": scores,
        "base_model": config.models.base,
        "experts": [{"name": n, "path": e.path} for n, e in zip(config.models.expert_labels(), config.models.experts)],
        "granularity": config.merge.granularity,
        "recipe": recipe,
    }
    mergekit, note = _mergekit_document(plan, worker, decoded)
    if note is not None:
        document["mergekit"] = note

    tmp = out.with_name(out.name + f".tmp-{int(time.time())}")
    worker.models.model.save_pretrained(tmp, safe_serialization=True)
    if worker.models.tokenizer is not None:
        worker.models.tokenizer.save_pretrained(tmp)
    (tmp / RECIPE_NAME).write_text(yaml.safe_dump(document, sort_keys=False))
    if mergekit is not None:
        (tmp / MERGEKIT_NAME).write_text(yaml.safe_dump(mergekit, sort_keys=False))
    (tmp / CARD_NAME).write_text(model_card(plan, document, baselines, evaluations, mergekit is not None))
    if out.exists():
        out.rmdir()
    shutil.move(str(tmp), str(out))
    return document


def _check_out(out: Path) -> None:
    """``--out`` must be a new or empty directory whose parent can be created, checked before the
    models load (minutes for large ones)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; give a new or empty directory")
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} exists and is not empty; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot create {out.parent}: {exc.strerror or exc}") from None


def _mergekit_document(plan: RunPlan, worker, decoded) -> tuple[dict | None, str | None]:
    """The mergekit YAML of the best recipe (or None), and what a reader should know about it."""
    config = plan.config
    if not isinstance(decoded, Recipe):
        return None, "not written: M2N2 seed recipes (piecewise combinations with split points) have no mergekit equivalent"
    try:
        document = mergekit_config(
            decoded,
            decoded.method,
            worker.models.tensor_names,
            config.model_ref(config.models.base) if config.models.base else None,
            [config.model_ref(e.path) for e in config.models.experts],
            config.models.dtype,
        )
    except NotExpressible as exc:
        return None, f"not written: {exc}"
    if decoded.method.name.startswith("dare"):
        return document, "mergekit draws its own random drop masks: its merge equals ours in expectation, not entry for entry"
    return document, None


def model_card(
    plan: RunPlan, document: dict, baselines: list[dict], evaluations: dict[str, tuple[int, int]], has_mergekit: bool
) -> str:
    """A Hugging Face model card: front matter for the hub, then the recipe and the scores."""
    config = plan.config
    adapter = plan.method.inputs == LORA_FACTORS
    bases = [config.models.base] if config.models.base else [e.path for e in config.models.experts]
    front = {
        "base_model": bases,
        "library_name": "peft" if adapter else "transformers",
        "tags": ["merge", "evomerge", config.merge.method],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {config.name}", ""]
    scored = sum(done for _asked, done in evaluations.values())
    lines.append(
        f"A {'LoRA adapter' if adapter else 'model'} merged by evomerge from {len(config.models.experts)} experts"
        f" with `{config.merge.method}` ({config.merge.granularity} granularity): the best of {scored} evaluated"
        f" candidates, `{document['candidate_id']}` of population `{document['population']}`."
    )
    lines += ["", "## Experts", ""]
    lines += [f"- {e['name']}: `{e['path']}`" for e in document["experts"]]
    lines += ["", "## Scores", "", "| model | score |", "|---|---|"]
    lines += [f"| merged: {name} | {value:.4f} |" for name, value in document["scores"].items()]
    for row in baselines:
        value = "failed" if row.get("fitness") is None or row.get("status") != "ok" else f"{row['fitness']:.4f}"
        lines.append(f"| expert {row['name']}: fitness | {value} |")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(document["recipe"], sort_keys=False).strip(), "```", ""]
    if has_mergekit:
        lines += [f"`{MERGEKIT_NAME}` rebuilds these weights with mergekit: `mergekit-yaml {MERGEKIT_NAME} OUT`.", ""]
    if "mergekit" in document:
        lines += [f"mergekit: {document['mergekit']}.", ""]
    return "\n".join(lines)
