"""``evomerge export``: a run's best merge as a directory other tools load as it is.

A full-model merge becomes a Hugging Face model directory (``save_pretrained``, safetensors, the
tokenizer, chat template and generation config of ``export.tokenizer_source``); a merge of LoRA
factors (``lora_compose``) becomes a peft adapter directory for the run's base. Beside
the weights: ``recipe.yaml`` (what evomerge searched and found, with the run's config and the
best genome, from which a data-flow run rebuilds the merge as a ``recipe:`` source; see
:mod:`evomerge.source_merges`), ``README.md`` (a model card with
the recipe and the scores) and, where mergekit can express the recipe, ``mergekit.yaml``, which
rebuilds the same weights with ``mergekit-yaml mergekit.yaml OUT``. The directory is written under
a temporary name and moved into place, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import RunConfig
from evomerge.errors import RunDirError, UserError
from evomerge.merge.method import LORA_FACTORS
from evomerge.mergekit_recipe import NotExpressible, mergekit_config, model_reference, passthrough_config
from evomerge.plan import RunPlan
from evomerge.records import Candidate, Evaluation
from evomerge.source_merges import RECIPE_NAME, rebuild_fields
from evomerge.space.merge_space import Recipe
from evomerge.space.paths import Path as DataflowPath
from evomerge.store import RunStore

MERGEKIT_NAME = "mergekit.yaml"
CARD_NAME = "README.md"


def export_best(run_dir: Path, out: Path, candidate_id: str | None = None) -> dict[str, Any]:
    """Save the best candidate of the run in ``run_dir`` (or the one named ``candidate_id``: a
    Pareto front's member, a population's best) to ``out`` (created; must be empty)."""
    from evomerge.runs import load_run_config, resolved_config_dict

    store = RunStore(run_dir, readonly=True)
    try:
        run_best = store.best()
        chosen = run_best if candidate_id is None else store.evaluation(candidate_id)
        state = store.run_info()["state"]
        config = load_run_config(store)
        baselines = store.baselines()
        evaluations = store.evaluation_counts()
    finally:
        store.close()
    best = _exportable(run_dir, chosen, candidate_id, state)
    out = Path(out)
    _check_out(out)
    _check_room(out, config)
    from evomerge.models.tokenizer_source import export_tokenizer  # torch: only once there is something to export
    from evomerge.workers.whitebox import WhiteBoxWorker

    plan = RunPlan.from_config(config)
    try:
        worker = WhiteBoxWorker(plan, worker_id="export")
    except UserError as exc:
        if config.api is None:
            raise
        raise RunDirError(  # its models are served names, with no weights on this machine
            f"{run_dir} is a black-box run, merged by its service ({config.api.base_url}), and exporting its weights needs"
            f" the models on this machine: {str(exc).rstrip('.')}; its best recipe is in `evomerge report {run_dir}`"
        ) from None
    candidate = Candidate(best.candidate_id, best.population, best.genome)
    decoded = worker.codecs[best.population].decode(best.genome)
    recipe = worker.materialize(candidate)
    model = worker.models.model
    if isinstance(decoded, DataflowPath):  # a path is saved as its layers stacked, scales folded into weights
        from evomerge.models.path_export import stacked_model

        model = stacked_model(worker.models.materializer, decoded)
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
        "experts": [
            {"name": n, **e.model_dump(include={"path", "run", "recipe"}, exclude_none=True)}
            for n, e in zip(config.models.expert_labels(), config.models.experts)
        ],
        "granularity": "dataflow" if plan.dataflow else config.merge.granularity,
        **({"frozen": list(config.merge.frozen)} if config.merge.frozen else {}),
        "recipe": recipe,
        **rebuild_fields(resolved_config_dict(plan), best.candidate_id, best.population, best.genome),
    }
    layer_types = (None, None)
    if isinstance(decoded, DataflowPath):
        head_text = worker.models.materializer.base_config.get_text_config()
        layer_types = (getattr(head_text, "layer_types", None), getattr(model.config.get_text_config(), "layer_types", None))
    mergekit, note = _mergekit_document(plan, decoded, layer_types)
    if mergekit is not None and worker.models.vocabulary is not None:  # mergekit aligns the same way
        mergekit["tokenizer_source"] = config.models.vocabulary
    tokenizer = export_tokenizer(config, model, worker.models.tokenizer)

    tmp = out.with_name(out.name + f".tmp-{int(time.time())}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if mergekit is not None:
            mergekit, note = _checked_by_mergekit(mergekit, note, tmp)
        if note is not None:
            document["mergekit"] = note
        (tmp / RECIPE_NAME).write_text(yaml.safe_dump(document, sort_keys=False))
        if mergekit is not None:
            (tmp / MERGEKIT_NAME).write_text(yaml.safe_dump(mergekit, sort_keys=False))
        (tmp / CARD_NAME).write_text(model_card(
            plan, document, baselines, evaluations, mergekit is not None, best.candidate_id == run_best.candidate_id
        ))
    except BaseException as exc:  # no half-written model (gigabytes) left beside --out
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            raise RunDirError(f"--out {out}: the disk filled up while the model was written ({exc}); free some space or choose another --out") from None
        raise
    if out.exists():
        out.rmdir()
    shutil.move(str(tmp), str(out))
    return document


def _exportable(run_dir: Path, chosen: Evaluation | None, candidate_id: str | None, state: str) -> Evaluation:
    """The evaluation to export; else one line on why there is nothing to export, and what to do."""
    if candidate_id is not None and chosen is None:
        raise RunDirError(
            f"--candidate {candidate_id}: no such candidate was scored in {run_dir}; candidate ids are in"
            f" `evomerge status {run_dir}`, the report and evomerge.load_run"
        )
    if candidate_id is not None and chosen.status != "ok":
        raise RunDirError(f"--candidate {candidate_id} {chosen.status} ({chosen.error}): it has no merge to export; choose another")
    if candidate_id is not None and chosen.fidelity < 1.0:
        raise RunDirError(
            f"--candidate {candidate_id} was stopped early by racing (scored on {chosen.fidelity:.0%} of the examples),"
            " so its fitness is only an estimate; choose a fully scored candidate"
        )
    if chosen is None and state == "running":
        raise RunDirError(f"{run_dir}: no successful evaluation to export yet; try again once one is recorded (`evomerge status {run_dir}`)")
    if chosen is None:
        raise RunDirError(
            f"{run_dir}: no candidate of this run succeeded, nothing to export; `evomerge report {run_dir}` lists why they failed"
        )
    return chosen


def _check_out(out: Path) -> None:
    """``--out`` must be a new or empty directory whose parent can be created and written in (the
    export is written beside it under a temporary name), checked before the models load (minutes
    for large ones)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file; give a new or empty directory")
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} exists and is not empty; choose another --out")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise RunDirError(f"--out {out}: {blocking} is a file, not a directory; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot create {out.parent}: {exc.strerror or exc}") from None
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)).rmdir()
    except OSError as exc:
        raise RunDirError(f"--out {out}: cannot write in {out.parent}: {exc.strerror or exc}") from None


