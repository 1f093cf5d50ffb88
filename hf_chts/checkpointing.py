"""The sparse-training state on disk: atomic writes, checked reads, complete checkpoints.

A checkpoint folder ``<output_dir>/checkpoint-<step>`` written by ``Trainer`` with
:class:`~hf_chts.CHTssCallback` holds, besides the Trainer's own files (``model.safetensors``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``)::

    hf_chts_state/
        masks.safetensors   {layer name: bool mask shaped like the weight}
        state.json          {"format_version": 1, "step": <int>, "config": {...}, "engine": {...}, ...}
        COMPLETE            {"format_version": 1, "step": <int>, "files": {name: size in bytes},
                             "checksums": {name: "crc32:<hex>"}}

Every file is written under a temporary name, flushed, ``fsync``-ed and renamed into place, and
``COMPLETE`` is written last: a folder without ``COMPLETE`` (or whose ``COMPLETE`` names other sizes or
checksums than the files have) is incomplete. The checksum (:func:`content_checksum`, CRC-32) catches a
damaged file of the right size. The callback writes this folder while the Trainer saves the checkpoint,
after the model weights and the optimizer and *before* ``trainer_state.json`` and before the Trainer deletes
older checkpoints (``save_total_limit``), so every checkpoint that has a ``trainer_state.json`` also has its
sparse state (docs/reliability.md).

:func:`last_complete_checkpoint` returns the newest checkpoint whose Trainer files, model weights and sparse
state are all complete; pass it to ``trainer.train(resume_from_checkpoint=...)``. Errors name the file and
the fix.

Example:

```python
>>> from hf_chts import last_complete_checkpoint
>>> trainer.train(resume_from_checkpoint=last_complete_checkpoint("out"))  # doctest: +SKIP
```
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import torch

from .weights_io import check_safetensors_file, masks_in_files, read_file, weight_files

logger = logging.getLogger(__name__)

STATE_DIR = "hf_chts_state"
MASKS_FILE = "masks.safetensors"
STATE_FILE = "state.json"
COMPLETE_FILE = "COMPLETE"
LOCK_FILE = "_hf_chts.lock"  # "_*" files stay out of the Trainer's push_to_hub
FORMAT_VERSION = 1
TRAINER_STATE_FILE = "trainer_state.json"
CALLBACK_NAME = "CHTssCallback"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_SUFFIX = ".tmp"
# Trainer files that are zip archives (torch.save) when present; a truncated zip has no central directory.
_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin")

__all__ = [
    "COMPLETE_FILE",
    "FORMAT_VERSION",
    "MASKS_FILE",
    "STATE_DIR",
    "STATE_FILE",
    "check_safetensors_file",
    "checkpoint_problem",
    "content_checksum",
    "file_checksum",
    "tensor_checksum",
    "last_complete_checkpoint",
    "load_sparse_state",
    "lock_output_dir",
    "masks_in_model_weights",
    "model_weight_files",
    "replace_atomic",
    "save_sparse_state",
    "sparse_state_complete",
    "trainer_callback_state",
    "unlock_output_dir",
]


# ------------------------------------------------------------------------------------------ atomic writes
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete, never partial.

    Writes ``<path>.tmp``, flushes and ``fsync``-s it, renames it over ``path`` and ``fsync``-s the folder.
    """
    tmp = path + _TMP_SUFFIX
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(
            err.errno,
            f"Could not write {path} ({err.strerror or err}); it is left as it was before this save. Free "
            "disk space or make the output folder writable, then resume from "
            "hf_chts.last_complete_checkpoint(output_dir).",
        ) from err
    _fsync_dir(os.path.dirname(path) or ".")


def replace_atomic(tmp: str, path: str) -> None:
    """``fsync`` the finished file ``tmp`` and rename it over ``path`` (for writers that take a file name)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def content_checksum(data: bytes | memoryview) -> str:
    """The checksum recorded beside a file or tensor this package writes: ``"crc32:<8 hex digits>"``.

    CRC-32 (``zlib``, gigabytes per second) detects damaged bytes; it is not a defence against forgery.
    """
    return _crc32_text(zlib.crc32(data))


def _crc32_text(value: int) -> str:
    return f"crc32:{value & 0xFFFFFFFF:08x}"


def tensor_checksum(tensor: torch.Tensor) -> str:
    """:func:`content_checksum` of a tensor's bytes as safetensors stores them (row-major, its own dtype)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return content_checksum(memoryview(data))


