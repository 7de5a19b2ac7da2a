"""Properties every merge method must have, run through Space + Materializer, as pytest test classes.

``RegisteredMergeMethods`` runs them once per entry of ``MERGE_METHODS`` and per setup it accepts
(with or without a base model), so a newly registered method is checked without writing a test.
A method under development is checked by subclassing ``MergeMethodSuite`` and overriding the
``merge_case`` fixture; recipes name their method, so it must be in ``MERGE_METHODS`` while the
test runs::

    from evomerge.testing.merge_suite import MergeMethodSuite

    class TestMyMethod(MergeMethodSuite):
        random_methods = frozenset({"my_method"})  # only if its result depends on the recipe's seed

        @pytest.fixture(params=[True, False])
        def merge_case(self, request, monkeypatch):
            monkeypatch.setitem(MERGE_METHODS, MY_METHOD.name, MY_METHOD)
            return MY_METHOD, 3, request.param  # (method, number of experts, with a base model)

The properties: every element is written in place and finite at every granularity; the same recipe
gives the same result; the seed matters only to methods declared random; chunk size never changes
the result; identical models merge to themselves; genomes round-trip through encode and decode;
the space's start decodes to the declared defaults; bfloat16 and float64 agree with float32; every
memory tier the method accepts (experts on the device, in host memory, mapped from safetensors
files) gives identical results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.merge import MERGE_METHODS, MergeMethod
from evomerge.merge.method import LORA_FACTORS
from evomerge.space.merge_space import GRANULARITIES, Space
from evomerge.testing.tiny_models import LAYOUT, LORA_LAYOUT, random_state
from evomerge.workers.materializer import STREAM_BUFFER_SHARE, Materializer
from evomerge.workers.tiers import TIER_CLASSES, MappedTier, method_refusals

RANDOM_METHODS = frozenset({"dare_linear", "dare_ties"})
"""Registered methods whose result depends on the recipe's seed."""

ADAPTER_METHODS = frozenset(name for name, m in MERGE_METHODS.items() if m.inputs == LORA_FACTORS)
"""Registered methods that merge PEFT adapters rather than whole models (declared inputs: LoRA factors)."""

MergeCase = tuple[MergeMethod, int, bool]
"""(method, number of experts, with a base model): one setup a method is checked in."""


