"""Sparse checkpoints: reading masks from a checkpoint folder, and the compact (values + bitmask) format.

A sparse model saved with ``save_pretrained`` already holds everything: every sparse module's
``<module>.weight`` (zero at masked positions) and its ``<module>.weight_mask`` (a bool buffer shaped like
the weight) are stored in ``model.safetensors``. That file costs the dense weights plus one byte per link
position for the mask. The **compact format** stores only what is needed to rebuild both exactly.

Compact format (``hf_chts.compact``, format version 1)
------------------------------------------------------
A folder with

- ``config.json`` (and ``generation_config.json``, tokenizer files when given), exactly as
  ``save_pretrained`` writes them, so ``AutoConfig`` recognises the model;
- ``model.compact.safetensors``, a safetensors file whose header metadata holds
  ``{"format": "hf_chts.compact", "format_version": "1", "tied": "<json {alias: source}>",
  "checksums": "<json {tensor name: crc32 of its bytes}>"}`` (files written before checksums have none and
  load unchecked), and whose tensors are:

  - for every sparse weight ``W`` named ``<module>.weight`` (a module carrying a ``weight_mask`` buffer),
    with the mask ``M`` of the same 2-D shape ``(rows, cols)`` as stored in the state dict:

    - ``<module>.weight.values``: 1-D, ``W``'s dtype, the ``nnz(M)`` values at ``M == 1`` in row-major
      (C) order, i.e. ``W[M]``. A kept link whose value happens to be 0.0 is stored (the mask, not the
      value, says which links exist);
    - ``<module>.weight.bitmask``: ``uint8`` of shape ``(rows, ceil(cols / 8))``; column ``j`` of a row is
      bit ``j % 8`` (least significant first) of byte ``j // 8``, padding bits are 0. This is
      ``numpy.packbits(M, axis=-1, bitorder="little")``, the layout compressed-tensors used for its
      legacy ``sparse-bitmask`` format;
    - ``<module>.weight.shape``: ``int64`` ``[rows, cols]``.

  - every other state-dict tensor (embeddings, norms, ``lm_head``, dense layers, other buffers) unchanged
    under its own name. Tensors that share storage (tied embeddings) are stored once; the metadata entry
    ``tied`` maps each dropped name to the stored one.

Reloading rebuilds ``W = zeros(shape); W[M] = values`` and ``weight_mask = M``: bit-exact weights and
masks. With ``d`` the density and ``b`` the bytes per value, a sparse layer costs ``d * b + 1/8`` bytes per
position instead of ``b + 1`` (dense weight + bool mask): at d = 0.3 in fp32 that is 27% of the
``save_pretrained`` size, 36% of a plain dense export in bf16.

Not compressed-tensors: release 0.20 no longer registers its legacy ``sparse-bitmask`` compressor and writes
an empty ``sparsity_config``, so no checkpoint in that format can be written or read through its API.

Example:
    >>> from hf_chts.compact import save_compact, load_compact
    >>> save_compact(model, "out/compact")          # doctest: +SKIP
    >>> model2 = load_compact("out/compact")         # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpointing import replace_atomic, tensor_checksum, write_atomic

# re-exported: dense export, the folder helpers (weights_io) and the statistics (stats) live elsewhere
from .dense_export import save_dense, to_dense_model
from .masking import (
    MASK_NAME,
    has_mask,
    is_masked,
    keep_masks_out_of_ddp_,
    layer_mask,
    make_masked_,
)
from .stats import layer_sort_key, mask_statistics, mlp_active_neurons, summarize_by_layer_type
from .weights_io import (
    MASK_SUFFIX,
    check_safetensors_file,
    folder_size,
    is_transposed_config,
    masks_in_files,
    read_config,
    read_file,
    read_tensor,
    tensor_files,
    weight_files,
)

COMPACT_FILE = "model.compact.safetensors"
FORMAT_NAME = "hf_chts.compact"
FORMAT_VERSION = "1"
_VALUES, _BITMASK, _SHAPE = ".values", ".bitmask", ".shape"

__all__ = [
    "COMPACT_FILE",
    "pack_mask",
    "unpack_mask",
    "save_compact",
    "load_compact",
    "is_compact",
    "load_sparse_model",
    "check_masked_weights_zero",
    "zero_masked_weights",
    "read_masks",
    "read_config",
    "is_transposed_config",
    "mask_statistics",
    "summarize_by_layer_type",
    "mlp_active_neurons",
    "layer_sort_key",
    "to_dense_model",
    "save_dense",
    "folder_size",
]


# ---------------------------------------------------------------------------------------------- bit packing
def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a 2-D bool mask ``(rows, cols)`` into ``uint8`` ``(rows, ceil(cols / 8))``, little bit order."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(
            f"pack_mask expects a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}."
        )
    packed = np.packbits(mask.detach().cpu().numpy(), axis=-1, bitorder="little")
    return torch.from_numpy(packed)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, int] | list[int] | torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``uint8 (rows, ceil(cols / 8))`` -> bool ``(rows, cols)``."""
    rows, cols = (int(s) for s in (shape.tolist() if isinstance(shape, torch.Tensor) else shape))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, (cols + 7) // 8):
        raise ValueError(
            f"A bitmask for shape ({rows}, {cols}) must be uint8 of shape ({rows}, {(cols + 7) // 8}), got "
            f"{packed.dtype} of shape {tuple(packed.shape)}; the file is corrupt or not hf_chts.compact."
        )
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


# ---------------------------------------------------------------------------------------------- save / load
def _sparse_weight_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names ``<module>.weight`` of every weight that has a ``<module>.weight_mask`` beside it."""
    names = []
    for key in state:
        if key.endswith(MASK_SUFFIX):
            weight = key[: -len(MASK_SUFFIX)] + ".weight"
            if weight not in state:
                raise ValueError(f"Found mask {key!r} but no weight {weight!r} in the state dict.")
            names.append(weight)
    return names


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def save_compact(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` to ``folder`` in the compact format (see the module docstring).

    Args:
        model (`PreTrainedModel`): a model whose sparse modules carry ``weight_mask`` buffers (any module
            without one is stored dense). Masked weights must be exactly 0.0, as the masking contract
            guarantees after every optimizer step.
        folder (`str` or `os.PathLike`): output folder, created if needed.
        tokenizer (optional): saved beside the weights with its own ``save_pretrained``.

    Returns:
        `Path`: the path of the written ``model.compact.safetensors``.

    Raises:
        ValueError: when the model has no ``weight_mask`` buffer, or a masked weight is not zero.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    state = model.state_dict()
    sparse = _sparse_weight_names(state)
    if not sparse:
        raise ValueError(
            "The model has no `weight_mask` buffers, so there is nothing to compact. Sparsify it first "
            "(hf_chts.sparsify_) or save it with save_pretrained."
        )
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    sparse_set = set(sparse)
    masks_of = {w[: -len(".weight")] + MASK_SUFFIX for w in sparse}
    for key, tensor in state.items():
        if key in masks_of:
            continue  # stored as the bitmask of its weight
        skey = _storage_key(tensor)
        if skey in seen:
            tied[key] = seen[skey]
            continue
        seen[skey] = key
        if key in sparse_set:
            mask = state[key[: -len(".weight")] + MASK_SUFFIX]
            if mask.dtype != torch.bool or mask.shape != tensor.shape or tensor.dim() != 2:
                raise ValueError(
                    f"{key}: expected a 2-D weight with a bool mask of the same shape, got weight "
                    f"{tuple(tensor.shape)} and mask {mask.dtype} {tuple(mask.shape)}."
                )
            leaked = int(((tensor != 0) & ~mask).sum())
            if leaked:
                raise ValueError(
                    f"{key} has {leaked} non-zero values at masked positions, so a compact checkpoint "
                    "would not reload it exactly. Zero them first (hf_chts.masking.apply_masks_)."
                )
            tensors[key + _VALUES] = tensor.detach()[mask].cpu().contiguous()
            tensors[key + _BITMASK] = pack_mask(mask)
            tensors[key + _SHAPE] = torch.tensor(list(tensor.shape), dtype=torch.int64)
        else:
            tensors[key] = tensor.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    path = folder / COMPACT_FILE
    checksums = {key: tensor_checksum(t) for key, t in sorted(tensors.items())}
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tied": json.dumps(tied)}
    metadata["checksums"] = json.dumps(checksums)
    save_file(tensors, str(path) + ".tmp", metadata=metadata)  # a crash leaves the previous file, or none
    replace_atomic(str(path) + ".tmp", str(path))
    return path


def is_compact(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds an hf_chts compact checkpoint."""
    return (Path(folder) / COMPACT_FILE).is_file()


def _read_compact_metadata(path: Path) -> dict[str, str]:
    header = check_safetensors_file(
        str(path), fix="Export the checkpoint again (save_compact / hf-chts export)."
    )
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an hf_chts compact checkpoint (metadata {metadata!r}).")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has compact format version {metadata.get('format_version')!r}; this hf_chts reads "
            f"version {FORMAT_VERSION}. Upgrade hf_chts."
        )
    return metadata


def _checked(handle: Any, key: str, checksums: Mapping[str, str], path: Path) -> torch.Tensor:
    """Tensor ``key`` of an open compact file, refused when its bytes differ from the recorded checksum."""
    tensor = handle.get_tensor(key)
    if key in checksums and tensor_checksum(tensor) != checksums[key]:
        raise ValueError(
            f"{path}: tensor {key!r} has other content than the checksum recorded when the file was written "
            "(damaged, or tensors swapped or edited). Export the checkpoint again (save_compact / hf-chts "
            "export) from the trained model."
        )
    return tensor


def _checksums(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    try:
        checksums = json.loads(metadata.get("checksums", "{}"))
    except json.JSONDecodeError:
        checksums = None
    if not isinstance(checksums, dict):
        raise ValueError(f"{path}: the `checksums` metadata is not a JSON object; the file is corrupt.")
    return checksums


def _attach_masks_(model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Copy ``masks`` ({module name: mask}) into ``weight_mask`` buffers, creating the missing ones."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"The checkpoint has a mask for {name!r} but the model has no such layer.")
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise ValueError(
                f"Mask of {name!r} has shape {tuple(mask.shape)}, its weight {tuple(module.weight.shape)}."
            )
        mask = mask.to(device=module.weight.device, dtype=torch.bool)
        if not has_mask(module) or layer_mask(module).is_meta:
            module.register_buffer(MASK_NAME, mask.clone(), persistent=True)
        else:
            layer_mask(module).copy_(mask)
        if not is_masked(module):  # the masked forward and gradient (nn.Linear, Conv1D)
            make_masked_(module, name=name)
    keep_masks_out_of_ddp_(model)


def load_compact(
    folder: str | os.PathLike,
    *,
    model_class: Any = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """Rebuild the model saved by :func:`save_compact`, with identical weights and masks.

    Args:
        folder (`str` or `os.PathLike`): the compact checkpoint folder.
        model_class (optional): class with ``from_config``; default ``AutoModelForCausalLM`` (``sparse_llama``
            is registered when ``hf_chts.modeling`` is importable).
        device (`str` or `torch.device`, defaults to ``"cpu"``): where the tensors go.

    Returns:
        the model in eval mode; modules that were sparse carry their ``weight_mask`` buffers (created when
        the model class has none, e.g. a plain ``LlamaForCausalLM``).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    path = folder / COMPACT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No {COMPACT_FILE} in {folder}; write one with save_compact / hf-chts export."
        )
    metadata = _read_compact_metadata(path)
    tied, sums = _parse_tied(metadata.get("tied", "{}"), path), _checksums(metadata, path)
    config = AutoConfig.from_pretrained(folder)
    model_class = model_class or model_class_for(config)

    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for key in sorted(keys):
            if key.endswith(_VALUES):
                weight = key[: -len(_VALUES)]
                missing = [weight + s for s in (_BITMASK, _SHAPE) if weight + s not in keys]
                if missing:
                    raise ValueError(f"Compact checkpoint {path} lacks {missing}.")
                shape = _checked_shape(_checked(handle, weight + _SHAPE, sums, path), weight, path)
                mask = unpack_mask(_checked(handle, weight + _BITMASK, sums, path), shape)
                values = _checked(handle, key, sums, path)
                if values.dim() != 1 or values.numel() != int(mask.sum()):
                    raise ValueError(
                        f"{path}: {key} must be 1-D with one value per kept link ({int(mask.sum())}), got "
                        f"shape {tuple(values.shape)}; the file is corrupt. Export it again (hf-chts export)."
                    )
                dense = torch.zeros(mask.shape, dtype=values.dtype)
                dense[mask] = values
                state[weight] = dense
                masks[weight[: -len(".weight")]] = mask
                state[weight[: -len(".weight")] + MASK_SUFFIX] = mask
            elif not key.endswith((_BITMASK, _SHAPE)):
                state[key] = _checked(handle, key, sums, path)
    for alias, source in tied.items():
        if source not in state:
            raise ValueError(
                f"{path}: the `tied` metadata maps {alias!r} to {source!r}, which the file does not "
                "hold; the file is corrupt. Export it again with save_compact / hf-chts export."
            )
        state[alias] = state[source]
    return _from_state(model_class, config, state, masks, path).to(device).eval()


def model_class_for(config: Any, mapping: Any = None) -> type:
    """The class ``mapping`` (default ``MODEL_FOR_CAUSAL_LM_MAPPING``) registers for ``config``."""
    if mapping is None:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING as mapping
    try:
        return mapping[type(config)]
    except KeyError as err:
        raise ValueError(
            f"No model class of this kind is registered for model_type {config.model_type!r}; pass "
            "`model_class=` (or use the Auto class of the model's head)."
        ) from err


def _from_state(model_class, config, state, masks, path, dtype=None) -> torch.nn.Module:
    """The class's own loader over ``state``, then the masks: a class with mask buffers of its own
    (``sparse_modules``) loads them itself; for any other they stay out of the load (no UNEXPECTED report)."""
    if not hasattr(model_class, "sparse_modules"):
        state = {k: v for k, v in state.items() if not k.endswith(MASK_SUFFIX)}
    dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)
    # meta-device construction, tied weights, the class's own checks
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    _refuse_incomplete_load(info, path)
    _attach_masks_(model, masks)
    return model


def _parse_tied(text: str, path: Path) -> dict[str, str]:
    try:
        tied = json.loads(text)
    except json.JSONDecodeError as err:
        tied = err
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise ValueError(
            f"{path}: the `tied` metadata must be a JSON object {{alias: stored name}}, got {text!r}; the "
            "file is corrupt. Export it again with save_compact / hf-chts export."
        )
    return tied


def _checked_shape(shape: torch.Tensor, weight: str, path: Path) -> list[int]:
    values = shape.tolist() if shape.dtype == torch.int64 and shape.dim() == 1 else None
    if values is None or len(values) != 2 or min(values) <= 0:
        raise ValueError(
            f"{path}: {weight + _SHAPE} must be int64 [rows, cols] with positive sizes, got {shape.dtype} "
            f"{shape.tolist()}; the file is corrupt. Export it again with save_compact / hf-chts export."
        )
    return values


def _refuse_incomplete_load(info: Mapping[str, Any], path: Path | str) -> None:
    """Refuse a load that left model tensors at their random init or ignored tensors of the file."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith(MASK_SUFFIX))
    extra = sorted(k for k in info.get("unexpected_keys", ()) if not k.endswith(MASK_SUFFIX))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or extra or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors the model needs ({', '.join(missing[:4])})")
        if extra:
            parts.append(f"{len(extra)} tensors the model does not have ({', '.join(extra[:4])})")
        if mismatched:
            parts.append(f"{len(mismatched)} tensors of the wrong shape ({', '.join(mismatched[:4])})")
        raise ValueError(
            f"{path} does not match its config.json: {'; '.join(parts)}. Loading it would leave layers at "
            "their random initialisation. Export the checkpoint again from the trained model, or fix "
            "config.json to the architecture the file was written for."
        )


def load_sparse_model(
    folder: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model_class: Any = None,
) -> torch.nn.Module:
    """Load a sparse checkpoint folder of any architecture, compact or ``save_pretrained``, masks included.

    Layers with a mask in the file come back masked, quietly (no UNEXPECTED report). ``model_class``: default
    the causal-LM class of the model type; the public entry points are :mod:`hf_chts.auto`'s Auto classes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    if is_compact(folder):
        model = load_compact(folder, device=device, model_class=model_class)
        return model.to(dtype) if dtype is not None else model
    from transformers import AutoConfig

    files = _safetensors_files(folder)
    for file in files:
        check_safetensors_file(file, fix="Save the model again, or use another checkpoint.")
    masks = read_masks(folder)
    check_masked_weights_zero(folder, masks)
    config = AutoConfig.from_pretrained(folder)
    model_class = model_class or model_class_for(config)
    if hasattr(model_class, "sparse_modules"):  # loads its masks itself, with its own checks
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
        _refuse_incomplete_load(info, files[0] if len(files) == 1 else folder)
        _attach_masks_(model, masks)
    else:
        state = {}
        for file in files:
            state.update(read_file(file)[0])
        model = _from_state(model_class, config, state, masks, files[0] if len(files) == 1 else folder, dtype)
    return model.to(device).eval()


def check_masked_weights_zero(
    folder: str | os.PathLike, masks: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Refuse a ``save_pretrained`` folder whose weights are non-zero where their ``weight_mask`` is False.

    A sparse model keeps masked weights at exactly 0.0, so every loader computes the same logits: the
    sparse class (which multiplies by the mask) and a plain ``LlamaForCausalLM`` (which ignores the mask
    keys). A file breaking that was edited or written outside the masking contract; loading it would make
    the two disagree.

    Raises:
        ValueError: naming the file, the layer, the count and the fix.
    """
    folder = Path(folder)
    masks = read_masks(folder) if masks is None else masks
    if not masks:
        return
    location = tensor_files(_safetensors_files(folder), suffix=".weight")
    bad = []
    for name, mask in masks.items():
        file = location.get(name + ".weight")
        if file is None:
            continue
        weight = read_tensor(file, name + ".weight")
        if weight.shape == mask.shape:
            leaked = int(((weight != 0) & ~mask).sum())
            if leaked:
                bad.append((name, leaked, file))
    if bad:
        name, leaked, file = bad[0]
        raise ValueError(
            f"{file}: {leaked} weights of {name} are non-zero where its weight_mask removes the link "
            f"({len(bad)} layers in all). A plain LlamaForCausalLM would load them as they are and compute "
            "other logits than the sparse model. The file was edited or written outside the masking "
            f"contract; if the masks are right, zero those weights with "
            f"hf_chts.compact.zero_masked_weights({str(folder)!r}) and load again."
        )


def zero_masked_weights(folder: str | os.PathLike) -> int:
    """Rewrite a ``save_pretrained`` folder's weights with 0.0 wherever their mask is False; return the count.

    The repair for a folder that :func:`check_masked_weights_zero` refuses, when its masks are the ones to
    keep. Each file is rewritten atomically (temporary name, fsync, rename) with its metadata.
    """
    from safetensors.torch import save as safetensors_bytes

    folder = Path(folder)
    masks = read_masks(folder)
    zeroed = 0
    for file in _safetensors_files(folder):
        tensors, metadata = read_file(file)
        changed = False
        for name, mask in masks.items():
            weight = tensors.get(name + ".weight")
            if weight is not None and weight.shape == mask.shape:
                leaked = int(((weight != 0) & ~mask).sum())
                if leaked:
                    tensors[name + ".weight"] = weight.masked_fill(~mask, 0.0)
                    zeroed += leaked
                    changed = True
        if changed:
            write_atomic(str(file), safetensors_bytes(tensors, metadata=metadata))
    return zeroed


# ---------------------------------------------------------------------------------------------- reading files
def _safetensors_files(folder: Path) -> list[str]:
    """The folder's weight files (:func:`hf_chts.weights_io.weight_files`); refuses a folder without any."""
    files = weight_files(folder, fix="Save the model again.")
    if files:
        return files
    raise FileNotFoundError(
        f"No model.safetensors, model.safetensors.index.json or {COMPACT_FILE} in {folder}; "
        "pass a folder written by save_pretrained or hf-chts export."
    )


def read_masks(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every mask of a checkpoint folder without building the model.

    Returns:
        `dict[str, torch.Tensor]`: ``{module name: bool mask}`` shaped like the stored weight, for both the
        ``save_pretrained`` (``*.weight_mask`` tensors) and the compact (bitmask) format. Empty when the
        checkpoint is dense.
    """
    from safetensors import safe_open

    folder = Path(folder)
    masks: dict[str, torch.Tensor] = {}
    fix = "Save or export the checkpoint again, or use another one."
    if is_compact(folder):
        path = folder / COMPACT_FILE
        sums = _checksums(_read_compact_metadata(path), path)
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(_BITMASK):
                    weight = key[: -len(_BITMASK)]
                    if weight + _SHAPE not in handle.keys():
                        raise ValueError(f"{path} lacks {weight + _SHAPE}; the file is corrupt. {fix}")
                    shape = _checked_shape(_checked(handle, weight + _SHAPE, sums, path), weight, path)
                    masks[weight[: -len(".weight")]] = unpack_mask(_checked(handle, key, sums, path), shape)
        return dict(sorted(masks.items(), key=lambda kv: layer_sort_key(kv[0])))
    for name, mask in masks_in_files(_safetensors_files(folder), fix=fix).items():
        masks[name] = mask.to(torch.bool)
    return dict(sorted(masks.items(), key=lambda kv: layer_sort_key(kv[0])))
