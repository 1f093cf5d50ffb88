"""Masks and weights read from a checkpoint's model files: the one reader of ``save_pretrained`` weights.

A model saved with ``save_pretrained`` keeps its weights, and each sparse layer its ``<layer>.weight_mask``
(docs/DESIGN.md, "Masks"), in ``model.safetensors`` or in the shards a ``model.safetensors.index.json``
lists. Every part of the package that reads them goes through this module: the model's load-time checks
(:mod:`hf_chts.modeling`), resume (:mod:`hf_chts.checkpointing`), and ``hf-chts inspect``, export and the
model card (through :func:`hf_chts.compact.read_masks`). What it promises them:

- files are checked whole before a tensor is read (:func:`check_safetensors_file`), and errors name the file
  and the fix;
- reading is lazy: :func:`mask_specs` reads headers only, :class:`FileMasks` reads one mask when it is
  accessed (the masks of a 7B model take gigabytes).

The module imports nothing from ``hf_chts``. The compact format (``model.compact.safetensors``) is
:mod:`hf_chts.compact`'s own and is decoded there.

Example:

```python
>>> from hf_chts.weights_io import masks_in_files, weight_files
>>> masks = masks_in_files(weight_files("out/checkpoint-100"))  # doctest: +SKIP
>>> masks["model.layers.0.self_attn.q_proj"].dtype  # read now, one tensor  # doctest: +SKIP
torch.bool
```
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TRANSPOSED_MODEL_TYPES",
    "folder_size",
    "is_transposed_config",
    "read_config",
    "INDEX_FILE",
    "MASK_SUFFIX",
    "WEIGHTS_FILE",
    "FileMasks",
    "check_safetensors_file",
    "mask_specs",
    "masks_in_files",
    "read_file",
    "read_tensor",
    "tensor_files",
    "weight_files",
]

MASK_SUFFIX = ".weight_mask"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_FILE = "adapter_model.safetensors"

# safetensors dtype names -> torch names, for error messages.
_SAFETENSORS_DTYPES = {
    "BOOL": "torch.bool",
    "U8": "torch.uint8",
    "I8": "torch.int8",
    "I16": "torch.int16",
    "I32": "torch.int32",
    "I64": "torch.int64",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F32": "torch.float32",
    "F64": "torch.float64",
}


def check_safetensors_file(path: str, *, fix: str = "") -> dict[str, Any]:
    """Check that ``path`` is a whole safetensors file (not empty, not truncated); return its header.

    Reads the 8-byte header length and the JSON header only, and compares the file size with the end of the
    last tensor the header declares.

    Raises:
        ValueError: naming the file, what is wrong and ``fix``.
    """
    hint = f" {fix}" if fix else ""
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise ValueError(f"Cannot read {path}: {err}.{hint}") from err
    if size < 8:
        raise ValueError(
            f"{path} is empty or truncated ({size} bytes): not a complete safetensors file, probably a write "
            f"that was interrupted.{hint}"
        )
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            raise ValueError(
                f"{path} is truncated: its header needs {length} bytes but the file has {size - 8} after the "
                f"length field (an interrupted write, or not a safetensors file).{hint}"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a valid safetensors file (bad header: {err}).{hint}") from err
    if size < 8 + length + end:
        raise ValueError(
            f"{path} is truncated: {size} bytes where its header declares {8 + length + end} (an interrupted "
            f"write).{hint}"
        )
    return header


def weight_files(
    folder: str | os.PathLike, *, adapter: bool = False, fix: str = "Save the model again."
) -> list[str]:
    """The safetensors files holding a folder's model weights; ``[]`` when it has none.

    Args:
        folder (`str` or `os.PathLike`): a ``save_pretrained`` folder (or a Trainer checkpoint).
        adapter (`bool`, defaults to `False`): also accept a PEFT ``adapter_model.safetensors``.
        fix (`str`): what to do when the index is unreadable, appended to the error.

    Returns:
        `list[str]`: the shards of ``model.safetensors.index.json`` (sorted), else ``model.safetensors``
        (else ``adapter_model.safetensors`` with ``adapter=True``).

    Raises:
        ValueError: the index is empty, not JSON, or has no valid ``weight_map`` (naming it and ``fix``).
    """
    folder = os.fspath(folder)
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                files = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{index} is not a valid weight index ({err}). {fix}") from err
        return [os.path.join(folder, f) for f in files]
    for name in (WEIGHTS_FILE, ADAPTER_FILE) if adapter else (WEIGHTS_FILE,):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
    return []


def tensor_files(files: list[str], *, suffix: str = "") -> dict[str, str]:
    """``{tensor name: file}`` of every tensor whose name ends with ``suffix`` in ``files`` (headers only)."""
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(os.fspath(path), framework="pt") as handle:
            found.update((key, path) for key in handle.keys() if key.endswith(suffix))
    return found


def read_tensor(file: str, name: str) -> torch.Tensor:
    """Tensor ``name`` of the safetensors ``file`` (only that tensor is read)."""
    from safetensors import safe_open

    with safe_open(os.fspath(file), framework="pt") as handle:
        return handle.get_tensor(name)


def read_file(file: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """Every tensor of the safetensors ``file``, and its metadata (to write the file back as it was)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(file), framework="pt") as handle:
        metadata = handle.metadata()
    return load_file(os.fspath(file)), metadata


