"""The tokenizer, chat template, special tokens and generation config an export carries.

The merged weights live in the working model (the base, or the first expert without one; a
data-flow path runs in its head source), so by default everything else comes from it too. An
instruct merge over a pretrained base needs the experts' instead: their chat template, their
end-of-turn token as ``eos_token_id``, their generation defaults. ``export.tokenizer_source`` names the model they come from and
``export.chat_template`` the template (mergekit's options of the same names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from evomerge.config import RunConfig, is_template
from evomerge.errors import ConfigError
from evomerge.models.adapters import is_adapter
from evomerge.models.loading import load_config, load_tokenizer

SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_ref(config: RunConfig, name: str) -> str:
    """The model ``base`` or an expert's name refers to (names are checked when the config loads)."""
    if name == "base":
        return config.model_ref(config.models.base) if config.models.base else config.expert_model(config.models.experts[config.head])
    expert = config.models.experts[config.models.expert_labels().index(name)]
    return config.expert_model(expert)


def export_tokenizer(config: RunConfig, model: torch.nn.Module, tokenizer):
    """The tokenizer to save beside ``model`` (None for models without one), after giving
    ``model`` the source's special token ids and generation config.

    ``tokenizer`` is the working model's, already loaded. A source whose vocabulary the merged
    embeddings cannot hold is refused: its token ids would index past them.
    """
    settings = config.export
    if settings.tokenizer_source != "base":
        ref = source_ref(config, settings.tokenizer_source)
        source = load_tokenizer(ref)
        if source is None:
            raise ConfigError(f"export.tokenizer_source: '{settings.tokenizer_source}' ({ref}) has no tokenizer saved beside it")
        _check_vocabulary(settings.tokenizer_source, source, model, tokenizer)
        tokenizer = source
        if not is_adapter(ref):  # an adapter shares its base's config and generation defaults
            _take_generation_settings(model, ref)
    if settings.chat_template is not None:
        if tokenizer is None:
            raise ConfigError("export.chat_template: the merged model has no tokenizer to carry a chat template")
        tokenizer.chat_template = chat_template(config, settings.chat_template)
    return tokenizer


def chat_template(config: RunConfig, value: str) -> str:
    """A Jinja template as written, or the chat template of the model ``value`` names."""
    if is_template(value):
        return value
    ref = source_ref(config, value)
    tokenizer = load_tokenizer(ref)
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):  # none, or several named ones: nothing single to copy
        raise ConfigError(f"export.chat_template: '{value}' ({ref}) has no chat template; name another model or write the template")
    return template


def _check_vocabulary(name: str, tokenizer, model: torch.nn.Module, merged) -> None:
    """The source must number its tokens as the merged model does (``merged``: the working
    tokenizer, the union when experts' vocabularies were aligned)."""
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(
            f"export.tokenizer_source: '{name}' has {len(tokenizer)} tokens but the merged model's embeddings"
            f" have {rows} rows; use a source whose vocabulary the merge has"
        )
    ids = merged.get_vocab() if merged is not None else None
    for token, i in tokenizer.get_vocab().items() if ids is not None else ():
        if ids.get(token) != i:
            where = "lacks it" if token not in ids else f"has it at id {ids[token]}"
            raise ConfigError(
                f"export.tokenizer_source: '{name}' gives token {token!r} id {i} but the merged model {where};"
                " export the merged vocabulary (tokenizer_source: base) and take the chat template with export.chat_template"
            )


def _take_generation_settings(model: torch.nn.Module, ref: str) -> None:
    """The source's special token ids in the model config, and its generation config."""
    from transformers import GenerationConfig

    source = load_config(ref)
    for key in SPECIAL_TOKEN_IDS:
        setattr(model.config, key, getattr(source, key, None))
    if (Path(ref) / "generation_config.json").is_file() or not Path(ref).is_dir():
        try:
            model.generation_config = GenerationConfig.from_pretrained(ref)
            return
        except OSError:  # a hub model without one
            pass
    model.generation_config = GenerationConfig.from_model_config(source)
