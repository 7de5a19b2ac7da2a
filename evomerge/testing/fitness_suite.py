"""The contract every white-box fitness function keeps, as pytest test classes.

A fitness function is ``fn(model, tokenizer, examples) -> per-example scores``. Whatever it
measures, a run relies on: one finite score per example, whatever the number of examples (M2N2
competes per example; the run's fitness is their mean); the same scores for the same model (a
resumed run and the report rescore candidates); and the model left as it was handed over (workers
reuse one model for every candidate).

``RegisteredFitness`` runs the contract once per entry of ``FITNESS_FUNCTIONS`` on an untrained
tiny model of the kind the function scores. A plugin author checks their own function by
subclassing ``FitnessSuite`` and overriding two fixtures::

    from evomerge.fitness import resolve_fitness
    from evomerge.testing.fitness_suite import FitnessSuite, features_inputs

    class TestMargin(FitnessSuite):
        @pytest.fixture
        def fitness(self):
            return resolve_fitness("my_pkg.fitness:margin")

        @pytest.fixture
        def inputs(self):
            return features_inputs()  # or text_inputs(), or your own FitnessInputs
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

from evomerge.fitness import FITNESS_FUNCTIONS, FitnessFn, scores_and_metrics, with_options
from evomerge.testing.harness_tasks import tiny_harness_options
from evomerge.testing.tiny_models import char_llama, digits_classifier

EXAMPLE_KINDS: dict[str, str] = {
    "classification_accuracy": "features",
    "multiple_choice_loglik": "text",
    "negative_cross_entropy": "text",
    "exact_match": "text",
    "judge": "text",
    "lm_eval": "lm_eval_tasks",
}
"""What each registered function scores: ``features`` (tensors, as .npz and sklearn: data load),
``text`` (rendered rows, as .jsonl and .csv data load) or ``lm_eval_tasks`` (the documents of the
tiny local lm-eval tasks of ``evomerge.testing.harness_tasks``). A newly registered function fails the
suite until it is declared here."""

OPTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "exact_match": lambda: {"max_new_tokens": 4},
    "judge": lambda: {"max_new_tokens": 4},
    "lm_eval": tiny_harness_options,
}
"""Options that keep a registered function's check fast (a few generated tokens, not 32) or that
it needs (the tiny lm-eval tasks)."""

JUDGED = frozenset({"judge"})
"""Functions that ask a judge model: their ``judge`` option comes from the fixture ``judge_options``
(the suite's user provides it: a judge served on loopback, e.g. ``evomerge serve``)."""


@dataclass
class FitnessInputs:
    """What a worker hands a fitness function: the merged model, its tokenizer and the examples."""

    model: torch.nn.Module
    tokenizer: Any
    examples: Any

    def __len__(self) -> int:
        return len(self.examples["labels"]) if isinstance(self.examples, dict) else len(self.examples)

    def head(self, n: int) -> "FitnessInputs":
        """The same model with only the first ``n`` examples."""
        if isinstance(self.examples, dict):
            return FitnessInputs(self.model, self.tokenizer, {k: v[:n] for k, v in self.examples.items()})
        return FitnessInputs(self.model, self.tokenizer, self.examples[:n])


def features_inputs(n: int = 64, seed: int = 0) -> FitnessInputs:
    """An untrained digits MLP and ``n`` rows of sklearn's digits (``{"inputs", "labels"}``)."""
    from evomerge.fitness.data import load_examples

    return FitnessInputs(digits_classifier(seed), None, load_examples("sklearn:digits", "train", limit=n))


def text_inputs(n: int = 8, seed: int = 0) -> FitnessInputs:
    """An untrained character Llama and ``n`` addition rows with every field the built-ins read:
    ``prompt``, ``target``, and two ``choices`` with the right one's ``label``."""
    from evomerge.models.zoo.tiny_lm import skill_examples

    model, tokenizer = char_llama(seed)
    rows = [
        {**row, "choices": [row["target"], str(int(row["target"]) + 1)], "label": i % 2}
        for i, row in enumerate(skill_examples("addition", n, seed))
    ]
    for row in rows:
        if row["label"] == 1:
            row["choices"].reverse()
    return FitnessInputs(model, tokenizer, rows)


def harness_inputs(seed: int = 0) -> FitnessInputs:
    """An untrained character Llama and the documents of the tiny lm-eval tasks."""
    from evomerge.fitness import own_examples

    model, tokenizer = char_llama(seed)
    return FitnessInputs(model, tokenizer, own_examples("lm_eval", tiny_harness_options()))


INPUT_BUILDERS: dict[str, Callable[[], FitnessInputs]] = {
    "features": features_inputs,
    "text": text_inputs,
    "lm_eval_tasks": harness_inputs,
}


def _scores(fitness: FitnessFn, inputs: FitnessInputs) -> np.ndarray:
    name = getattr(fitness, "__name__", "fitness")  # a partial with options bound has none
    return scores_and_metrics(fitness(inputs.model, inputs.tokenizer, inputs.examples), len(inputs), name)[0]


class FitnessSuite:
    """The fitness contract. A subclass provides the fixtures ``fitness`` (``fn(model, tokenizer,
    examples) -> scores``) and ``inputs`` (:class:`FitnessInputs`); pytest names a missing one."""

    def test_one_finite_score_per_example(self, fitness, inputs):
        scores = _scores(fitness, inputs)  # raises PluginError unless the shape is (n_examples,)
        assert np.isfinite(scores).all(), scores

    def test_any_number_of_examples_gives_as_many_scores(self, fitness, inputs):
        for n in (1, 3):
            assert _scores(fitness, inputs.head(n)).shape == (n,)

    def test_same_model_same_scores(self, fitness, inputs):
        np.testing.assert_array_equal(_scores(fitness, inputs), _scores(fitness, inputs))

    def test_leaves_the_model_as_it_was(self, fitness, inputs):
        before = {n: t.detach().clone() for n, t in inputs.model.state_dict().items()}
        training = [m.training for m in inputs.model.modules()]
        _scores(fitness, inputs)
        assert [m.training for m in inputs.model.modules()] == training
        for name, tensor in inputs.model.state_dict().items():
            assert torch.equal(tensor, before[name]), f"{name} changed while scoring"


class RegisteredFitness(FitnessSuite):
    """The contract for every entry of ``FITNESS_FUNCTIONS``, on the kind of examples it scores."""

    @pytest.fixture(params=sorted(FITNESS_FUNCTIONS))
    def fitness_name(self, request) -> str:
        return request.param

    @pytest.fixture
    def fitness(self, fitness_name, request) -> FitnessFn:
        options = OPTIONS[fitness_name]() if fitness_name in OPTIONS else {}
        if fitness_name in JUDGED:
            options = {**options, "judge": request.getfixturevalue("judge_options")}
        return with_options(FITNESS_FUNCTIONS[fitness_name], fitness_name, options)

    @pytest.fixture
    def inputs(self, fitness_name) -> FitnessInputs:
        if fitness_name not in EXAMPLE_KINDS:
            pytest.fail(f"declare in EXAMPLE_KINDS which examples '{fitness_name}' scores ({', '.join(INPUT_BUILDERS)})")
        return INPUT_BUILDERS[EXAMPLE_KINDS[fitness_name]]()