class FileMasks(Mapping):
    """``{layer name: mask}`` of the ``<layer>.weight_mask`` tensors of some files, each read when accessed.

    Masks come back as stored (a ``torch.bool`` tensor shaped like the layer's weight, for a file this package
    wrote); ``dict(masks)`` reads them all.
    """

    def __init__(self, files: Mapping[str, str]) -> None:
        self._files = dict(files)  # layer name -> file

    def __getitem__(self, name: str) -> torch.Tensor:
        return read_tensor(self._files[name], name + MASK_SUFFIX)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def file(self, name: str) -> str:
        """The file holding the mask of layer ``name``."""
        return self._files[name]


def masks_in_files(files: list[str], *, fix: str = "") -> FileMasks:
    """The masks in ``files`` (empty for a dense model), read lazily, after checking that every file is whole.

    Raises:
        ValueError: a file is empty, truncated or not safetensors (naming it and ``fix``).
    """
    for path in files:
        check_safetensors_file(path, fix=fix)
    found = tensor_files(files, suffix=MASK_SUFFIX)
    return FileMasks({key[: -len(MASK_SUFFIX)]: path for key, path in found.items()})


def mask_specs(
    state_dict: Mapping[str, Any] | None, files: list[str] | None
) -> dict[str, tuple[str, tuple[int, ...]]] | None:
    """``{key: (torch dtype name, shape)}`` of every ``*.weight_mask`` entry of a checkpoint, reading no data.

    Args:
        state_dict (`Mapping`, *optional*): the checkpoint as tensors or lazy safetensors slices; read
            instead of ``files`` when given.
        files (`list[str]`, *optional*): the checkpoint files; safetensors headers are read, ``.bin`` /
            ``.pt`` / ``.pth`` files are mapped to the ``meta`` device.

    Returns:
        the specs, or ``None`` when the checkpoint format cannot be inspected.
    """
    if state_dict is not None:
        specs = {}
        for key, value in state_dict.items():
            if key.endswith(MASK_SUFFIX):
                if isinstance(value, torch.Tensor):
                    specs[key] = (str(value.dtype), tuple(value.shape))
                else:  # a lazy safetensors slice
                    dtype = value.get_dtype()
                    specs[key] = (_SAFETENSORS_DTYPES.get(dtype, dtype), tuple(value.get_shape()))
        return specs
    if not files:
        return None
    specs = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if key.endswith(MASK_SUFFIX):
                        piece = handle.get_slice(key)
                        dtype = piece.get_dtype()
                        specs[key] = (_SAFETENSORS_DTYPES.get(dtype, dtype), tuple(piece.get_shape()))
        elif file.endswith((".bin", ".pt", ".pth")):
            data = torch.load(file, map_location="meta", weights_only=True)
            for key, value in data.items():
                if key.endswith(MASK_SUFFIX) and isinstance(value, torch.Tensor):
                    specs[key] = (str(value.dtype), tuple(value.shape))
        else:
            return None
    return specs


# ----------------------------------------------------------------------------------------- checkpoint folders
# model types whose sparse weights are stored (n_in, n_out) (GPT-2's Conv1D)
TRANSPOSED_MODEL_TYPES = ("gpt2",)


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict ({} when absent)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); restore or rewrite the config.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}; rewrite the config.")
    return config


def folder_size(folder: str | os.PathLike, pattern: str = "*.safetensors") -> int:
    """Total bytes of the files matching ``pattern`` in ``folder`` (the weight files by default)."""
    return sum(p.stat().st_size for p in Path(folder).glob(pattern) if p.is_file())


def is_transposed_config(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's sparse weights are stored ``(n_in, n_out)`` (GPT-2 ``Conv1D``)."""
    return config.get("model_type") in TRANSPOSED_MODEL_TYPES
