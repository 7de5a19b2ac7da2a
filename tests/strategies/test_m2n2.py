"""M2N2 and GA: the competition/attraction maths on hand-checked cases, the archive's replacement
rule, children in flight, degenerate archives, the seed-recipe form, and short digits runs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from evomerge import plaindata
from evomerge.records import Evaluation
from evomerge.space.genes import SearchSpec
from evomerge.strategies import make_strategy
from evomerge.strategies.m2n2 import attraction, capacities, roulette, shared_scores, split_point_slerp
from evomerge.space.seed_recipes import SeedGram, SeedRecipe

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "m2n2_digits.py"


@pytest.fixture(scope="module")
def digits_bench():
    spec = importlib.util.spec_from_file_location("m2n2_digits", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCORES = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_fitness_sharing_by_hand():
    # z = (2, 1, 1): example 0 is shared by two members, 1 and 2 each belong to one.
    shared = shared_scores(SCORES, alpha=1.0)
    np.testing.assert_allclose(shared.sum(axis=1), [0.5 + 1.0, 0.5, 1.0])
    np.testing.assert_allclose(shared_scores(SCORES, alpha=0.0).sum(axis=1), [2.0, 1.0, 1.0])  # GA: raw counts
    np.testing.assert_allclose(shared_scores(SCORES, alpha=2.0).sum(axis=1), [0.25 + 1.0, 0.25, 1.0])


def test_unsolved_examples_count_as_one_not_a_division_by_zero():
    scores = np.array([[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(shared_scores(scores, 1.0), [[1.0, 0.0], [0.0, 0.0]])


def test_capacity_is_one_for_binary_and_the_best_score_for_continuous():
    np.testing.assert_array_equal(capacities(SCORES), [1, 1, 1])
    cont = np.array([[0.5, 0.2], [0.25, 0.1]])
    np.testing.assert_allclose(capacities(cont), [0.5, 0.2])
    # Each example hands out at most its capacity: 0.5 * (0.5 + 0.25) / 0.75 = 0.5.
    np.testing.assert_allclose(shared_scores(cont, 1.0).sum(axis=0), [0.5, 0.2])


def test_attraction_rewards_what_parent_a_misses():
    shared = shared_scores(SCORES, 1.0)  # rows: (.5, 1, 0), (.5, 0, 0), (0, 0, 1)
    np.testing.assert_allclose(attraction(shared, 1), [1.0, 0.0, 1.0])
    np.testing.assert_allclose(attraction(shared, 0), [0.0, 0.0, 1.0])  # member 1 adds nothing to 0


def test_roulette_follows_weights_and_guards_zero_weights():
    rng = np.random.default_rng(0)
    allowed = np.array([True, True, False])
    draws = [roulette(rng, np.array([3.0, 1.0, 100.0]), allowed) for _ in range(4000)]
    assert 2 not in draws
    assert np.mean(np.array(draws) == 0) == pytest.approx(0.75, abs=0.03)
    zero = [roulette(rng, np.zeros(3), allowed) for _ in range(200)]
    assert set(zero) == {0, 1}


def test_split_point_crossover_uses_mix_before_and_one_minus_mix_after():
    a, b = np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 0.0, 1.0])  # orthogonal: Ω = π/2
    child = split_point_slerp(a, b, split=2, mix=0.25)
    s = lambda t: (math.sin((1 - t) * math.pi / 2), math.sin(t * math.pi / 2))  # noqa: E731
    (a0, b0), (a1, b1) = s(0.25), s(0.75)
    np.testing.assert_allclose(child, [a0, b0, a1, b1])


def weight_spec(dim: int = 8, seeds: int = 2) -> SearchSpec:
    rng = np.random.default_rng(1)
    return SearchSpec.weights([rng.normal(size=dim) for _ in range(seeds)])


def tell(strategy, cand, scores) -> None:
    scores = np.asarray(scores, dtype=np.float64)
    strategy.tell([Evaluation(cand.id, "ok", float(np.mean(scores)), per_example=scores)])


def test_seeds_come_first_and_fill_the_archive(tmp_path):
    spec = weight_spec()
    m = make_strategy("m2n2", "p", spec, 0, {"archive_size": 3})
    first = m.ask(5)
    assert len(first) == 2  # only the seeds: nobody to breed from yet
    np.testing.assert_array_equal(first[0].genome, spec.seeds[0])
    tell(m, first[0], [1, 0, 0])
    tell(m, first[1], [0, 1, 0])
    assert m.filled.tolist() == [True, True, False]
    child = m.ask(1)[0]
    assert set(child.parent_ids) == {first[0].id, first[1].id}


def test_replace_worst_with_the_child_included():
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 2})
    seeds = m.ask(2)
    tell(m, seeds[0], [1, 1, 0, 0])
    tell(m, seeds[1], [0, 0, 1, 0])
    worse = m.ask(1)[0]
    tell(m, worse, [0, 0, 0, 0])  # fitness 0: the child itself is dropped
    assert m._member_ids == [seeds[0].id, seeds[1].id]
    better = m.ask(1)[0]
    tell(m, better, [0, 0, 1, 1])  # shares example 2 with seed 1, adds example 3: seed 1 leaves
    assert m._member_ids == [seeds[0].id, better.id]


def test_archive_stats_follow_every_change_of_the_archive_and_a_restored_state():
    """Kept between changes (the report asks after every evaluation), never stale."""
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 2})
    seeds = m.ask(2)
    assert m.archive_stats() == {"coverage": 0.0, "entropy": 0.0, "members": 0}
    tell(m, seeds[0], [1, 1, 0, 0])
    assert m.archive_stats() == {"coverage": 0.5, "entropy": 0.0, "members": 1}
    tell(m, seeds[1], [0, 0, 1, 0])
    assert m.archive_stats()["coverage"] == 0.75
    saved = m.state_dict()
    tell(m, m.ask(1)[0], [0, 0, 0, 0])  # dropped: the archive, and its statistics, stay
    assert m.archive_stats()["coverage"] == 0.75
    tell(m, m.ask(1)[0], [0, 0, 1, 1])  # replaces seed 1: example 3 is covered now
    assert m.archive_stats()["coverage"] == 1.0
    m.load_state_dict(saved)
    assert m.archive_stats()["coverage"] == 0.75


def test_failed_and_nan_children():
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 3})
    seeds = m.ask(2)
    tell(m, seeds[0], [1, 0, 0])
    tell(m, seeds[1], [0, 1, 0])
    failed, nan_child = m.ask(2)
    m.tell([Evaluation.failure(failed.id, "boom")])
    assert failed.id not in m._member_ids
    m.tell([Evaluation(nan_child.id, "ok", 0.3, per_example=np.array([np.nan, 0.0, 1.0]))])
    slot = m._member_ids.index(nan_child.id)
    np.testing.assert_array_equal(m._scores[slot], [0.0, 0.0, 1.0])


def test_children_in_flight_are_inserted_against_the_archive_as_it_is():
    m = make_strategy("m2n2", "p", weight_spec(), 3, {"archive_size": 4})
    seeds = m.ask(2)
    tell(m, seeds[0], [1, 0, 0, 0])
    tell(m, seeds[1], [0, 1, 0, 0])
    flight = m.ask(3)
    assert len(flight) == 3
    for cand, row in zip(reversed(flight), ([0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 1, 1])):
        tell(m, cand, row)
    assert sum(m.filled) == 4
    assert flight[0].id in m._member_ids  # the all-solving child replaced someone


def test_identical_members_do_not_break_attraction():
    # Every member solves the same examples: attraction is all zero (the reference code divides by zero).
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 3})
    for cand in m.ask(2):
        tell(m, cand, [1, 0, 1])
    for _ in range(10):
        cand = m.ask(1)[0]
        assert np.all(np.isfinite(cand.genome))
        tell(m, cand, [1, 0, 1])


def test_negative_scores_are_shifted_not_rejected():
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 2})
    a, b = m.ask(2)
    tell(m, a, [-1.0, -3.0])
    tell(m, b, [-2.0, -1.0])
    child = m.ask(1)[0]
    tell(m, child, [-0.5, -0.5])  # best on both examples: it must stay
    assert child.id in m._member_ids


def test_seeds_that_all_fail_stop_the_population():
    m = make_strategy("m2n2", "p", weight_spec(), 0, {})
    for cand in m.ask(2):
        m.tell([Evaluation.failure(cand.id, "boom")])
    assert m.ask(1) == []
    assert "archive" in m.stop()


def test_ablation_switches():
    spec = weight_spec(dim=6)
    m = make_strategy("m2n2", "p", spec, 0, {"split_point": False, "archive_size": 2})
    seeds = m.ask(2)
    tell(m, seeds[0], [1, 0])
    tell(m, seeds[1], [0, 1])
    child = m.ask(1)[0].genome
    a, b = spec.seeds
    # Without a split point the child is one SLERP: it lies in the plane of a and b.
    coef, *_ = np.linalg.lstsq(np.stack([a, b], axis=1), child, rcond=None)
    np.testing.assert_allclose(np.stack([a, b], axis=1) @ coef, child, atol=1e-9)
    with pytest.raises(ValueError, match="mutation"):
        make_strategy("m2n2", "p", spec, 0, {"crossover": False})
    mutant = make_strategy("m2n2", "p", spec, 0, {"crossover": False, "mutation": 0.1, "archive_size": 2})
    s = mutant.ask(2)
    tell(mutant, s[0], [1, 0])
    tell(mutant, s[1], [0, 1])
    child = mutant.ask(1)[0]
    assert len(child.parent_ids) == 1
    parent = spec.seeds[[c.id for c in s].index(child.parent_ids[0])]
    assert 0 < np.abs(child.genome - parent).max() < 1.0


def test_ga_is_m2n2_without_competition_or_attraction():
    spec = weight_spec()
    ga = make_strategy("ga", "p", spec, 5, {"archive_size": 3})
    m2n2 = make_strategy("m2n2", "p", spec, 5, {"archive_size": 3, "alpha": 0.0, "attraction": False})
    rng = np.random.default_rng(0)
    for _ in range(15):
        for x, y in zip(ga.ask(2), m2n2.ask(2)):
            np.testing.assert_array_equal(x.genome, y.genome)
            row = rng.integers(0, 2, 5)
            tell(ga, x, row)
            tell(m2n2, y, row)


def test_recipe_space_children_stay_in_the_cube_and_random_seeds_fill_the_archive():
    spec = SearchSpec.unit_cube(4, np.full(4, 0.9))
    m = make_strategy("m2n2", "p", spec, 0, {"archive_size": 5, "mutation": 0.3})
    seeds = m.ask(10)
    assert len(seeds) == 5
    np.testing.assert_array_equal(seeds[0].genome, np.full(4, 0.9))
    for i, cand in enumerate(seeds):
        tell(m, cand, np.eye(5)[i])
    for cand in m.ask(20):
        assert np.all((cand.genome >= 0) & (cand.genome <= 1))


def test_state_round_trip_mid_flight():
    spec = weight_spec()
    a = make_strategy("m2n2", "p", spec, 9, {"archive_size": 3})
    rng = np.random.default_rng(2)
    for _ in range(4):
        for cand in a.ask(2):
            tell(a, cand, rng.integers(0, 2, 6))
    pending = a.ask(2)
    b = make_strategy("m2n2", "p", spec, 9, {"archive_size": 3})
    b.load_state_dict(plaindata.loads(plaindata.dumps(a.state_dict())))
    rows = [rng.integers(0, 2, 6) for _ in pending]
    for s in (a, b):
        for cand, row in zip(reversed(pending), rows):
            tell(s, cand, row)
    for x, y in zip(a.ask(3), b.ask(3)):
        assert x.id == y.id and x.parent_ids == y.parent_ids
        np.testing.assert_array_equal(x.genome, y.genome)


# --- seed recipes --------------------------------------------------------------------------


def test_seed_gram_inner_products_match_materialized_vectors():
    rng = np.random.default_rng(0)
    seeds = rng.normal(size=(3, 40))
    for edges in (None, np.array([0, 7, 8, 25, 40])):
        gram = SeedGram.from_flat(seeds, edges)
        a = SeedRecipe(np.array([0, 1, gram.n_blocks]), rng.normal(size=(2, 3)))
        b = SeedRecipe(np.array([0, gram.n_blocks - 1, gram.n_blocks]), rng.normal(size=(2, 3)))
        va, vb = gram.materialize(a, seeds), gram.materialize(b, seeds)
        assert gram.inner(a, b) == pytest.approx(va @ vb)
        child = gram.crossover(a, b, split_block=2, mix=0.3)
        split_at = gram.block_edges[2]
        np.testing.assert_allclose(gram.materialize(child, seeds), split_point_slerp(va, vb, int(split_at), 0.3))
        assert SeedRecipe.decode(child.encode()).coeffs.tolist() == child.coeffs.tolist()


def test_seed_recipes_compact_equal_neighbours():
    r = SeedRecipe(np.array([0, 2, 5, 9]), np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])).compact()
    assert r.edges.tolist() == [0, 5, 9]
    with pytest.raises(ValueError, match="not a seed recipe"):
        SeedRecipe.decode(np.array([2.0, 2.0, 0.0, 1.0]))


def test_recipe_form_gives_the_weight_space_children_on_the_digits_mlp(digits_bench):
    data = digits_bench.Digits.load()
    seeds = digits_bench.specialists(data)
    weights = make_strategy("m2n2", "w", SearchSpec.weights(seeds), 11, {"archive_size": 6})
    gram = SeedGram.from_flat(np.stack(seeds))
    recipes = make_strategy("m2n2", "r", SearchSpec.seed_recipes(gram), 11, {"archive_size": 6, "archive": "seed_recipes"})
    stacked = np.stack(seeds)
    for _ in range(60):
        (cw,), (cr,) = weights.ask(1), recipes.ask(1)
        child = gram.materialize(SeedRecipe.decode(cr.genome), stacked)
        np.testing.assert_allclose(child, cw.genome, rtol=1e-9, atol=1e-12)
        scores = digits_bench.correct(cw.genome, data.x_train, data.y_train)
        tell(weights, cw, scores)
        tell(recipes, cr, scores)
    assert max(len(SeedRecipe.decode(m).coeffs) for m in recipes._members if m is not None) > 1  # split points kept


def test_seed_recipes_refuse_mutation_and_need_their_space():
    spec = SearchSpec.seed_recipes(SeedGram.from_flat(np.eye(2, 4)))
    with pytest.raises(ValueError, match="mutation"):
        make_strategy("m2n2", "r", spec, 0, {"mutation": 0.01, "archive": "seed_recipes"})
    with pytest.raises(ValueError, match="seed_recipes"):
        make_strategy("m2n2", "r", spec, 0, {})
    with pytest.raises(ValueError, match="seed_recipes"):
        make_strategy("m2n2", "r", weight_spec(), 0, {"archive": "seed_recipes"})


# --- the digits experiment, CI-sized ---------------------------------------------------------


@pytest.mark.parametrize("pretrained", [False, True])
def test_short_digits_run_rises_above_the_seeds(digits_bench, pretrained):
    data = digits_bench.Digits.load()
    seeds = digits_bench.specialists(data) if pretrained else digits_bench.random_seeds(42)
    seed_test = max(float(digits_bench.correct(s, data.x_test, data.y_test).mean()) for s in seeds)
    flags = {"no_attraction": False, "no_splitpoint": False, "no_crossover": False}
    result = digits_bench.run("m2n2", 42, 1500, pretrained, flags, data)
    assert result["passes"] == 1500
    assert result["test_acc"] > seed_test + 0.15
    assert result["train_acc"] >= result["test_acc"] - 0.1


def test_archive_stats_coverage_and_entropy():
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 2})
    assert m.archive_stats()["members"] == 0
    a, b = m.ask(2)
    tell(m, a, [1, 1, 0, 0])
    tell(m, b, [1, 0, 0, 0])
    stats = m.archive_stats()
    assert stats["members"] == 2
    assert stats["coverage"] == pytest.approx(0.5)  # examples 0 and 1 are solved by someone
    assert stats["entropy"] == pytest.approx(math.log(2) / 4)  # only example 0 is split, evenly


def test_immigrants_compete_for_the_archive_once():
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 2})
    a, b = m.ask(2)
    tell(m, a, [1, 0, 0])
    tell(m, b, [0, 1, 0])
    stranger = Evaluation("other:7", "ok", 1.0, per_example=np.array([1.0, 1.0, 1.0]))
    m.immigrate(np.full(8, 3.0), stranger)
    assert "other:7" in m._member_ids  # solves everything: it displaces a seed
    m.immigrate(np.full(8, 3.0), stranger)
    assert m._member_ids.count("other:7") == 1
    weak = Evaluation("other:8", "ok", 0.0, per_example=np.zeros(3))
    m.immigrate(np.zeros(8), weak)
    assert "other:8" not in m._member_ids


def test_only_fully_scored_children_enter_the_archive():
    """Racing: a child stopped after a subset of the examples (fidelity < 1) is never archived,
    however its partial scores compare; the same scores fully scored are."""
    m = make_strategy("m2n2", "p", weight_spec(), 0, {"archive_size": 3})
    seeds = m.ask(2)
    tell(m, seeds[0], [1, 0, 0, 0])
    tell(m, seeds[1], [0, 1, 0, 0])
    partial, full = m.ask(2)
    scores = np.array([np.nan, np.nan, 1.0, 1.0])  # solves what nobody solves, on half the examples
    m.tell([Evaluation(partial.id, "ok", 1.0, per_example=scores, fidelity=0.5)])
    assert partial.id not in m._member_ids and m.filled.tolist() == [True, True, False]
    m.tell([Evaluation(full.id, "ok", 0.5, per_example=np.array([0.0, 0.0, 1.0, 1.0]))])
    assert full.id in m._member_ids
