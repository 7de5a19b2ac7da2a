"""Staged evaluation: the stopping rule, the shared seeded nested stages, and survivors scored once per example."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.errors import PluginError
from evomerge.fitness.racing import Raced, Racing, paired_upper_bound, take, upper_bound


class Counting:
    """A fitness over examples that *are* their scores, counting the calls and examples scored."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, examples) -> np.ndarray:
        self.calls.append(len(examples))
        return np.asarray(examples, dtype=np.float64)


def test_a_candidate_that_cannot_matter_stops_after_the_first_stage():
    examples = [0.0] * 180 + [1.0] * 20  # accuracy 0.1
    score = Counting()
    raced = Racing(stages=(0.1, 0.3), z=2.0, seed=0).race(score, examples, must_beat=0.8)
    assert score.calls == [20]
    assert raced.examples_scored == 20 and raced.fidelity == pytest.approx(0.1)
    assert np.isnan(raced.per_example).sum() == 180
    assert raced.fitness == pytest.approx(np.nanmean(raced.per_example)) and raced.fitness < 0.8


class Seen(Counting):
    """Also records which examples (by value: each is unique) each call scored, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[float]] = []

    def __call__(self, examples) -> np.ndarray:
        self.seen.append(list(examples))
        return super().__call__(examples)


def test_a_survivor_scores_each_example_once_and_records_what_one_full_call_gives():
    rng = np.random.default_rng(1)
    examples = list(rng.uniform(0.5, 1.0, 200))
    score = Seen()
    raced = Racing(stages=(0.1, 0.3), z=2.0, seed=0).race(score, examples, must_beat=0.6)
    assert score.calls == [20, 40, 140]  # two screening stages, then only the examples not yet scored
    assert sorted(v for call in score.seen for v in call) == sorted(examples)  # each exactly once
    for call in score.seen:  # each step takes its examples in data order, as a full call does
        assert call == sorted(call, key=examples.index)
    assert raced.fidelity == 1.0 and raced.examples_scored == 200
    plain = Racing().race(Counting(), examples, must_beat=0.6)  # racing off: one call on all
    np.testing.assert_array_equal(raced.per_example, plain.per_example)  # same order, same values
    assert raced.fitness == plain.fitness == float(np.mean(examples))


def test_a_close_call_goes_on_to_the_next_stage():
    examples = [0.0, 1.0] * 100  # mean 0.5: stage 1's bound straddles 0.55
    score = Counting()
    raced = Racing(stages=(0.1, 0.5), z=2.0, seed=0).race(score, examples, must_beat=0.55)
    assert len(score.calls) >= 2 and raced.examples_scored > 20


def test_without_a_threshold_every_example_is_scored_in_one_call():
    score = Counting()
    raced = Racing(stages=(0.1,), seed=0).race(score, [0.0] * 100, must_beat=None)
    assert score.calls == [100] and raced.fidelity == 1.0


def test_every_candidate_meets_the_same_seeded_stage():
    examples = list(range(100))
    seen = []
    for _ in range(2):
        score = Counting()
        raced = Racing(stages=(0.2,), seed=7, bounds=None).race(score, examples, must_beat=1e9)
        seen.append(set(np.flatnonzero(raced.scored)))
    assert seen[0] == seen[1] and len(seen[0]) == 20
    other = Racing(stages=(0.2,), seed=8, bounds=None).race(Counting(), examples, must_beat=1e9)
    assert set(np.flatnonzero(other.scored)) != seen[0]


def test_a_nan_score_stops_the_race_and_fails_the_candidate():
    examples = [math.nan] * 100
    score = Counting()
    raced = Racing(stages=(0.1,), seed=0).race(score, examples, must_beat=0.0)
    assert score.calls == [10] and math.isnan(raced.fitness)


def test_too_few_examples_to_screen_are_scored_in_full():
    assert Racing(stages=(0.1, 0.3)).stage_sizes(2) == []
    assert Racing(stages=(0.1, 0.3)).stage_sizes(10) == [2, 3]
    assert Racing(stages=(0.01, 0.02, 0.5)).stage_sizes(100) == [2, 50]
    score = Counting()
    assert Racing(stages=(0.1,)).race(score, [1.0, 0.0], must_beat=0.9).fidelity == 1.0
    assert score.calls == [2]


def test_upper_bound_narrows_to_the_mean_as_the_sample_nears_the_whole_set():
    scores = np.array([0.0, 1.0] * 10)
    for bounds in ((0.0, 1.0), None):
        wide, narrow = upper_bound(scores, 1000, 2.0, bounds), upper_bound(scores, 21, 2.0, bounds)
        assert wide > narrow > 0.5
        assert upper_bound(scores, 20, 2.0, bounds) == 0.5


def test_an_all_wrong_stage_still_leaves_room_for_the_examples_not_scored():
    """No spread in the stage: the normal bound reads the mean as certain, Wilson's does not."""
    order = Racing(stages=(0.1,), seed=0).order(200)
    examples = [1.0] * 200
    for i in order[:20]:
        examples[i] = 0.0  # the first stage sees only zeros; the whole set's mean is 0.9
    bound = upper_bound(np.zeros(20), 200, 2.0, (0.0, 1.0))
    assert 0.1 < bound < 0.2  # the module docstring's 0.15
    sound = Racing(stages=(0.1,), z=2.0, seed=0).race(Counting(), examples, must_beat=0.12)
    assert sound.fidelity == 1.0 and sound.fitness == pytest.approx(0.9)  # went on, and was the best
    normal = Racing(stages=(0.1,), z=2.0, seed=0, bounds=None).race(Counting(), examples, must_beat=0.12)
    assert normal.fidelity == pytest.approx(0.1)  # stopped a candidate at 0.9 for a threshold of 0.12
    hopeless = Racing(stages=(0.1,), z=2.0, seed=0).race(Counting(), examples, must_beat=0.5)
    assert hopeless.fidelity == pytest.approx(0.1)  # even Wilson's room cannot reach 0.5


