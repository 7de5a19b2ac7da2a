"""Every registered fitness function passes the shipped conformance suite
(evomerge.testing.fitness_suite), and a plugin is run through it the way its author would."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import PluginError
from evomerge.fitness import FITNESS_FUNCTIONS
from evomerge.testing.fitness_suite import EXAMPLE_KINDS, FitnessSuite, RegisteredFitness, features_inputs


class TestRegisteredFitness(RegisteredFitness):
    pass


def test_every_registered_function_declares_its_examples():
    assert set(FITNESS_FUNCTIONS) <= set(EXAMPLE_KINDS)


@torch.no_grad()
def margin(model, tokenizer, examples, *, temperature: float = 1.0):
    """The README's plugin: per example, the softmax probability of the right class."""
    probs = torch.softmax(model(examples["inputs"]) / temperature, dim=-1)
    return probs.gather(1, examples["labels"][:, None]).squeeze(1)


class TestAPluginFunction(FitnessSuite):
    @pytest.fixture
    def fitness(self):
        return margin

    @pytest.fixture
    def inputs(self):
        return features_inputs()


class TestClassificationOnABfloat16Model(FitnessSuite):
    """A classifier held in bfloat16 (models.dtype, or auto on bfloat16 checkpoints) scores the
    float32 feature rows data loads as."""

    @pytest.fixture
    def fitness(self):
        return FITNESS_FUNCTIONS["classification_accuracy"]

    @pytest.fixture
    def inputs(self):
        inputs = features_inputs()
        inputs.model.to(torch.bfloat16)
        return inputs


def test_the_suite_catches_a_function_that_returns_one_score_for_all():
    def mean_accuracy(model, tokenizer, examples):
        return (model(examples["inputs"]).argmax(-1) == examples["labels"]).float().mean()

    with pytest.raises(PluginError, match="returned a single number .*not their mean"):
        FitnessSuite().test_one_finite_score_per_example(mean_accuracy, features_inputs())