def _disk_full(exc: BaseException) -> bool:
    """Whether writing failed for want of space: an OSError, or safetensors' own error, which
    carries the OS error only in its message."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return type(exc).__name__ == "SafetensorError" and any(f"os error {code})" in str(exc) for code in (errno.ENOSPC, errno.EDQUOT))


def _check_room(out: Path, config: RunConfig) -> None:
    """Refuse an ``--out`` whose disk cannot hold the merged weights, before the models load and
    merge (minutes at a few billion parameters): from the working model's config, its parameters
    in the run's dtype. A lower bound (a data-flow path may stack more layers; the tokenizer and
    the card add little)."""
    from evomerge.models.checkpoint import run_dtype
    from evomerge.models.loading import parameter_shapes
    from evomerge.models.memory import ITEMSIZE, size, total_numel

    plan = RunPlan.from_config(config)
    if plan.method.inputs == LORA_FACTORS:  # an adapter directory: small beside its base
        return
    need = total_numel(parameter_shapes(plan.working_model)) * ITEMSIZE[run_dtype(config)]
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise RunDirError(
            f"--out {out}: the merged model needs {size(need)} but {out.parent} has {size(free)} free;"
            " free some space or choose another --out"
        )


def _checked_by_mergekit(document: dict, note: str | None, saved: Path) -> tuple[dict | None, str | None]:
    """The YAML and its note if the installed mergekit can rebuild the model saved in ``saved``
    from it; else None and why not (see :mod:`evomerge.mergekit_check`)."""
    from evomerge.mergekit_check import MergekitMissing, rebuild_problem

    try:
        problem = rebuild_problem(document, saved)
    except MergekitMissing as exc:
        unchecked = f"not checked against mergekit's architecture definitions: {exc}"
        return document, "; ".join(n for n in (note, unchecked) if n)
    return (document, note) if problem is None else (None, f"not written: {problem}")


def _mergekit_document(plan: RunPlan, decoded, layer_types=(None, None)) -> tuple[dict | None, str | None]:
    """The mergekit YAML of the best recipe (or None), and what a reader should know about it;
    ``layer_types``: a path's head source's and its own (see :func:`passthrough_config`)."""
    from evomerge.models.adapters import is_adapter
    from evomerge.models.checkpoint import run_dtype, stored_parameters

    config = plan.config
    if isinstance(decoded, DataflowPath):
        sources = [None if e.path is None else config.expert_model(e) for e in config.models.experts]
        try:
            return passthrough_config(decoded, sources, run_dtype(config), config.head, layer_types), None
        except NotExpressible as exc:
            return None, f"not written: {exc}"
    if not isinstance(decoded, Recipe):
        return None, "not written: M2N2 seed recipes (piecewise combinations with split points) have no mergekit equivalent"
    if config.merge.frozen:
        return None, "not written: frozen towers (merge.frozen) keep the working model's weights, and mergekit merges every tensor"
    base = config.model_ref(config.models.base) if config.models.base else None
    refs = [config.expert_model(e) for e in config.models.experts]
    adapters = [is_adapter(ref) for ref in refs]
    try:
        document = mergekit_config(
            decoded,
            decoded.method,
            stored_parameters(plan.working_model),
            base,
            [model_reference(ref, base, adapter) for ref, adapter in zip(refs, adapters)],
            run_dtype(config),
        )
    except NotExpressible as exc:
        return None, f"not written: {exc}"
    notes = []
    if any(adapters):
        notes.append("its LoRA adapter experts are named BASE+ADAPTER: run mergekit-yaml with --lora-merge-cache DIR")
    if decoded.method.name.startswith("dare"):
        notes.append("mergekit draws its own random drop masks: its merge equals ours in expectation, not entry for entry")
    if config.export.tokenizer_source != "base" or config.export.chat_template is not None:
        notes.append("it rebuilds the weights; the tokenizer and chat template are this directory's")
    return document, "; ".join(notes) or None


def model_card(
    plan: RunPlan,
    document: dict,
    baselines: list[dict],
    evaluations: dict[str, tuple[int, int]],
    has_mergekit: bool,
    best_of_run: bool = True,
) -> str:
    """A Hugging Face model card: front matter for the hub, then the recipe and the scores;
    ``best_of_run`` is False for a candidate the user picked (``export --candidate``)."""
    config = plan.config
    adapter = plan.method.inputs == LORA_FACTORS
    front: dict[str, Any] = {}
    bases = card_base_models(config)
    if bases:
        front["base_model"] = bases
    front["library_name"] = "peft" if adapter else "transformers"
    front["tags"] = ["merge", "evomerge", "dataflow" if plan.dataflow else config.merge.method]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {config.name}", ""]
    scored = sum(done for _asked, done in evaluations.values())
    how = "a data-flow path through their layers" if plan.dataflow else f"`{config.merge.method}` ({config.merge.granularity} granularity)"
    lines.append(
        f"A {'LoRA adapter' if adapter else 'model'} merged by evomerge from {len(config.models.experts)} experts"
        f" with {how}: {'the best' if best_of_run else 'one'} of {scored} evaluated"
        f" candidates, `{document['candidate_id']}` of population `{document['population']}`."
    )
    if config.merge.frozen:
        source = "the base model" if config.models.base else "the first expert"
        lines.append(f"Frozen towers (not merged: their weights are {source}'s): {', '.join(f'`{t}`' for t in config.merge.frozen)}.")
    lines += ["", "## Experts", ""]
    lines += [_card_expert(e) for e in document["experts"]]
    lines += ["", "## Scores", "", "| model | score |", "|---|---|"]
    lines += [f"| merged: {name} | {value:.4f} |" for name, value in document["scores"].items()]
    for row in baselines:
        value = "failed" if row.get("fitness") is None or row.get("status") != "ok" else f"{row['fitness']:.4f}"
        lines.append(f"| {row['role']} {row['name']}: fitness | {value} |")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(document["recipe"], sort_keys=False).strip(), "```", ""]
    if has_mergekit:
        lines += [f"`{MERGEKIT_NAME}` rebuilds these weights with mergekit: `mergekit-yaml {MERGEKIT_NAME} OUT`.", ""]
    if "mergekit" in document:
        lines += [f"mergekit: {document['mergekit']}.", ""]
    return "\n".join(lines)


def _card_expert(expert: dict) -> str:
    """An expert's line in the card: a model, or a recorded merge (a data-flow source)."""
    if "path" in expert:
        return f"- {expert['name']}: `{expert['path']}`"
    if "run" in expert:
        return f"- {expert['name']}: the best merge of run `{expert['run']}`"
    return f"- {expert['name']}: the merge of recipe `{expert['recipe']}`"


def card_base_models(config: RunConfig) -> list[str]:
    """The hub ids the card names as ``base_model``: ``export.base_model``, else those known for the
    base (or, without one, the experts). A local path is never named: the hub rejects it."""
    from evomerge.models.checkpoint import hub_id

    if config.export.base_model:
        return list(config.export.base_model)
    refs = [config.model_ref(config.models.base)] if config.models.base else [config.expert_model(e) for e in config.models.experts]
    known = (hub_id(ref) for ref in refs)
    return [ref for ref in known if ref is not None]