def test_an_all_right_stage_is_never_stopped():
    score = Counting()
    raced = Racing(stages=(0.1, 0.3), z=1.0, seed=0).race(score, [1.0] * 100, must_beat=1.0)
    assert score.calls == [10, 20, 70] and raced.fidelity == 1.0 and raced.examples_scored == 100
    assert upper_bound(np.ones(10), 100, 1.0, (0.0, 1.0)) == 1.0


def test_bounds_rescale_to_the_scores_range():
    scores = np.array([2.0, 4.0, 4.0, 2.0, 3.0])
    unit = upper_bound((scores - 2.0) / 2.0, 50, 2.0, (0.0, 1.0))
    assert upper_bound(scores, 50, 2.0, (2.0, 4.0)) == pytest.approx(2.0 + 2.0 * unit)


def test_a_score_outside_the_stated_range_stops_the_run_with_what_to_fix():
    with pytest.raises(PluginError, match=r"fitness.racing.scores: .* -2\.5, outside \[0, 1\]"):
        Racing(stages=(0.1,), seed=0).race(Counting(), [-2.5] * 100, must_beat=0.0)
    raced = Racing(stages=(0.1,), seed=0, bounds=None).race(Counting(), [-2.5] * 100, must_beat=0.0)
    assert raced.fidelity == pytest.approx(0.1)  # unbounded scores: the normal bound


def test_take_slices_columns_and_rows_alike():
    import torch

    index = np.array([2, 0])
    columns = take({"inputs": torch.arange(8).reshape(4, 2), "labels": torch.arange(4)}, index)
    assert columns["labels"].tolist() == [2, 0] and columns["inputs"].tolist() == [[4, 5], [0, 1]]
    assert take([{"a": 1}, {"a": 2}, {"a": 3}], index) == [{"a": 3}, {"a": 1}]


def test_full_scores_read_as_fully_scored():
    raced = Raced.full(np.array([1.0, 0.0]))
    assert raced.fidelity == 1.0 and raced.fitness == 0.5 and raced.examples_scored == 2


def _near_rival(losses: int, n: int = 1000, seed: int = 3) -> tuple[np.ndarray, list[float]]:
    """A rival at accuracy ~0.8 and a candidate that matches it except on ``losses`` examples it
    gets wrong where the rival was right (spread over the whole set)."""
    rng = np.random.default_rng(seed)
    rival = (rng.uniform(size=n) < 0.8).astype(np.float64)
    candidate = rival.copy()
    right = np.flatnonzero(rival == 1.0)
    candidate[rng.choice(right, losses, replace=False)] = 0.0
    return rival, list(candidate)


