"""A data-flow path on tiny random Llama, Mistral, Qwen2 (tied embeddings) and Gemma2 models: the
initial genome is source 0 exactly, a hand-written path equals the stacked model built by hand
(scales applied by hooks, a second implementation), and cached generation through a repeated
layer equals uncached generation."""

from __future__ import annotations

import copy

import pytest
import torch

from evomerge.space.paths import Path, PathSpace
from evomerge.workers.path_model import PathMaterializer, decoder_stack

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-12
)
"""A norm's epsilon is the one inexactness of folding scales into weights; random embeddings (std
0.02) make the stream so small that the default 1e-6 would show, so these models take a tiny one."""


def _config(arch: str, layers: int):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**SMALL, num_hidden_layers=layers)
    if arch == "mistral":
        return transformers.MistralConfig(**SMALL, num_hidden_layers=layers, sliding_window=4)
    if arch == "qwen2":
        return transformers.Qwen2Config(**SMALL, num_hidden_layers=layers, tie_word_embeddings=True)
    return transformers.Gemma2Config(
        **SMALL, num_hidden_layers=layers, head_dim=16, sliding_window=4, query_pre_attn_scalar=16
    )


def _model(arch: str, layers: int, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, layers))
    with torch.no_grad():  # norms start at one value in every model: make every tensor differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def stacked_model(sources: list[torch.nn.Module], path: Path) -> torch.nn.Module:
    """The path built the slow way: a fresh model of len(path) layers with their weights copied in,
    embeddings, final norm and head from source 0, and scales applied by forward pre-hooks."""
    first = sources[0]
    config = copy.deepcopy(first.config)
    config.num_hidden_layers = len(path)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [sources[s].config.layer_types[i] for s, i in path.layers]
    model = type(first)(config).eval()
    state = {k: v for k, v in first.state_dict().items() if ".layers." not in k}
    for k, (s, i) in enumerate(path.layers):
        for name, tensor in decoder_stack(sources[s]).layers[i].state_dict().items():
            state[f"model.layers.{k}.{name}"] = tensor
    model.load_state_dict(state, strict=True)
    for layer, scale in zip(model.model.layers, path.scales):
        layer.register_forward_pre_hook(lambda m, args, kwargs, c=scale: ((args[0] * c, *args[1:]), kwargs), with_kwargs=True)
    return model


ARCHS = ["llama", "mistral", "qwen2", "gemma2"]
IDS = torch.tensor([[3, 17, 5, 42, 9, 11, 2]])


@pytest.fixture(scope="module", params=ARCHS)
def sources(request):
    return request.param, [_model(request.param, 2, seed=1), _model(request.param, 3, seed=2)]


def _working(sources):
    """A path materializer over deep copies (the working model's layer list is re-pointed)."""
    first, second = copy.deepcopy(sources[0]), copy.deepcopy(sources[1])
    return PathMaterializer.from_models([first, second])


@torch.no_grad()
def test_the_initial_genome_reproduces_source_0_exactly(sources):
    _, models = sources
    paths = _working(models)
    space = PathSpace((2, 3), repeats=3)
    paths.apply(space.decode(space.x0()))
    assert torch.equal(paths.model(IDS).logits, models[0](IDS).logits)


@torch.no_grad()
def test_a_hand_written_path_equals_the_stacked_model_built_by_hand(sources):
    arch, models = sources
    paths = _working(models)
    path = Path(((0, 0), (1, 2), (1, 0), (0, 0), (0, 1)), (1.0, 0.5, 1.0, 1.7, 0.8))
    paths.apply(path)
    assert len(paths.model.model.layers) == 5 and paths.model.config.num_hidden_layers == 5
    expected = stacked_model(models, path)(IDS).logits
    torch.testing.assert_close(paths.model(IDS).logits, expected, rtol=0, atol=1e-6)
    # switching back costs no copy and restores source 0 exactly
    paths.apply(Path(((0, 0), (0, 1)), (1.0, 1.0)))
    assert torch.equal(paths.model(IDS).logits, models[0](IDS).logits)
    assert paths.model.model.layers[0].self_attn.q_proj.weight is decoder_stack(paths.model).layers[0].self_attn.q_proj.weight


@torch.no_grad()
def test_cached_greedy_generation_through_a_repeated_layer_equals_uncached(sources):
    _, models = sources
    paths = _working(models)
    path = Path(((0, 0), (1, 1), (0, 0), (1, 1), (0, 1)), (1.0, 1.2, 0.9, 1.0, 1.0))
    paths.apply(path)
    indices = [layer.layer_idx if hasattr(layer, "layer_idx") else None for layer in paths.model.model.modules()]
    assert sorted(i for i in indices if i is not None) == list(range(5))  # one cache slot per position
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = paths.model.generate(IDS, use_cache=True, **kwargs)
    uncached = paths.model.generate(IDS, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, stacked_model(models, path).generate(IDS, use_cache=True, **kwargs))


@torch.no_grad()
def test_export_stacks_the_path_with_scales_folded_and_reloads_without_custom_code(sources, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.models.path_export import stacked_model as exported

    _, models = sources
    paths = _working(models)
    path = Path(((0, 0), (1, 2), (1, 0), (0, 0), (0, 1)), (1.0, 0.5, 1.3, 1.7, 0.8))
    paths.apply(path)
    expected = paths.model(IDS).logits
    model = exported(paths, path)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.num_hidden_layers == 5
    torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=0, atol=1e-5)
    assert not torch.equal(reloaded(IDS).logits, stacked_model(models, Path(path.layers, (1.0,) * 5))(IDS).logits)


def test_scales_are_refused_where_folding_is_not_exact_and_unit_scales_stack_anywhere():
    import transformers

    from evomerge.models.path_export import ScaleFoldError
    from evomerge.models.path_export import stacked_model as exported

    config = transformers.Olmo2Config(**SMALL, num_hidden_layers=2)  # norms after the sublayers, no fold declared
    torch.manual_seed(0)
    olmo = transformers.AutoModelForCausalLM.from_config(config).eval()
    paths = PathMaterializer.from_models([copy.deepcopy(olmo)])
    with pytest.raises(ScaleFoldError, match="cannot be folded exactly into a olmo2 model"):
        exported(paths, Path(((0, 0), (0, 1)), (1.0, 1.5)))
    path = Path(((0, 1), (0, 0), (0, 1)), (1.0, 1.0, 1.0))
    paths.apply(path)
    with torch.no_grad():
        torch.testing.assert_close(exported(paths, path)(IDS).logits, paths.model(IDS).logits, rtol=0, atol=1e-6)


def test_a_path_too_long_for_memory_is_refused_before_its_layers_are_copied(monkeypatch):
    from evomerge.errors import InsufficientMemoryError
    from evomerge.models import memory
    from evomerge.models.path_export import stacked_model as exported

    source = _model("llama", 2, seed=1)
    layer = sum(p.numel() * p.element_size() for p in source.model.layers[0].parameters())
    outside = sum(p.numel() * p.element_size() for n, p in source.named_parameters() if ".layers." not in n)
    paths = PathMaterializer.from_models([source])
    path = Path(((0, 0), (0, 1)) * 3, (1.0,) * 6)
    need = 2 * 6 * layer + outside  # six layer copies, loaded into a model of its own embeddings and head
    monkeypatch.setattr(memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(InsufficientMemoryError, match="the path has 6 layers: stacking them"):
        exported(paths, path)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need)
    assert exported(paths, path).config.num_hidden_layers == 6