def file_checksum(path: str, chunk: int = 1 << 24) -> str:
    """:func:`content_checksum` of a file's bytes, read in chunks of ``chunk`` bytes."""
    value = 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            value = zlib.crc32(block, value)
    return _crc32_text(value)


def _state_folder(directory: str) -> str:
    if os.path.basename(os.path.normpath(directory)) == STATE_DIR:
        return directory
    return os.path.join(directory, STATE_DIR)


def save_sparse_state(directory: str, masks: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> str:
    """Write ``directory/hf_chts_state/{masks.safetensors, state.json, COMPLETE}`` atomically (no pickle).

    ``COMPLETE`` is removed first and written last, so a crash at any instant leaves either the previous
    complete state or a folder that :func:`sparse_state_complete` reports as incomplete.

    Returns:
        `str`: the ``hf_chts_state`` folder.
    """
    from safetensors.torch import save as safetensors_bytes

    folder = _state_folder(directory)
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, COMPLETE_FILE)
    if os.path.exists(marker):
        os.remove(marker)
        _fsync_dir(folder)
    tensors = {name: mask.detach().to("cpu").contiguous() for name, mask in masks.items()}
    masks_bytes = safetensors_bytes(tensors)
    state = {"format_version": FORMAT_VERSION, **dict(state)}
    state_bytes = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8")
    write_atomic(os.path.join(folder, MASKS_FILE), masks_bytes)
    write_atomic(os.path.join(folder, STATE_FILE), state_bytes)
    complete = {
        "format_version": FORMAT_VERSION,
        "step": state.get("step"),
        "files": {MASKS_FILE: len(masks_bytes), STATE_FILE: len(state_bytes)},
        "checksums": {MASKS_FILE: content_checksum(masks_bytes), STATE_FILE: content_checksum(state_bytes)},
    }
    write_atomic(marker, (json.dumps(complete, sort_keys=True) + "\n").encode("utf-8"))
    return folder


# ------------------------------------------------------------------------------------------ checked reads
def _read_json(path: str, what: str, fix: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ValueError(f"Cannot read {what} {path}: {err}. {fix}") from err
    if not text.strip():
        raise ValueError(f"{what} {path} is empty (an interrupted write). {fix}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}; truncated or edited). {fix}") from err


def sparse_state_complete(directory: str) -> str | None:
    """``None`` when ``directory``'s ``hf_chts_state`` is complete, else the reason it is not."""
    folder = _state_folder(directory)
    marker = os.path.join(folder, COMPLETE_FILE)
    if not os.path.isfile(marker):
        return f"{marker} is missing (the sparse state was not written, or its write was interrupted)"
    try:
        with open(marker, encoding="utf-8") as handle:
            info = json.load(handle)
        files = dict(info["files"])
        checksums = dict(info.get("checksums") or {})  # absent in states written before checksums
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{marker} is unreadable ({err})"
    for name, size in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return f"{path} is missing or has another size than {marker} records"
        found = file_checksum(path) if name in checksums else None
        if found is not None and found != checksums[name]:
            return (
                f"{path} has other content than {marker} records (checksum {found}, recorded "
                f"{checksums[name]}): the file was damaged or edited after it was written"
            )
    return None


_STATE_TYPES = {
    "format_version": int,
    "step": int,
    "config": dict,
    "engine": dict,
    "layers": dict,
    "last_update_step": int,
    "update_seconds_total": (int, float),
}


def _check_state_types(state: Any, path: str) -> dict[str, Any]:
    fix = "Resume from another checkpoint (hf_chts.last_complete_checkpoint) or delete this one."
    if not isinstance(state, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(state).__name__}. {fix}")
    version = state.get("format_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ValueError(f"{path}: `format_version` must be an integer, got {version!r}. {fix}")
    if version is not None and version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}; this hf_chts reads format_version <= {FORMAT_VERSION}. "
            "Upgrade hf_chts (pip install -U hf_chts) to resume from it."
        )
    if version is not None and version < 1:
        raise ValueError(f"{path} has an unknown format_version {version}. {fix}")
    for key, kind in _STATE_TYPES.items():
        value = state.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = {int: "an integer", dict: "a JSON object"}.get(kind, "a number")
            raise ValueError(
                f"{path}: field `{key}` must be {expected}, got {type(value).__name__} {value!r}. {fix}"
            )
    frozen = state.get("engine", {}).get("frozen", [])
    if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen):
        raise ValueError(
            f"{path}: field `engine.frozen` must be a list of layer names, got {frozen!r}. {fix}"
        )
    return state


