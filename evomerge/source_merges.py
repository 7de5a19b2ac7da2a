"""Merges a data-flow run takes as sources (PS+DFS): a parameter-space run's best, recorded in
its run directory (``models.experts[].run``) or in the ``recipe.yaml`` its export wrote
(``models.experts[].recipe``).

Besides what a reader wants to see (the decoded recipe, the scores), an export's recipe carries
what rebuilds the merge exactly: the run's config as it started (every local path absolute) and
the best candidate's population and genome, which is what a run directory yields too. Either is
materialized once by the run's own plan when a worker starts
(:mod:`evomerge.workers.merge_source`); a recipe travels without the run's database. Reading
either needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from evomerge.config import ExpertRef, RunConfig, config_from_dict
from evomerge.errors import ConfigError, RunDirError, UserError, first_line

RECIPE_NAME = "recipe.yaml"
REBUILD_KEYS = ("candidate_id", "population", "genome", "config")
"""The recipe's entries a rebuild reads (exports before data-flow sources wrote no genome or config)."""


class RecipeFileError(UserError):
    """A recipe file cannot be read back as a merge; the caller names the config field."""


@dataclass(frozen=True)
class RecordedMerge:
    """A merge as a run recorded it: the config that merges it and the candidate it chose."""

    config: RunConfig
    candidate_id: str
    population: str
    genome: np.ndarray


def rebuild_fields(config: dict, candidate_id: str, population: str, genome: np.ndarray) -> dict:
    """The entries of ``recipe.yaml`` that :func:`read_recipe` rebuilds the merge from."""
    return {"candidate_id": candidate_id, "population": population, "genome": [float(x) for x in genome], "config": config}


def read_recipe(path: Path) -> RecordedMerge:
    """The merge an exported ``recipe.yaml`` describes; RecipeFileError says what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise RecipeFileError(f"{path} is a directory; give the {RECIPE_NAME} an export wrote inside it")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeFileError(f"recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeFileError(f"{path}: cannot read the recipe file: {exc.strerror or first_line(exc)}") from None
    except (UnicodeDecodeError, yaml.YAMLError):
        raise RecipeFileError(f"{path}: not a YAML recipe file as evomerge export writes it") from None
    if not isinstance(document, dict):
        raise RecipeFileError(f"{path}: not a recipe file as evomerge export writes it (no mapping of entries)")
    missing = [key for key in REBUILD_KEYS if key not in document]
    if missing:
        raise RecipeFileError(
            f"{path}: the recipe has no {missing[0]} to rebuild its merge from (an older evomerge export, or"
            " not an export's recipe); export the run again"
        )
    genome = document["genome"]
    if not isinstance(genome, list) or not genome or not all(isinstance(x, (int, float)) for x in genome):
        raise RecipeFileError(f"{path}: genome is not a list of numbers")
    try:
        config = config_from_dict(document["config"], f"{path} (its config)", path.parent)
    except ConfigError as exc:
        raise RecipeFileError(str(exc)) from None
    return RecordedMerge(config, str(document["candidate_id"]), str(document["population"]), np.asarray(genome, dtype=np.float64))


def recorded_merge(config: RunConfig, expert: ExpertRef) -> RecordedMerge:
    """The merge a ``run`` or ``recipe`` source of ``config`` names (RunDirError: the run has no
    successful evaluation yet; RecipeFileError: the recipe cannot be read back)."""
    if expert.recipe is not None:
        return read_recipe(config.resolve_path(expert.recipe))
    from evomerge.runs import recorded_best

    run_dir = config.resolve_path(expert.run or "")
    best, source = recorded_best(run_dir)
    if best is None:
        raise RunDirError(f"{run_dir}: no successful evaluation to use as a source yet")
    return RecordedMerge(source, best.candidate_id, best.population, best.genome)
