"""The data-flow space: slots, the initial genome, thresholded indicators, log-scaled scales."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.space.paths import PathError, PathSpace


def test_slots_repeat_the_sources_layers_and_the_initial_genome_is_source_0_at_scale_1():
    space = PathSpace((3, 2), repeats=2)
    assert space.slots == ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1)) * 2
    assert space.dim == 2 * 10
    path = space.decode(space.x0())
    assert path.layers == ((0, 0), (0, 1), (0, 2)) and path.scales == (1.0, 1.0, 1.0)


def test_indicators_are_cut_at_one_half_and_scales_span_the_bounds_on_a_log_scale():
    space = PathSpace((2, 2), repeats=1, scale_bounds=(0.5, 2.0))
    genome = np.array([0.49, 0.51, 1.0, 0.0, 0.0, 1.0, 0.75, 0.2])
    path = space.decode(genome)
    assert path.layers == ((0, 1), (1, 0))
    assert path.scales == pytest.approx((2.0, 2.0**0.5))


def test_encode_lays_a_hand_written_path_out_in_slot_order():
    space = PathSpace((2, 2), repeats=2)
    layers, scales = [(0, 0), (1, 1), (0, 0), (0, 1)], [1.0, 0.5, 2.0, 1.0]
    path = space.decode(space.encode(layers, scales))
    assert list(path.layers) == layers and path.scales == pytest.approx(scales)
    with pytest.raises(ValueError, match="cannot be laid out"):
        space.encode([(1, 1), (1, 0), (1, 1), (1, 0)])


def test_no_scaling_searches_indicators_only():
    space = PathSpace((2, 2), repeats=3, scaling="none")
    assert space.dim == 12 and [g.name for g in space.genes] == ["indicator"]
    assert space.decode(np.ones(12)).scales == (1.0,) * 12


def test_empty_and_overlong_paths_are_failed_candidates_and_bad_spaces_are_refused():
    space = PathSpace((2, 2), repeats=2, max_layers=3)
    with pytest.raises(PathError, match="empty"):
        space.decode(np.zeros(space.dim))
    with pytest.raises(PathError, match="more than merge.dataflow.max_layers"):
        space.decode(np.ones(space.dim))
    with pytest.raises(ValueError, match="shorter than the initial path"):
        PathSpace((4, 2), max_layers=3)
    PathSpace((4, 2), max_layers=3, head=1)  # the initial path is the head source's: 2 layers
    with pytest.raises(ValueError, match="the head source's 4 layers"):
        PathSpace((2, 4), max_layers=3, head=1)
    with pytest.raises(ValueError, match="must contain 1"):
        PathSpace((2,), scale_bounds=(1.5, 2.0))


def test_discrete_indicators_snap_so_equal_paths_share_a_genome():
    spec = PathSpace((2, 1), repeats=1, scaling="none").search_spec()
    assert np.array_equal(spec.snap(np.array([0.1, 0.7, 0.9])), spec.snap(np.array([0.4, 0.6, 0.55])))


def test_matrix_scaling_has_one_scale_per_transition_shared_wherever_it_is_taken():
    space = PathSpace((2, 1), repeats=3, scaling="matrix")
    assert space.dim == 9 + 4 * 3  # 9 slots; W over M = 3 layers with a row for the embeddings
    path = space.decode(space.x0())
    assert path.layers == ((0, 0), (0, 1)) and path.scales == (1.0, 1.0)
    # (0,1) -> (0,0) is taken twice: both times at W's one entry for it
    layers = [(0, 0), (0, 1), (0, 0), (0, 1), (0, 0), (1, 0)]
    scales = [0.5, 2.0, 1.5, 2.0, 1.5, 0.75]
    path = space.decode(space.encode(layers, scales))
    assert list(path.layers) == layers and path.scales == pytest.approx(scales)
    genome = space.encode(layers, scales)
    w = space.genes[1]
    genome[w.start + space.transition((0, 1), (0, 0))] = 1.0  # W[(0,1) -> (0,0)] at the upper bound
    assert space.decode(genome).scales == pytest.approx((0.5, 2.0, 2.0, 2.0, 2.0, 0.75))
    with pytest.raises(ValueError, match="taken twice with different scales"):
        space.encode([(0, 0), (0, 1), (0, 0), (0, 1), (0, 0)], [1.0, 1.0, 1.0, 1.0, 2.0])
