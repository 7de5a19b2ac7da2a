"""Vocabulary alignment: merging experts whose tokenizers add tokens to the base's.

Chat fine-tunes usually add a few tokens (and embedding rows) to their base. Their weights still
merge row by row once every model's vocabulary-indexed tensors (input embeddings, an untied
``lm_head``) are laid out over one shared vocabulary. The semantics are mergekit's
``tokenizer_source: union`` (``mergekit/tokenizer/build.py`` and ``embed.py``, read, not copied):

- the union keeps the reference tokenizer's ids (the base's, else the first expert's) and appends
  the tokens only experts have, plain vocabulary tokens first, then added tokens, each in the
  order of the experts and of their ids (as ``tokenizer.add_tokens`` numbers them);
- a row a model lacks is filled before the merge: from the one model that has it, else from the
  base when the base has it and the method merges the base, else with the mean of the models
  that have it (zero if none has it);
  the merge method then merges the filled rows like any other, so a token only one expert has
  keeps that expert's row under every method that returns its inputs when they agree;
- with ``models.vocabulary: base`` the union is the reference vocabulary alone (mergekit's
  ``tokenizer_source: base``): tokens only experts have are dropped.

A vocabulary token (not an added one) both the reference and an expert have must have the same id
in both: a renumbered vocabulary means another tokenizer, not an extension of the reference's.
Added tokens (chat markers two experts added in different orders) are matched by content.
Rows past a model's tokenizer (padding rows) are kept only where the union has an unnamed row at
the same index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from evomerge.errors import ModelMismatchError

if TYPE_CHECKING:
    from evomerge.merge.resident import ResidentTensor


class VocabularyMismatchError(ModelMismatchError):
    """An expert's vocabulary cannot be laid over the reference's: its tokenizer gives a shared
    token another id, or it has rows past the reference's and no tokenizer to place them."""


@dataclass(frozen=True)
class Vocabulary:
    """What each embedding row of one model stands for."""

    tokens: dict[str, int]
    """Token → id, for ids below ``rows`` (a tokenizer may name more ids than the model has rows)."""
    rows: int
    length: int
    """``len(tokenizer)``: where ``add_tokens`` numbers the next token."""
    added: frozenset[str] = frozenset()
    """Tokens the tokenizer holds as added tokens (special tokens, chat markers), not from its model."""
    settings: Mapping[str, object] = field(default_factory=dict)
    """Added token → its ``AddedToken`` (special, strip and normalisation flags), kept in the union."""


def vocabulary_of(tokenizer, rows: int) -> Vocabulary:
    """The vocabulary a tokenizer gives a model with ``rows`` embedding rows."""
    added = {info.content: info for i, info in tokenizer.added_tokens_decoder.items() if i < rows}
    tokens = {t: i for t, i in tokenizer.get_vocab().items() if i < rows}
    return Vocabulary(tokens, rows, len(tokenizer), frozenset(added), added)


@dataclass(frozen=True)
class VocabularyPlan:
    """How every model's vocabulary-indexed rows map onto the union's ``size`` rows.

    ``sources[m][u]`` is model ``m``'s row for union row ``u`` or −1 where it lacks it; models are
    the base (when the run has one) then the experts. ``fills[u]`` names the models whose rows
    are averaged into a row some model lacks (one model: its row; none: zeros).
    """

    size: int
    new_tokens: list[object]
    first_new_id: int
    sources: list[np.ndarray]
    fills: dict[int, tuple[int, ...]]

    def new_token_ids(self) -> dict[str, int]:
        return {_content(t): self.first_new_id + k for k, t in enumerate(self.new_tokens)}


def _content(token: object) -> str:
    return token if isinstance(token, str) else token.content  # type: ignore[attr-defined]


def plan_vocabulary(
    reference: Vocabulary,
    reference_label: str,
    experts: list[tuple[str, Vocabulary]],
    has_base: bool,
    base_merged: bool = True,
    union: bool = True,
) -> VocabularyPlan | None:
    """The alignment of ``experts`` onto ``reference`` (the working model's vocabulary), or None
    when every model already has the reference's rows. With ``has_base`` the reference is the base
    and counts as a model; otherwise it is the first expert's. ``base_merged`` says whether the
    merge method merges the base (task arithmetic does, linear does not): only then do its rows
    fill the rows experts lack, as in mergekit, whose linear merge leaves the base out.
    ``union=False`` keeps the reference vocabulary only."""
    for label, vocab in experts:
        for token, i in vocab.tokens.items():
            j = reference.tokens.get(token)
            if j is not None and j != i and token not in vocab.added and token not in reference.added:
                raise VocabularyMismatchError(
                    f"{label} gives token {token!r} id {i} but {reference_label} gives it id {j}: "
                    "their tokenizers number shared tokens differently; merge experts of one tokenizer family"
                )
    new_tokens: list[object] = []
    if union:
        seen = set(reference.tokens)
        for take_added in (False, True):  # plain vocabulary tokens first, then added tokens
            for _label, vocab in experts:
                for token, _i in sorted(vocab.tokens.items(), key=lambda item: item[1]):
                    if token not in seen and (token in vocab.added) == take_added:
                        seen.add(token)
                        new_tokens.append(vocab.settings.get(token, token))
    size = max(reference.rows, reference.length + len(new_tokens))
    union_ids = {**reference.tokens, **{_content(t): reference.length + k for k, t in enumerate(new_tokens)}}
    named = np.zeros(size, dtype=bool)
    named[[i for i in union_ids.values() if i < size]] = True
    models = ([reference] if has_base else []) + [v for _label, v in experts]
    sources = [_sources(vocab, union_ids, named, size) for vocab in models]
    identity = np.arange(size)
    if all(v.rows == size and np.array_equal(s, identity) for v, s in zip(models, sources)):
        return None
    lacking = np.flatnonzero((np.stack(sources) < 0).any(axis=0))
    base_fills = has_base and base_merged
    skip = 1 if has_base and not base_merged else 0  # a base the method leaves out gives no rows
    fills = {int(u): _fill_models([False] * skip + [int(s[u]) >= 0 for s in sources[skip:]], base_fills) for u in lacking}
    return VocabularyPlan(size, new_tokens, reference.length, sources, fills)


