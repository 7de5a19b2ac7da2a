"""What resuming, reporting and ``evomerge status`` rely on from the run store, as pytest tests.

A run directory is the checkpoint: everything a resumed run, a report or an export reads comes back
from it exactly as it went in. The suite checks that candidates and evaluations round-trip (genomes
bit for bit, per-example scores as float32, failures and NaN kept out of the best); that the
populations' checkpoints are saved together or not at all; that the replay log puts every ask
before the first evaluation recorded after it; and that a read-only reader (``evomerge status``
while the run goes) neither blocks the writer nor sees half a write.

``RunStoreSuite`` runs against ``evomerge.store.RunStore``; a subclass that overrides the
``open_store`` fixture runs it against another implementation of the same interface.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from evomerge.errors import RunDirError
from evomerge.records import Candidate, Evaluation
from evomerge.store import RunStore

StoreFactory = Callable[..., RunStore]
"""``(run_dir, *, create=False, readonly=False) -> RunStore``."""

POPULATIONS = ("cma", "m2n2")


def candidate(population: str, number: int, dim: int = 5) -> Candidate:
    """A candidate whose genome has bits a float32 round trip would lose."""
    genome = np.random.default_rng(number).uniform(size=dim) + 1e-12
    return Candidate(f"{population}:{number}", population, genome, parent_ids=(f"{population}:0",))


def evaluation(cand: Candidate, fitness: float = 0.5, n_examples: int = 4) -> Evaluation:
    scores = np.linspace(0.0, 1.0, n_examples) + fitness
    return Evaluation(
        cand.id, "ok", fitness, scores, metrics={"loss": 0.25, "usage": {"requests": 2}}, worker="w0", started=10.0, duration=1.5
    )


class RunStoreSuite:
    """The run store's contract; override ``open_store`` to run it against another store."""

    @pytest.fixture
    def open_store(self) -> StoreFactory:
        return RunStore

    @pytest.fixture
    def store(self, open_store, tmp_path) -> RunStore:
        """A new run with two populations, open for writing."""
        store = open_store(tmp_path / "run", create=True)
        store.init_run("suite", "name: suite\n", {"evaluations": 10})
        for name in POPULATIONS:
            store.add_population(name, "random", 5, {"dim": 5})
        yield store
        store.close()

    def test_a_directory_without_a_run_is_refused(self, open_store, tmp_path):
        with pytest.raises(RunDirError):
            open_store(tmp_path / "nothing", readonly=True)

    def test_a_directory_holds_one_run(self, store):
        with pytest.raises(RunDirError):
            store.init_run("again", "name: again\n", {})

    def test_candidates_and_evaluations_round_trip(self, store):
        cands = [candidate(p, i) for p in POPULATIONS for i in (1, 2)]
        for cand in cands:
            store.add_candidate(cand, asked_after=0)
        sent = [evaluation(c, fitness=0.1 * i) for i, c in enumerate(cands)]
        assert [store.add_evaluation(ev) for ev in sent] == [1, 2, 3, 4]
        rows = list(store.evaluations(with_scores=True))
        assert [r.candidate_id for r in rows] == [c.id for c in cands]
        for row, cand, ev in zip(rows, cands, sent):
            assert row.population == cand.population
            np.testing.assert_array_equal(row.genome, cand.genome)  # float64, bit for bit
            np.testing.assert_allclose(row.per_example, ev.per_example, rtol=1e-6)  # stored as float32
            assert (row.status, row.fitness, row.metrics) == ("ok", ev.fitness, ev.metrics)
            assert (row.worker, row.started, row.duration, row.error) == ("w0", 10.0, 1.5, None)
        assert [r.candidate_id for r in store.evaluations("m2n2")] == ["m2n2:1", "m2n2:2"]
        assert store.evaluation_counts() == {"cma": (2, 2), "m2n2": (2, 2)}

    def test_failed_and_nan_evaluations_are_kept_but_never_best(self, store):
        cands = [candidate("cma", i) for i in (1, 2, 3)]
        for cand in cands:
            store.add_candidate(cand, asked_after=0)
        store.add_evaluation(evaluation(cands[0], fitness=0.2))
        store.add_evaluation(Evaluation.failure(cands[1].id, "CUDA out of memory", worker="w1"))
        store.add_evaluation(Evaluation(cands[2].id, "ok", math.nan))
        rows = {r.candidate_id: r for r in store.evaluations()}
        assert (rows["cma:2"].status, rows["cma:2"].fitness, rows["cma:2"].error) == ("failed", -math.inf, "CUDA out of memory")
        assert rows["cma:3"].fitness == -math.inf and not rows["cma:3"].usable
        assert store.best().candidate_id == "cma:1"
        assert store.counts() == {"cma": {"ok": 2, "failed": 1}}

    def test_service_answers_are_recorded_with_their_evaluation(self, store):
        """Workers never write the store: a black-box answer arrives inside the evaluation that
        asked for it (a failed one too), and the first answer recorded under a key stays."""
        cands = [candidate("cma", i) for i in (1, 2)]
        for cand in cands:
            store.add_candidate(cand, asked_after=0)
        first = evaluation(cands[0])
        first.responses = {"k1": {"choices": [1]}, "k2": {"choices": [2]}}
        store.add_evaluation(first)
        failed = Evaluation.failure(cands[1].id, "the service refused")
        failed.responses = {"k2": {"choices": ["later"]}, "k3": {"choices": [3]}}
        store.add_evaluation(failed)
        assert store.api_responses() == {"k1": {"choices": [1]}, "k2": {"choices": [2]}, "k3": {"choices": [3]}}

    def test_checkpoints_are_saved_together_or_not_at_all(self, store):
        assert store.checkpoints() == ({}, 0)
        store.save_checkpoints({"cma": b"c1", "m2n2": b"m1"}, evaluations_seq=3, active_seconds=4.0)
        assert store.checkpoints() == ({"cma": b"c1", "m2n2": b"m1"}, 3)
        with pytest.raises(sqlite3.Error):  # the second state cannot be stored: nothing is
            store.save_checkpoints({"cma": b"c2", "m2n2": object()}, evaluations_seq=5, active_seconds=6.0)  # type: ignore[dict-item]
        assert store.checkpoints() == ({"cma": b"c1", "m2n2": b"m1"}, 3)
        assert store.run_info()["active_seconds"] == 4.0
        store.save_checkpoints({"cma": b"c2", "m2n2": b"m2"}, evaluations_seq=5, active_seconds=6.0)
        assert store.checkpoints() == ({"cma": b"c2", "m2n2": b"m2"}, 5)

    def test_replay_puts_each_ask_before_the_evaluations_recorded_after_it(self, store):
        c1, c2, c3, c4 = (candidate("cma", i) for i in (1, 2, 3, 4))
        store.add_candidate(c1, asked_after=0)
        store.add_candidate(c2, asked_after=0)
        store.add_evaluation(evaluation(c2))  # results come back in any order
        store.add_candidate(c3, asked_after=1)
        store.add_evaluation(evaluation(c1))
        store.add_evaluation(evaluation(c3))
        store.add_candidate(c4, asked_after=3)

        def log(after_seq: int) -> list[str]:
            return [f"{kind} {item[1] if kind == 'ask' else item.candidate_id}" for kind, item in store.replay_log(after_seq)]

        assert log(0) == ["ask cma:1", "ask cma:2", "tell cma:2", "ask cma:3", "tell cma:1", "tell cma:3", "ask cma:4"]
        assert log(2) == ["tell cma:3", "ask cma:4"]  # a checkpoint at 2 already holds what came before

    def test_a_reader_neither_blocks_the_writer_nor_sees_half_a_write(self, store, open_store):
        first = candidate("cma", 1)
        store.add_candidate(first, asked_after=0)
        store.add_evaluation(evaluation(first))
        reader = open_store(store.run_dir, readonly=True)
        try:
            rows = reader.evaluations()
            assert next(rows).candidate_id == "cma:1"  # a read is in progress
            second = candidate("cma", 2)
            store.add_candidate(second, asked_after=1)
            store.add_evaluation(evaluation(second))  # the writer commits while the reader reads
            assert list(rows) == []  # the reader's query sees the moment it started
            assert [r.candidate_id for r in reader.evaluations()] == ["cma:1", "cma:2"]
            with pytest.raises(sqlite3.OperationalError):
                reader.log_event("note", "a reader never writes")
        finally:
            reader.close()

    def test_the_run_reopens_as_it_was_left(self, store, open_store):
        cand = candidate("m2n2", 1)
        store.add_candidate(cand, asked_after=0)
        store.add_evaluation(evaluation(cand, fitness=0.75))
        store.save_checkpoints({"cma": b"c", "m2n2": b"m"}, evaluations_seq=1, active_seconds=2.0)
        store.set_state("stopped", {"best": 0.75})
        store.close()
        again = open_store(Path(store.run_dir))
        try:
            info = again.run_info()
            assert (info["name"], info["state"], info["summary"], info["budget"]) == ("suite", "stopped", {"best": 0.75}, {"evaluations": 10})
            assert again.config_yaml() == "name: suite\n"
            assert [p["name"] for p in again.populations()] == list(POPULATIONS)
            assert again.best().fitness == 0.75
            assert again.checkpoints() == ({"cma": b"c", "m2n2": b"m"}, 1)
        finally:
            again.close()