def load_sparse_state(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what :func:`save_sparse_state` wrote; ``directory`` is the checkpoint or its ``hf_chts_state``.

    Returns:
        `(masks, state)`: ``{layer name: bool mask}`` and the JSON state.

    Raises:
        ValueError: a missing, incomplete, truncated or mistyped file (naming the file and the fix), or an
            unknown ``format_version``.
    """
    folder = _state_folder(directory)
    masks_path, state_path = os.path.join(folder, MASKS_FILE), os.path.join(folder, STATE_FILE)
    fix = "Resume from another checkpoint (hf_chts.last_complete_checkpoint(output_dir)) or delete this one."
    if not (os.path.isfile(masks_path) and os.path.isfile(state_path)):
        raise ValueError(
            f"No sparse-training state in {folder!r} (expected {MASKS_FILE} and {STATE_FILE}); was the "
            "checkpoint written by a run with CHTssCallback?"
        )
    if os.path.isfile(os.path.join(folder, COMPLETE_FILE)):
        problem = sparse_state_complete(folder)
        if problem is not None:
            raise ValueError(f"The sparse state in {folder} is incomplete: {problem}. {fix}")
    state = _check_state_types(_read_json(state_path, "The sparse state", fix), state_path)
    check_safetensors_file(masks_path, fix=fix)
    masks, _ = read_file(masks_path)
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise ValueError(
                f"{masks_path}: mask {name!r} has dtype {mask.dtype}, expected torch.bool. {fix}"
            )
    return masks, state


# ------------------------------------------------------------------------------------------ model weights
def masks_in_model_weights(checkpoint: str) -> Mapping[str, torch.Tensor]:
    """``{layer name: bool mask}`` of the ``*.weight_mask`` tensors in a checkpoint's model weights, or {}.

    The mapping (a :class:`hf_chts.weights_io.FileMasks`) reads each mask when it is accessed (a 7B model's
    masks take gigabytes), after checking that every weight file is whole.
    """
    return masks_in_files(
        model_weight_files(checkpoint),
        fix="Resume from another checkpoint (hf_chts.last_complete_checkpoint).",
    )


def model_weight_files(checkpoint: str) -> list[str]:
    """The safetensors files holding a checkpoint folder's model (or adapter) weights; ``[]`` when none.

    Listed by ``model.safetensors.index.json`` when the weights are sharded.

    Raises:
        ValueError: when the index is unreadable, naming the file and the fix.
    """
    return weight_files(checkpoint, adapter=True, fix="Re-save the checkpoint.")


def trainer_callback_state(checkpoint: str) -> dict[str, Any] | None:
    """The callback's scalar state stored by the Trainer in ``trainer_state.json`` (``None`` if absent)."""
    path = os.path.join(checkpoint, TRAINER_STATE_FILE)
    if not os.path.isfile(path):
        return None
    data = _read_json(path, "The Trainer state", "Resume from another checkpoint.")
    entry = (data.get("stateful_callbacks") or {}).get(CALLBACK_NAME)
    if isinstance(entry, list):
        entry = entry[0] if entry else None
    if not isinstance(entry, dict):
        return None
    exported = (entry.get("attributes") or {}).get("_exported")
    return _check_state_types(exported, path) if isinstance(exported, dict) else None


# ------------------------------------------------------------------------------------------ completeness
def checkpoint_problem(checkpoint: str) -> str | None:
    """``None`` when ``checkpoint`` can be resumed from, else why not (the first problem found).

    Complete means: ``trainer_state.json`` parses and its ``global_step`` matches the folder name; the model
    weights exist and no safetensors file is truncated; the Trainer's ``torch.save`` files that are present
    are whole zip archives; and, for a run trained with ``CHTssCallback`` (its state is in
    ``trainer_state.json``, or the folder has ``hf_chts_state/``), the sparse state is complete, or the model
    weights carry the masks.
    """
    trainer_state = os.path.join(checkpoint, TRAINER_STATE_FILE)
    if not os.path.isfile(trainer_state):
        return f"{trainer_state} is missing"
    try:
        data = _read_json(trainer_state, "The Trainer state", "")
        step = int(data["global_step"])
    except (ValueError, KeyError, TypeError) as err:
        return str(err)
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(checkpoint)))
    if match and int(match.group(1)) != step:
        return f"{trainer_state} says global_step {step}, the folder name {match.group(1)}"
    try:
        files = model_weight_files(checkpoint)
        if not files and not os.path.isfile(os.path.join(checkpoint, "pytorch_model.bin")):
            return f"no model weights (model.safetensors) in {checkpoint}"
        for path in files:
            check_safetensors_file(path)
    except ValueError as err:
        return str(err)
    for name in _TORCH_FILES + ("pytorch_model.bin",):
        path = os.path.join(checkpoint, name)
        if os.path.isfile(path) and not zipfile.is_zipfile(path):
            return f"{path} is truncated or corrupt (not a complete torch.save archive)"
    sparse_run = os.path.isdir(os.path.join(checkpoint, STATE_DIR)) or CALLBACK_NAME in (
        data.get("stateful_callbacks") or {}
    )
    if sparse_run:
        problem = sparse_state_complete(checkpoint)
        if problem is not None:
            try:
                carried = masks_in_model_weights(checkpoint)
            except ValueError as err:
                return str(err)
            if not carried:
                return problem
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that a run can resume from, or ``None``.

    Unlike transformers' ``get_last_checkpoint`` (the highest step, complete or not), this skips a checkpoint
    whose write was interrupted: see :func:`checkpoint_problem` for what "complete" means. Works for any
    ``Trainer`` run; with ``CHTssCallback`` it also requires the sparse state.

    Args:
        output_dir (`str`): the Trainer's ``output_dir``.

    Returns:
        `str` or `None`: the folder to pass as ``trainer.train(resume_from_checkpoint=...)``; ``None`` when
        ``output_dir`` has no complete checkpoint (start from scratch).

    Example:

    ```python
    >>> trainer.train(resume_from_checkpoint=last_complete_checkpoint(args.output_dir))  # doctest: +SKIP
    ```
    """
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        if checkpoint_problem(path) is None:
            return path
    return None


# ------------------------------------------------------------------------------------------ one writer
_HELD: dict[str, int] = {}  # output folder (real path) -> descriptor of its lock file, held by this process


def lock_output_dir(output_dir: str) -> str | None:
    """Take ``output_dir``'s writer lock for this process, or refuse: one training run writes a folder.

    Two runs writing one ``output_dir`` delete or overwrite each other's checkpoints (``save_total_limit``
    rotation). The lock is an exclusive ``flock`` on ``<output_dir>/_hf_chts.lock``, which the operating
    system releases when the process ends, so a crashed or killed run never leaves it stale. Taking it again
    in the process that holds it is a no-op. Where ``fcntl`` is missing (Windows) nothing is locked.

    Returns:
        `str` or `None`: the lock file, or None where locks are not available.

    Raises:
        ValueError: another process holds the lock, naming the folder, the holder and the fix.
    """
    try:
        import fcntl
    except ImportError:
        return None
    folder = os.path.realpath(output_dir)
    path = os.path.join(folder, LOCK_FILE)
    if folder in _HELD:
        return path
    os.makedirs(folder, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ValueError(
            f"{output_dir} is being written by another training run ({holder}, lock {path}): two runs "
            "writing one output_dir delete or overwrite each other's checkpoints. Give this run its own "
            "output_dir, or wait until the other ends (the lock goes with its process, also when it crashes)."
        ) from err
    import socket

    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD[folder] = fd
    return path


def unlock_output_dir(output_dir: str) -> None:
    """Release the lock :func:`lock_output_dir` took in this process (nothing when it holds none)."""
    fd = _HELD.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock
