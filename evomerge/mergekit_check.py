"""Whether the installed mergekit can rebuild an export from its ``mergekit.yaml``.

:mod:`evomerge.mergekit_recipe` writes what mergekit's schema means; whether mergekit reads the
models depends on its table of architectures. mergekit plans a merge from a definition per
architecture (the tensors before, in and after each layer) and loads each tensor by that
definition's name, its aliases or the names it is tied to. A definition may name tensors a
checkpoint does not store (GPT-NeoX's ``attention.bias`` buffers, which transformers no longer
saves; Falcon's ``lm_head.weight``, tied to the embeddings and not stored) or leave out tensors it
does (then its output lacks them); it may fail to read a config (Qwen2-VL's layer count lives in
``text_config`` in transformers 5); and an architecture it has no definition of is guessed from
the model, which this check cannot vouch for. Each is a reason the export does not write a YAML.

mergekit (LGPL, optional) is imported here only, and only to read its architecture definitions:
no merge runs. Without mergekit installed the check cannot be made (:class:`MergekitMissing`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from evomerge.errors import first_line


class MergekitMissing(RuntimeError):
    """mergekit is not installed here, so its architecture definitions cannot be read."""


@contextmanager
def _quiet_mergekit() -> Iterator[None]:
    """mergekit logs a warning for each architecture it has no definition of: the export says it once."""
    logger = logging.getLogger("mergekit")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def model_references(document: dict[str, Any]) -> list[str]:
    """The models a mergekit configuration reads, base first; an adapter's ``BASE+ADAPTER`` as its
    base (mergekit merges the adapter into it first, so it reads the base's tensors)."""
    refs = [document["base_model"]] if "base_model" in document else []
    refs += [m["model"] for m in document.get("models", [])]
    refs += [s["model"] for piece in document.get("slices", []) for s in piece["sources"]]
    return list(dict.fromkeys(ref.split("+", 1)[0] for ref in refs))


def rebuild_problem(document: dict[str, Any], export_dir: Path) -> str | None:
    """Why the installed mergekit would not rebuild the model saved in ``export_dir`` from
    ``document``, or None where its definitions read every model and write every tensor the export
    has. Raises :class:`MergekitMissing` when mergekit is not installed."""
    try:
        from mergekit.architecture import arch_info_for_config
    except ImportError:
        raise MergekitMissing("mergekit is not installed here") from None
    from evomerge.models.checkpoint import tensor_dtypes
    from evomerge.models.loading import load_config

    try:  # mergekit builds a tensor transformers 5 fuses (MoE experts) from the checkpoint's parts
        from mergekit.architecture.conversion import can_convert_checkpoint_keys as converts
    except ImportError:
        converts = _no_conversion

    with _quiet_mergekit():
        found = {}
        for ref in [*model_references(document), str(export_dir)]:
            config = load_config(ref)
            name = (config.architectures or [type(config).__name__])[0]
            try:
                found[ref] = (config, arch_info_for_config(config), name)
            except Exception as exc:  # noqa: BLE001 — any failure of mergekit's own reading
                return f"mergekit cannot read the {name} config: {first_line(exc)}"
        config, arch, name = found.pop(str(export_dir))
        if arch is None:
            return f"mergekit {_version()} has no definition of the {name} architecture (it would guess one from the model)"
        if "slices" in document and len(arch.modules) != 1:
            return f"mergekit's {name} definition has several modules, and a passthrough of slices takes one"
        stored_by_ref = {}
        for ref, (ref_config, ref_arch, ref_name) in found.items():
            if ref_arch is None or ref_arch != arch:
                return f"mergekit reads '{ref}' as {ref_name}, another architecture than the export's {name}"
            stored = set(tensor_dtypes(ref))
            try:
                weights = arch.all_weights(ref_config)
            except Exception as exc:  # noqa: BLE001
                return f"mergekit cannot read the {name} config of '{ref}': {first_line(exc)}"
            for weight in weights:
                if weight.optional or stored & {weight.name, *(weight.aliases or ()), *(weight.tied_names or ())}:
                    continue
                if not any(converts(ref_config.model_type, stored, target) for target in (weight.name, *(weight.aliases or ()))):
                    return f"mergekit's {name} definition needs the tensor '{weight.name}', which '{ref}' does not store"
            stored_by_ref[ref] = stored
        try:
            weights = arch.all_weights(config)
        except Exception as exc:  # noqa: BLE001
            return f"mergekit cannot read the {name} config: {first_line(exc)}"
    # mergekit writes a weight under its own name, an optional one only where some model stores it
    written_by_mergekit = [
        w.name for w in weights
        if not w.optional or any(stored & {w.name, *(w.aliases or ())} for stored in stored_by_ref.values())
    ]
    filters = _filters(document)
    unmatched = [w for w in written_by_mergekit if filters and not any(f in w for f in filters)]
    if unmatched:
        return f"mergekit's {name} definition names the tensor '{unmatched[0]}', which no filter of the YAML matches"
    ours = _parameters(export_dir, list(tensor_dtypes(str(export_dir))))
    missing = sorted(ours - _parameters(export_dir, written_by_mergekit))
    if missing:
        return f"mergekit's {name} definition leaves out the tensor '{missing[0]}', so its merge would lack it"
    return None


def _filters(document: dict[str, Any]) -> set[str]:
    """The filters of the YAML's conditional parameters (values that vary across the model)."""
    settings = [*document.get("parameters", {}).values()]
    settings += [v for m in document.get("models", []) for v in m.get("parameters", {}).values()]
    return {entry["filter"] for value in settings if isinstance(value, list) for entry in value}


def _no_conversion(model_type: str | None, stored: set[str], target: str) -> bool:
    return False


def _parameters(export_dir: Path, stored: list[str]) -> set[str]:
    """The parameters ``from_pretrained`` loads tensors of these names into (renamed, or converted:
    Mixtral's stored ``experts.0.w1.weight`` is part of ``mlp.experts.gate_up_proj``)."""
    from evomerge.models.loading import loaded_names

    return {parameter for parameter in loaded_names(str(export_dir), stored, converted=True).values() if parameter is not None}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mergekit")
    except PackageNotFoundError:
        return ""