def test_paired_stops_a_slightly_worse_candidate_the_unpaired_bound_cannot():
    rival, examples = _near_rival(losses=30)  # 3 points below the rival, same examples right otherwise
    must_beat = float(rival.mean())
    paired = Racing(stages=(0.05, 0.2, 0.5), seed=0).race(Counting(), examples, must_beat, rival)
    unpaired = Racing(stages=(0.05, 0.2, 0.5), seed=0, paired=False).race(Counting(), examples, must_beat, rival)
    assert paired.fidelity < 1.0 and unpaired.fidelity == 1.0
    assert paired.examples_scored < unpaired.examples_scored


def test_paired_never_stops_a_candidate_that_scores_as_the_rival_does():
    rival, _ = _near_rival(losses=0)
    score = Counting()
    raced = Racing(stages=(0.05, 0.2, 0.5), seed=0).race(score, list(rival), float(rival.mean()), rival)
    assert raced.fidelity == 1.0 and len(score.calls) == 4
    assert raced.fitness == pytest.approx(float(rival.mean()))
    assert paired_upper_bound(np.zeros(50), 1000, 0.1) == 0.0  # no difference: never below 0, whatever z


def test_a_paired_stop_estimates_the_full_mean_below_the_rival_even_on_an_easy_first_stage():
    """The first stage holds only examples both get right but a few: the candidate's raw mean there
    is far above the rival's fitness; its estimate is the rival's fitness less the gap."""
    racing = Racing(stages=(0.1,), seed=0)
    first = racing.order(200)[:20]
    rival = np.zeros(200)
    rival[first] = 1.0  # the rival: right on the first stage only (fitness 0.1)
    candidate = rival.copy()
    candidate[first[:8]] = 0.0  # wrong on 8 of the 20 the rival got right
    raced = racing.race(Counting(), list(candidate), must_beat=0.1, rival=rival)
    assert raced.fidelity == pytest.approx(0.1)
    assert np.nanmean(raced.per_example) == pytest.approx(0.6)  # above 0.1: no use for ranking
    assert raced.fitness == pytest.approx(0.1 - 8 / 20) and raced.fitness < 0.1


def test_the_unpaired_rule_still_stops_a_candidate_unlike_the_rival():
    """On the first stage the candidate is right exactly where the rival (fitness 0.7) is wrong:
    8 of 20 against 12. The differences spread so wide that the paired bound stays above 0; its
    own mean, 0.4, is too far below 0.7 for Wilson's bound to reach."""
    racing = Racing(stages=(0.05,), seed=0)
    order = racing.order(400)
    rival, candidate = np.zeros(400), np.zeros(400)
    rival[order[:12]] = 1.0
    candidate[order[12:20]] = 1.0
    rival[order[20:288]] = 1.0  # 280 of 400
    first = order[:20]
    assert paired_upper_bound(candidate[first] - rival[first], 400, 2.0) > 0  # the paired rule alone goes on
    raced = racing.race(Counting(), list(candidate), float(rival.mean()), rival)
    assert raced.fidelity == pytest.approx(0.05)
    assert raced.fitness == pytest.approx(0.4)  # its own mean: the unpaired rule stopped it


def test_rival_scores_that_cannot_be_paired_fall_back_to_the_unpaired_rule():
    rival, examples = _near_rival(losses=60)
    must_beat = float(rival.mean())
    unpaired = Racing(stages=(0.05, 0.2, 0.5), seed=0, paired=False).race(Counting(), examples, must_beat)
    for unusable in (None, rival[:-1], np.where(np.arange(1000) == 5, np.nan, rival)):
        raced = Racing(stages=(0.05, 0.2, 0.5), seed=0).race(Counting(), examples, must_beat, unusable)
        assert raced.examples_scored == unpaired.examples_scored


def test_a_paired_stop_needs_more_than_z_squared_straight_losses():
    """Lost on every example so far: the sample variance is 0, yet the score test's ``mean(d²)``
    is 1, so 3 losses (z = 2) leave room and 5 stop it. McNemar's statistic agrees."""
    assert paired_upper_bound(-np.ones(3), 10_000, 2.0) > 0 > paired_upper_bound(-np.ones(5), 10_000, 2.0)
    wins, losses, n = 3, 12, 100
    d = np.array([1.0] * wins + [-1.0] * losses + [0.0] * (n - wins - losses))
    mcnemar = (wins - losses) / math.sqrt(wins + losses)
    for z in (2.0, 2.5):  # infinite population: the bound is below 0 exactly when McNemar's statistic is below -z
        assert (paired_upper_bound(d, 10**12, z) < 0) == (mcnemar < -z)
