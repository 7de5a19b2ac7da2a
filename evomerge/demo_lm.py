"""The tiny-LM demo: merge an addition specialist and a string-reversal specialist of one base.

A small Llama-architecture base learns both skills a little from a brief mixed pre-training; each
specialist is the base fine-tuned on one skill, which it then does well while losing some of the
other. The search merges the two task vectors per layer group; the merged model answers the mixed
test set better than either specialist. Everything is built here in about a minute: a character
tokenizer, the models (``save_pretrained``) and the data files the config reads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.models.loading import quiet_transformers
from evomerge.models.zoo.tiny_lm import build_tokenizer, skill_examples, tiny_llama, train_causal_lm

PREPARING = "training a tiny Llama base on a mix, then an addition and a reversal specialist…"
TABLE_TITLE = "exact match on the mixed test set (addition and reversal)"
SKILLS = ("addition", "reversal")
BASE_STEPS = 250
SPECIALIST_STEPS = 200
SPECIALIST_LR = 1e-3
HIDDEN = 128
TRAIN_ROWS, FITNESS_ROWS, TEST_ROWS = 4000, 60, 200


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def prepare(config: RunConfig) -> None:
    """Write the base, the two specialists and the data files the config names (kept if present)."""
    if config.models.base is None:
        raise ConfigError("the tiny-LM demo config must name models.base")
    base_path = config.resolve_path(config.models.base)
    expert_paths = [config.resolve_path(e.path) for e in config.models.experts]
    if len(expert_paths) != len(SKILLS):
        raise ConfigError(f"the tiny-LM demo trains exactly {len(SKILLS)} specialists ({', '.join(SKILLS)})")
    fitness_file = config.resolve_path(config.fitness.data.source)
    test_file = config.resolve_path(config.fitness.test_data.source) if config.fitness.test_data else None
    outputs = [base_path / "model.safetensors", *(p / "model.safetensors" for p in expert_paths), fitness_file]
    if test_file is not None:
        outputs.append(test_file)
    if all(p.exists() for p in outputs):
        return
    quiet_transformers()
    seed = config.seed
    # Fitness and test rows come from seeds the training data never uses.
    fitness_rows = [r for s in SKILLS for r in skill_examples(s, FITNESS_ROWS // 2, seed + 1000)]
    _write_jsonl(fitness_file, fitness_rows)
    if test_file is not None:
        _write_jsonl(test_file, [r for s in SKILLS for r in skill_examples(s, TEST_ROWS // 2, seed + 2000)])
    tokenizer = build_tokenizer()
    base = tiny_llama(tokenizer, hidden=HIDDEN, seed=seed)
    mixed = [r for s in SKILLS for r in skill_examples(s, TRAIN_ROWS // 2, seed)]
    train_causal_lm(base, tokenizer, mixed, steps=BASE_STEPS, seed=seed)
    base.save_pretrained(base_path)
    tokenizer.save_pretrained(base_path)
    for i, (skill, path) in enumerate(zip(SKILLS, expert_paths)):
        specialist = copy.deepcopy(base)
        train_causal_lm(
            specialist, tokenizer, skill_examples(skill, TRAIN_ROWS, seed + 1 + i),
            steps=SPECIALIST_STEPS, lr=SPECIALIST_LR, seed=seed + 1 + i,
        )
        specialist.save_pretrained(path)
        tokenizer.save_pretrained(path)


def comparison_table(config: RunConfig, bests: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """Mixed test-set score of the base, each specialist, their average and each searched merge."""
    from evomerge.demo import expert_and_merge_scores
    from evomerge.merge.declarations import TASK_ARITHMETIC
    from evomerge.plan import RunPlan
    from evomerge.space.merge_space import Space
    from evomerge.workers.whitebox import WhiteBoxWorker

    worker = WhiteBoxWorker(RunPlan.from_config(config), worker_id="demo")
    base_only = Space.build(TASK_ARITHMETIC, worker.models.tensor_names, len(config.models.experts), "global")
    worker.models.materializer.apply(base_only.decode(base_only.encode({"weight": 0.0})))
    base_score = worker.score_on(config.fitness.test_data).fitness
    return [("base (before fine-tuning)", base_score)] + expert_and_merge_scores(worker, config, bests, "specialist")