class MergeSetup:
    """Inputs of one merge: a base (or none), experts, and a fresh way to build a materializer."""

    def __init__(
        self,
        method: MergeMethod,
        n_models: int,
        with_base: bool,
        dtype: torch.dtype = torch.float32,
        layout: dict[str, tuple[int, ...]] | None = None,
    ):
        self.method = method
        self.n_models = n_models
        self.layout = layout or (LORA_LAYOUT if method.name in ADAPTER_METHODS else LAYOUT)
        self.base = random_state(self.layout, seed=100) if with_base else None
        if self.base is not None:
            # fine-tuned experts: base plus a small task vector
            self.experts = [
                {n: self.base[n] + d for n, d in random_state(self.layout, 200 + i, 0.1).items()}
                for i in range(n_models)
            ]
        else:
            self.experts = [random_state(self.layout, 200 + i) for i in range(n_models)]
        self.dtype = dtype

    @property
    def names(self) -> list[str]:
        return list(self.layout)

    def targets(self, fill: float = float("nan")) -> dict[str, torch.Tensor]:
        return {n: torch.full(s, fill, dtype=self.dtype) for n, s in self.layout.items()}

    def materializer(
        self,
        targets: dict[str, torch.Tensor] | None = None,
        chunk: int | None = None,
        tier: str = "device",
        folder: Path | None = None,
        stream_share: float = STREAM_BUFFER_SHARE,
    ) -> Materializer:
        """A fresh materializer with the experts in memory ``tier``; the mmap tier maps them from
        safetensors files written to ``folder``; ``stream_share`` sizes streamed blocks."""
        targets = self.targets() if targets is None else targets
        tier_class = TIER_CLASSES[tier]
        if tier_class.maps_files:
            if folder is None:
                raise ValueError("the mmap tier reads the experts from files: pass a folder to write them to")
            materializer = Materializer(targets, MappedTier(targets, *self.save(folder)), chunk, stream_share)
        else:
            materializer = Materializer.from_state_dicts(
                targets,
                ((f"expert {i}", e) for i, e in enumerate(self.experts)),
                n_models=self.n_models,
                base=self.base,
                chunk=chunk,
                tier=tier_class,
                stream_share=stream_share,
            )
        if self.method.needs_fisher:  # what a worker estimates on each expert's data: here random
            materializer.set_fishers(self.fishers(), floor=1e-8)
        return materializer

    def save(self, folder: Path) -> tuple[list[tuple[str, list[Path]]], tuple[str, list[Path]] | None]:
        """Write the experts (and the base) as safetensors files: ``(experts, base)`` as
        :class:`MappedTier` takes them."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)

        def write(label: str, state: dict[str, torch.Tensor]) -> tuple[str, list[Path]]:
            path = folder / f"{label.replace(' ', '_')}.safetensors"
            save_file({n: t.contiguous() for n, t in state.items()}, str(path))
            return label, [path]

        experts = [write(f"expert {i}", e) for i, e in enumerate(self.experts)]
        return experts, None if self.base is None else write("base", self.base)

    def fishers(self) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(300)
        return {n: torch.rand((self.n_models, *s), generator=gen) for n, s in self.layout.items()}


def method_cases(methods: dict[str, MergeMethod] = MERGE_METHODS) -> list:
    """Every method with every setup it accepts, as pytest params named ``method-base|nobase``."""
    cases = []
    for name, method in methods.items():
        n = max(method.max_models or 3, method.min_models)
        bases = [True] if method.needs_base else ([False] if name in ADAPTER_METHODS else [False, True])
        for with_base in bases:
            cases.append(pytest.param((method, n, with_base), id=f"{name}-{'base' if with_base else 'nobase'}"))
    return cases


def _granularities(method: MergeMethod) -> list[str]:
    return ["global"] if method.global_only else list(GRANULARITIES)


def _space(setup: MergeSetup, granularity: str | None = None) -> Space:
    method = setup.method
    granularity = granularity or ("global" if method.global_only else "per_model")
    layer_groups = 2 if granularity == "per_layer_group" else None
    return Space.build(method, setup.names, setup.n_models, granularity=granularity, layer_groups=layer_groups)


def _genome(space: Space, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.05, 0.95, space.dim)


def _merged(
    setup: MergeSetup,
    recipe,
    chunk: int | None = None,
    tier: str = "device",
    folder: Path | None = None,
    stream_share: float = STREAM_BUFFER_SHARE,
) -> dict[str, torch.Tensor]:
    targets = setup.targets()
    setup.materializer(targets, chunk, tier, folder, stream_share).apply(recipe)
    return {n: t.clone() for n, t in targets.items()}


class MergeMethodSuite:
    """The merge-method properties. A subclass provides the ``merge_case`` fixture
    ``(method, n_models, with_base)``; pytest names it as missing if it does not."""

    random_methods: frozenset[str] = RANDOM_METHODS
    adapter_methods: frozenset[str] = ADAPTER_METHODS

    def build_setup(self, case: MergeCase, dtype: torch.dtype = torch.float32) -> MergeSetup:
        method, n_models, with_base = case
        layout = LORA_LAYOUT if method.name in self.adapter_methods else LAYOUT
        return MergeSetup(method, n_models, with_base, dtype, layout)

    def test_writes_every_element_in_place_and_finite(self, merge_case):
        setup = self.build_setup(merge_case)
        for granularity in _granularities(setup.method):
            space = _space(setup, granularity)
            targets = setup.targets(fill=float("nan"))  # any element left unwritten stays NaN
            pointers = {n: t.data_ptr() for n, t in targets.items()}
            materializer = setup.materializer(targets)
            materializer.apply(space.decode(_genome(space)))
            for name, t in targets.items():
                assert t.data_ptr() == pointers[name], f"{name} was replaced, not written in place"
                assert materializer.targets[name].data_ptr() == pointers[name]
                assert torch.isfinite(t).all(), f"{granularity}: {name} has unwritten or non-finite entries"

    def test_same_recipe_same_result(self, merge_case):
        setup = self.build_setup(merge_case)
        space = _space(setup)
        recipe = space.decode(_genome(space, 1))
        targets = setup.targets()
        materializer = setup.materializer(targets)
        materializer.apply(recipe)
        first = {n: t.clone() for n, t in targets.items()}
        materializer.apply(space.decode(_genome(space, 2)))  # something else in between
        materializer.apply(recipe)
        fresh = _merged(setup, recipe)  # and a materializer with nothing cached
        for name in first:
            assert torch.equal(targets[name], first[name]), name
            assert torch.equal(fresh[name], first[name]), name

    def test_seed_matters_only_for_random_methods(self, merge_case):
        setup = self.build_setup(merge_case)
        space = _space(setup)
        genome = _genome(space, 3)
        a = _merged(setup, space.decode(genome, seed=1))
        b = _merged(setup, space.decode(genome, seed=2))
        same = all(torch.equal(a[n], b[n]) for n in a)
        assert same == (setup.method.name not in self.random_methods)
        # decode without a seed derives it from the genome: same genome, same merge
        assert space.decode(genome).seed == space.decode(genome.copy()).seed
        assert space.decode(genome).seed != space.decode(_genome(space, 4)).seed

    def test_result_does_not_depend_on_chunk_size(self, merge_case):
        # DARE included: its drop decisions hash (expert key, position), so chunking cannot change them.
        setup = self.build_setup(merge_case)
        space = _space(setup)
        recipe = space.decode(_genome(space, 5))
        small = _merged(setup, recipe, chunk=7)  # chunk boundaries fall inside rows
        large = _merged(setup, recipe, chunk=1 << 20)
        for name in small:
            torch.testing.assert_close(small[name], large[name], rtol=1e-5, atol=1e-6, msg=name)

    def test_identical_models_merge_to_themselves(self, merge_case):
        setup = self.build_setup(merge_case)
        if setup.method.name in self.adapter_methods:
            pytest.skip("adapter composition sums scaled adapters; it has no fixed point at identical inputs")
        model = setup.base if setup.base is not None else setup.experts[0]
        setup.experts = [dict(model) for _ in range(setup.n_models)]  # every task vector is zero
        space = _space(setup)
        merged = _merged(setup, space.decode(_genome(space, 6)))
        for name in merged:
            torch.testing.assert_close(merged[name], model[name], rtol=1e-5, atol=1e-6, msg=name)

    def test_encode_decode_round_trip(self, merge_case):
        setup = self.build_setup(merge_case)
        rng = np.random.default_rng(7)
        for granularity in _granularities(setup.method):
            space = _space(setup, granularity)
            wanted = {}
            for gene in space.genes:
                spec = setup.method.param(gene.name)
                n = setup.n_models if spec.per_model and granularity != "global" else 1
                if gene.levels is None:
                    value = rng.uniform(gene.low, gene.high, n)
                else:  # an integer gene round-trips its integers
                    value = rng.integers(gene.low, gene.high, n, endpoint=True).astype(np.float64)
                wanted[gene.name] = value.tolist() if n > 1 else float(value[0])
            genome = space.encode(wanted)
            assert genome.shape == (space.dim,)
            assert ((genome >= 0) & (genome <= 1)).all()
            recipe = space.decode(genome)
            for param, value in wanted.items():
                expected = value if isinstance(value, list) else [value] * len(recipe.values[param][0])
                for group in recipe.values[param]:
                    np.testing.assert_allclose(group, expected, rtol=1e-12, atol=1e-12)

    def test_x0_decodes_to_declared_defaults(self, merge_case):
        setup = self.build_setup(merge_case)
        space = _space(setup)
        recipe = space.decode(space.x0())
        for spec in setup.method.params:
            for group in recipe.values[spec.name]:
                width = setup.n_models if spec.per_model else 1
                np.testing.assert_allclose(group, [spec.default_for(setup.n_models)] * width, atol=1e-12)
        assert recipe.options == setup.method.default_options()

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
    def test_other_dtypes_agree_with_float32(self, merge_case, dtype):
        # Resident copies take the working model's dtype; the merge must work in it and stay close to
        # the float32 result. bfloat16 keeps ~3 significant digits, so a task vector (expert − base)
        # loses ~4% here and TIES / LoRA trims and sign elections flip a few entries of these tiny
        # tensors: a loose bound, which a wrong formula or dtype mix-up still exceeds by far.
        reference = self.build_setup(merge_case)
        other = self.build_setup(merge_case, dtype)
        space = _space(reference)
        recipe = space.decode(_genome(space, 8))
        want, got = _merged(reference, recipe), _merged(other, recipe)
        for name in want:
            assert got[name].dtype == dtype
            error = (got[name].double() - want[name].double()).norm() / want[name].double().norm()
            assert error < (0.1 if dtype == torch.bfloat16 else 1e-5), name

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_every_memory_tier_gives_identical_results(self, merge_case, dtype, tmp_path):
        # Experts stored in float32 and merged in bfloat16 are converted as they are read: the
        # streaming tiers must round exactly as loading does.
        setup = self.build_setup(merge_case, dtype)
        granularity = "global" if setup.method.global_only else "per_tensor"
        space = _space(setup, granularity)
        recipe = space.decode(_genome(space, 9))
        chunk = 4  # small, so that a tiny share streams these small tensors in blocks
        want = _merged(setup, recipe, chunk)
        refused = method_refusals(setup.method)
        for tier in TIER_CLASSES:
            if tier in refused:
                continue
            # a tiny share streams an elementwise method's tensors a few elements at a time
            for share in (STREAM_BUFFER_SHARE, 1e-4):
                got = _merged(setup, recipe, chunk, tier, tmp_path / tier, share)
                for name in want:
                    assert torch.equal(got[name], want[name]), f"{tier} (blocks of {share}): {name}"


class RegisteredMergeMethods(MergeMethodSuite):
    """The properties for every entry of ``MERGE_METHODS`` in every setup it accepts."""

    @pytest.fixture(params=method_cases())
    def merge_case(self, request) -> MergeCase:
        return request.param

    def test_the_declared_kinds_are_registered(self):
        assert self.random_methods <= set(MERGE_METHODS) and self.adapter_methods <= set(MERGE_METHODS)