def _sources(vocab: Vocabulary, union_ids: Mapping[str, int], named: np.ndarray, size: int) -> np.ndarray:
    """One model's row for each union row: its token's id, or for an unnamed union row the
    model's own row at that index when it is unnamed there too."""
    source = np.full(size, -1, dtype=np.int64)
    for token, u in union_ids.items():
        i = vocab.tokens.get(token)
        if i is not None and u < size:
            source[u] = i
    own_named = np.zeros(vocab.rows, dtype=bool)
    own_named[list(vocab.tokens.values())] = True
    unnamed = np.flatnonzero(~named[: vocab.rows] & ~own_named[:size])
    source[unnamed] = unnamed
    return source


def _fill_models(present: list[bool], base_fills: bool) -> tuple[int, ...]:
    """The models whose rows make a row others lack (mergekit's order of rules)."""
    having = tuple(m for m, p in enumerate(present) if p)
    if len(having) <= 1:
        return having
    if base_fills and present[0]:
        return (0,)
    return having


def vocabulary_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters indexed by token id along dim 0 (input embeddings, an untied
    output projection), or none for models without token embeddings."""
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model / one with no token embeddings
        return []
    weights = [m.weight for m in (inputs, outputs) if m is not None and getattr(m, "weight", None) is not None]
    return [name for name, p in model.named_parameters() if any(p is w for w in weights)]


class VocabularyAlignment:
    """Applies a :class:`VocabularyPlan` while the models stream in one at a time.

    Each model's vocabulary tensors are gathered onto the union rows as it passes (rows it lacks
    stay zero); the rows that fills need are summed on the way, so no model is read twice. Once
    the resident stacks are built, :meth:`fill_` writes the filled rows into them.
    """

    def __init__(self, plan: VocabularyPlan, names: list[str], has_base: bool) -> None:
        self.plan = plan
        self.names = names
        self.has_base = has_base
        self._rows = torch.tensor(sorted(plan.fills), dtype=torch.long)
        self._sums: dict[str, torch.Tensor] = {}
        rows = self._rows.tolist()
        self._contributes = [
            torch.tensor([model in plan.fills[u] for u in rows], dtype=torch.float32) for model in range(len(plan.sources))
        ]
        """Per model, 1 for each filled row its own row goes into."""

    def align(self, model: int, state: Mapping[str, torch.Tensor], record: bool = True) -> dict[str, torch.Tensor]:
        """``state`` with its vocabulary tensors laid out over the union; ``model`` indexes
        ``plan.sources``. ``record=False`` for the working model of a run without base, which
        streams again as the first expert."""
        source = torch.from_numpy(self.plan.sources[model])
        aligned = dict(state)
        for name in self.names:
            tensor = state[name]
            out = tensor.new_zeros((self.plan.size, *tensor.shape[1:]))
            have = (source >= 0).nonzero().squeeze(1)
            out[have] = tensor[source[have].to(tensor.device)]
            aligned[name] = out
            if record:
                self._record(model, name, out)
        return aligned

    def _record(self, model: int, name: str, aligned: torch.Tensor) -> None:
        sums = self._sums.get(name)
        if sums is None:
            sums = self._sums[name] = torch.zeros(
                (len(self._rows), *aligned.shape[1:]), dtype=torch.promote_types(aligned.dtype, torch.float32)
            )
        rows = aligned[self._rows.to(aligned.device)].to(device=sums.device, dtype=sums.dtype)
        sums += _rows_mask(self._contributes[model], rows).to(sums.dtype) * rows

    def fill_values(self, name: str) -> torch.Tensor:
        """The filled rows of ``name`` (one per row in ``plan.fills``, in row order)."""
        counts = torch.tensor([max(1, len(self.plan.fills[u])) for u in self._rows.tolist()], dtype=torch.float32)
        sums = self._sums[name]
        return sums / counts.view(-1, *[1] * (sums.dim() - 1))

    @torch.no_grad()
    def fill_(self, tensors: Mapping[str, ResidentTensor]) -> None:
        """Write the filled rows into the resident stacks: the base's row where it lacked one and
        each expert's row where it lacked one (as task vectors when there is a base)."""
        if not len(self._rows):
            return
        offset = 1 if self.has_base else 0
        rows = self._rows
        for name in self.names:
            resident = tensors[name]
            device, dtype = resident.stack.device, resident.stack.dtype
            values = self.fill_values(name).to(device=device, dtype=dtype)
            at = rows.to(device)
            reference = resident.reference
            if reference is not None:
                base_lacks = torch.from_numpy(self.plan.sources[0][rows.numpy()] < 0).to(device)
                new_reference = torch.where(_rows_mask(base_lacks, values), values, reference[at])
                for e in range(resident.n_models):
                    lacks = torch.from_numpy(self.plan.sources[offset + e][rows.numpy()] < 0).to(device)
                    # the stack held (expert row − 0) where the base lacked the row; rows it lacks get the fill
                    vector = torch.where(_rows_mask(base_lacks, values), resident.stack[e][at] - values, resident.stack[e][at])
                    vector = torch.where(_rows_mask(lacks, values), values - new_reference, vector)
                    resident.stack[e][at] = vector
                reference[at] = new_reference
            else:
                for e in range(resident.n_models):
                    lacks = torch.from_numpy(self.plan.sources[e][rows.numpy()] < 0).to(device)
                    resident.stack[e][at] = torch.where(_rows_mask(lacks, values), values, resident.stack[e][at])

    def extend_tokenizer(self, tokenizer) -> None:
        """Add the union's new tokens to the working model's tokenizer, one at a time as mergekit
        does, and check they got the planned ids."""
        for token in self.plan.new_tokens:
            tokenizer.add_tokens(token)
        for content, planned in self.plan.new_token_ids().items():
            got = tokenizer.convert_tokens_to_ids(content)
            if got != planned:
                raise RuntimeError(f"token {content!r} got id {got} in the union tokenizer, planned {planned}")


