"""The embedded demo: merge two digit specialists into one model that knows all ten digits.

Two small MLPs start from one shared initialisation (the base); one is trained on digits 0–4, the
other on 5–9 (sklearn's bundled 8×8 digits, no download). Each alone scores about half the test
set. The run then searches a per-layer task-arithmetic merge with CMA-ES, and the demo prints the
test accuracy over all ten digits of each expert, of their uniform average and of the searched
merge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.fitness.data import load_examples
from evomerge.merge.declarations import LINEAR
from evomerge.models.zoo.digits_mlp import DigitsMLP, DigitsMLPConfig, register
from evomerge.models.loading import quiet_transformers
from evomerge.records import Candidate
from evomerge.space.merge_space import Space

PREPARING = "training two digit specialists (0-4 and 5-9) from one initialisation…"
TABLE_TITLE = "test accuracy over all ten digits"
TRAIN_STEPS = 100
LEARNING_RATE = 3e-3
HIDDEN = 64


def _train(model: DigitsMLP, inputs: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
    model.eval()


def prepare_digit_experts(base_path: Path, expert_paths: list[Path], seed: int = 0) -> None:
    """Write the base and the two specialists with ``save_pretrained`` (skipped if present)."""
    if all((p / "model.safetensors").exists() for p in [base_path, *expert_paths]):
        return
    if len(expert_paths) != 2:
        raise ConfigError("the digits demo trains exactly two experts (digits 0-4 and 5-9)")
    register()
    quiet_transformers()
    torch.manual_seed(seed)
    base = DigitsMLP(DigitsMLPConfig(hidden_sizes=[HIDDEN]))
    base.save_pretrained(base_path)
    train = load_examples("sklearn:digits", "train")
    halves = [train["labels"] < 5, train["labels"] >= 5]
    for i, (path, mask) in enumerate(zip(expert_paths, halves)):
        expert = DigitsMLP(base.config)
        expert.load_state_dict(base.state_dict())
        _train(expert, train["inputs"][mask], train["labels"][mask], seed + 1 + i)
        expert.save_pretrained(path)


def prepare(config: RunConfig) -> None:
    """The demo's models, at the paths its config names."""
    if config.models.base is None:
        raise ConfigError("the demo config must name models.base")
    experts = [config.resolve_path(e.path) for e in config.models.experts]
    prepare_digit_experts(config.resolve_path(config.models.base), experts, seed=config.seed)


def comparison_table(config: RunConfig, bests: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """Test accuracy of each expert, the uniform average and each population's best merge."""
    from evomerge.plan import RunPlan
    from evomerge.workers.whitebox import WhiteBoxWorker

    return expert_and_merge_scores(WhiteBoxWorker(RunPlan.from_config(config), worker_id="demo"), config, bests, "expert")


def expert_and_merge_scores(worker, config: RunConfig, bests: dict[str, np.ndarray], noun: str) -> list[tuple[str, float]]:
    """Test scores of each expert alone, their uniform average and each population's best merge."""
    n = len(config.models.experts)
    test_data = config.fitness.test_data
    linear = Space.build(LINEAR, worker.models.tensor_names, n, "per_model")
    rows = []
    for i, label in enumerate(config.models.expert_labels()):
        worker.models.materializer.apply(linear.decode(linear.encode(LINEAR.expert_alone(i, n))))
        rows.append((f"{noun} {label}", worker.score_on(test_data).fitness))
    worker.models.materializer.apply(linear.decode(linear.encode({"weight": 1.0})))
    rows.append(("uniform average", worker.score_on(test_data).fitness))
    for population, genome in bests.items():
        best = Candidate(f"{population}:best", population, genome)
        rows.append((f"searched merge ({population})", worker.score_on(test_data, best).fitness))
    return rows