def _rows_mask(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return rows.view(-1, *[1] * (like.dim() - 1))


def align_working_model(model: torch.nn.Module, alignment: VocabularyAlignment, record: bool) -> None:
    """Resize ``model`` (the reference, model 0 of the plan's sources when it counts) to the
    union and lay its vocabulary rows out over it; rows it lacks stay zero until filled."""
    params = dict(model.named_parameters())
    aligned = alignment.align(0, {n: params[n].data for n in alignment.names}, record=record)
    rows = params[alignment.names[0]].shape[0]
    if alignment.plan.size != rows:
        model.resize_token_embeddings(alignment.plan.size, mean_resizing=False)
        params = dict(model.named_parameters())
    with torch.no_grad():
        for name in alignment.names:
            params[name].data.copy_(aligned[name])


def vocabulary_alignment(
    model: torch.nn.Module,
    tokenizer,
    experts: list[tuple[str, str, bool]],
    has_base: bool,
    base_merged: bool,
    union: bool = True,
) -> VocabularyAlignment | None:
    """The alignment of ``experts`` (``(label, ref, is_adapter)``) onto the working ``model`` and
    its ``tokenizer``, or None when they share its vocabulary. Expert rows are read from their
    configs; an expert without a tokenizer (or a LoRA adapter) is taken to use the working one's,
    unless it has more rows than the working model: those may be tokens its fine-tune added, which
    only its tokenizer can place, so it is refused rather than merged without them."""
    from evomerge.models.loading import load_tokenizer, parameter_shapes

    names = vocabulary_parameters(model)
    if not names or tokenizer is None:
        return None
    rows = dict(model.named_parameters())[names[0]].shape[0]
    reference = vocabulary_of(tokenizer, rows)
    reference_label = "the base model" if has_base else experts[0][0]
    vocabularies = []
    for label, ref, adapter in experts:
        if adapter:
            vocabularies.append((label, vocabulary_of(tokenizer, rows)))
            continue
        shapes = parameter_shapes(ref)
        if names[0] not in shapes:
            raise ModelMismatchError(
                f"{label} has no {names[0]}: it is not a model of {reference_label}'s architecture ({type(model).__name__})"
            )
        expert_rows = shapes[names[0]][0]
        own = load_tokenizer(ref)
        if own is None and expert_rows > rows:
            raise VocabularyMismatchError(
                f"{label} has {expert_rows} vocabulary rows ({names[0]}) but no tokenizer beside it, and {reference_label}"
                f" has {rows}: save the expert's tokenizer in '{ref}' so its extra rows can be aligned"
            )
        vocabularies.append((label, vocabulary_of(own if own is not None else tokenizer, expert_rows)))
    plan = plan_vocabulary(reference, reference_label, vocabularies, has_base, base_merged, union)
    return None if plan is None else VocabularyAlignment(plan, names, has_base)
