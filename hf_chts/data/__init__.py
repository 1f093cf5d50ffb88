"""Training text for the recipes as ``datasets`` objects: load, tokenise, pack.

- :mod:`~hf_chts.data.corpus`: the embedded default corpus (Python standard-library docstrings) as a
  ``DatasetDict``, and the hash split into train / validation;
- :mod:`~hf_chts.data.loading`: local ``.txt`` / ``.jsonl`` (``.gz``) files and Hub datasets through
  ``datasets.load_dataset``, or the user's own ``Dataset`` / ``IterableDataset``;
- :mod:`~hf_chts.data.tokenizer`: a byte-level BPE trained locally (cached) or a tokenizer by name;
- :mod:`~hf_chts.data.packing`: tokenising and packing into fixed-length blocks with ``Dataset.map`` (its
  fingerprint cache keeps the packed blocks between runs).

:func:`load_lm_data` does all of it in one call. Everything the default recipe needs works offline.
The folder also ships the offline zero-shot tasks (``tasks/``) read by :mod:`hf_chts.evaluation`.

Example:
    >>> from hf_chts.data import load_lm_data
    >>> data = load_lm_data(max_seq_length=128)  # doctest: +SKIP
    >>> data.train_dataset[0]["input_ids"].shape  # doctest: +SKIP
    torch.Size([128])
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .corpus import (
    CORPUS_VERSION,
    DEFAULT_VALIDATION_FRACTION,
    EMBEDDED_CORPUS,
    build_stdlib_corpus,
    default_cache_dir,
    embedded_dataset,
    is_validation_document,
    normalize_whitespace,
    split_documents,
)
from .loading import DATA_SUFFIXES, check_text_field, load_text_dataset, resolve_source
from .packing import check_max_seq_length, collate_blocks, pack_dataset, pack_tokens
from .tokenizer import (
    SPECIAL_TOKENS,
    check_vocab_fits,
    get_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CORPUS_VERSION",
    "DATA_SUFFIXES",
    "DEFAULT_VALIDATION_FRACTION",
    "EMBEDDED_CORPUS",
    "SPECIAL_TOKENS",
    "LMData",
    "build_stdlib_corpus",
    "check_text_field",
    "check_vocab_fits",
    "collate_blocks",
    "default_cache_dir",
    "embedded_dataset",
    "get_tokenizer",
    "is_validation_document",
    "load_lm_data",
    "load_text_dataset",
    "load_tokenizer",
    "normalize_whitespace",
    "pack_dataset",
    "pack_tokens",
    "resolve_source",
    "split_documents",
    "tokenizer_fingerprint",
    "train_tokenizer",
]


@dataclass
class LMData:
    """What :func:`load_lm_data` returns: packed datasets ready for ``Trainer``, the tokenizer, the collator
    (adds ``labels``) and a summary."""

    train_dataset: Any
    eval_dataset: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    data_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_blocks


def _texts(dataset: Any, text_field: str, limit: int | None = None) -> Iterator[str]:
    rows = dataset.iter(batch_size=1000)
    count = 0
    for batch in rows:
        for text in batch[text_field]:
            if limit is not None and count >= limit:
                return
            count += 1
            yield text


def _hash_split(dataset: Any, text_field: str, fraction: float, validation: bool) -> Any:
    is_validation_document("", fraction)  # validates the fraction

    def keep(text: str) -> bool:
        return is_validation_document(text, fraction) == validation

    return dataset.filter(keep, input_columns=[text_field])


def _dist_from_env() -> tuple[int, int]:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_lm_data(
    dataset: Any = None,
    *,
    dataset_config: str | None = None,
    text_field: str = "text",
    validation_file: str | None = None,
    validation_split: str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    streaming: bool | None = None,
    tokenizer_name: str | None = None,
    tokenizer_vocab_size: int = 4096,
    tokenizer_train_documents: int = 100_000,
    max_seq_length: int = 256,
    max_eval_samples: int | None = None,
    split_by_node: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LMData:
    """Load text, get a tokenizer and pack both splits into ``max_seq_length`` blocks.

    Args:
        dataset: ``None`` / ``"stdlib"`` = the embedded corpus; a local file or folder; a Hub dataset name
            (streamed unless ``streaming=False``); or a ``datasets.Dataset`` / ``IterableDataset`` of text.
        dataset_config (`str`, *optional*): Hub configuration (``"en"`` for C4).
        text_field (`str`, *optional*, defaults to `"text"`): JSON key / dataset column of the text.
        validation_file (`str`, *optional*): local validation text; default: a hash split of ``dataset``.
        validation_split (`str`, *optional*): Hub split used for validation (``"validation"`` for C4);
            default: the documents of the train split that :func:`is_validation_document` picks.
        validation_fraction (`float`, *optional*, defaults to 0.05): share of documents held out by hash.
        streaming (`bool`, *optional*): stream Hub data (default for Hub names); an ``IterableDataset``
            always streams; ignored for local data and the embedded corpus.
        tokenizer_name (`str`, *optional*): Hub name or local path; default: a byte-level BPE trained here.
        tokenizer_vocab_size (`int`, *optional*, defaults to 4096): size of the BPE trained here.
        tokenizer_train_documents (`int`, *optional*, defaults to 100000): documents of a stream the BPE is
            trained on.
        max_seq_length (`int`, *optional*, defaults to 256): block length.
        max_eval_samples (`int`, *optional*): keep only the first blocks of the validation split (streams:
            default 1000).
        split_by_node (`bool`, *optional*, defaults to `False`): give each process a disjoint shard of a
            streamed training set (``datasets.distributed.split_dataset_by_node``) for a training loop that
            does not shard the data itself (``Trainer`` / ``accelerate`` shard it already).
        rank, world_size (`int`, *optional*): this process and the number of processes for
            ``split_by_node``; default: the initialised process group, else ``$RANK`` / ``$WORLD_SIZE``.
        cache_dir (`str` or `PathLike`, *optional*): cache root; default :func:`default_cache_dir`.

    Raises:
        FileNotFoundError: a local file is missing. ValueError: no such text field, empty corpus, corpus
            shorter than one block, an empty shard on a process, bad arguments.
    """
    import datasets

    check_max_seq_length(max_seq_length)
    if max_eval_samples is not None and max_eval_samples < 1:
        raise ValueError(f"`max_eval_samples` must be >= 1, got {max_eval_samples}.")
    is_validation_document("", validation_fraction)
    kind, where = resolve_source(dataset)
    if validation_file is not None and not os.path.exists(os.path.expanduser(validation_file)):
        raise FileNotFoundError(f"Validation file not found: {validation_file}.")
    stream = isinstance(where, datasets.IterableDataset) or (kind == "hub" and streaming is not False)
    load = dict(config=dataset_config, text_field=text_field, cache_dir=cache_dir, streaming=stream)

    if kind == "embedded":
        corpus = embedded_dataset(cache_dir, validation_fraction=validation_fraction)
        train, validation = corpus["train"], corpus["validation"]
        description = "embedded corpus (Python standard-library docstrings)"
    else:
        description = f"{kind} dataset {dataset}" if kind != "dataset" else f"given {type(where).__name__}"
        docs = load_text_dataset(where, **load)
        if validation_file is not None:
            train = docs
            validation = load_text_dataset(validation_file, text_field=text_field, cache_dir=cache_dir)
        elif kind == "hub" and validation_split:
            train, validation = docs, load_text_dataset(where, split=validation_split, **load)
        else:
            train = _hash_split(docs, text_field, validation_fraction, validation=False)
            validation = _hash_split(docs, text_field, validation_fraction, validation=True)
        if not stream and len(docs) == 0:
            raise ValueError(f"The {description} is empty: no non-blank text was found in it.")
    if stream:
        return _load_streaming(
            train,
            validation,
            description=description,
            source=dataset if isinstance(dataset, str) else description,
            fingerprint=None
            if kind == "dataset"
            else [str(dataset), str(dataset_config), text_field, str(tokenizer_train_documents), "stream"],
            text_field=text_field,
            tokenizer_name=tokenizer_name,
            tokenizer_vocab_size=tokenizer_vocab_size,
            tokenizer_train_documents=tokenizer_train_documents,
            max_seq_length=max_seq_length,
            max_eval_samples=max_eval_samples or 1000,
            node=_node(split_by_node, rank, world_size),
            cache_dir=cache_dir,
            info={
                "dataset_config": dataset_config,
                "validation": validation_split
                or validation_file
                or f"hash hold-out {validation_fraction:.0%} of train",
            },
        )
    if len(train) == 0:
        raise ValueError(
            f"The training split of {description} is empty; add text or lower --validation_fraction."
        )
    tokenizer = get_tokenizer(
        tokenizer_name,
        documents=lambda: _texts(train, text_field),
        vocab_size=tokenizer_vocab_size,
        fingerprint=train._fingerprint,
        cache_dir=cache_dir,
    )
    train_blocks = pack_dataset(train, tokenizer, max_seq_length, text_field=text_field)
    val_blocks = pack_dataset(validation, tokenizer, max_seq_length, text_field=text_field)
    n_train = len(train_blocks)
    if len(val_blocks) == 0:
        # Too little held-out text for one block: hold out the last blocks of the training stream instead.
        n_val = max(1, math.ceil(validation_fraction * n_train))
        if n_train - n_val < 1:
            raise ValueError(
                f"{description} has {n_train} blocks of max_seq_length={max_seq_length}, too few for one "
                "training and one validation block; add text or lower --max_seq_length."
            )
        logger.warning(
            "Validation text shorter than one block; holding out the last %d training blocks.", n_val
        )
        train_blocks, val_blocks = (
            train_blocks.select(range(n_train - n_val)),
            train_blocks.select(range(n_train - n_val, n_train)),
        )
    if len(train_blocks) == 0:
        raise ValueError(
            f"{description} has fewer training tokens than max_seq_length={max_seq_length}; add text or "
            "lower --max_seq_length."
        )
    if max_eval_samples is not None and len(val_blocks) > max_eval_samples:
        val_blocks = val_blocks.select(range(max_eval_samples))
    info = {
        "dataset": dataset
        if isinstance(dataset, str)
        else EMBEDDED_CORPUS
        if dataset is None
        else description,
        "source": kind,
        "description": description,
        "train_documents": len(train),
        "validation_documents": len(validation),
        "train_tokens": len(train_blocks) * max_seq_length,
        "train_blocks": len(train_blocks),
        "eval_blocks": len(val_blocks),
        "max_seq_length": max_seq_length,
        "tokenizer": tokenizer_name
        or f"byte-level BPE ({len(tokenizer)} tokens) trained on the training split",
        "vocab_size": len(tokenizer),
    }
    return LMData(train_blocks, val_blocks, tokenizer, info)


def _node(split_by_node: bool, rank: int | None, world_size: int | None) -> tuple[int, int] | None:
    """``(rank, world_size)`` to shard a stream by, or None when it is not sharded."""
    if not split_by_node:
        return None
    env_rank, env_world = _dist_from_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if not (
        isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size
    ):
        raise ValueError(
            f"`rank`={rank!r} and `world_size`={world_size!r} must be integers with 0 <= rank < world_size."
        )
    return rank, world_size


def _load_streaming(
    train: Any,
    validation: Any,
    *,
    description: str,
    source: str,
    fingerprint: list[str] | None,
    text_field: str,
    tokenizer_name: str | None,
    tokenizer_vocab_size: int,
    tokenizer_train_documents: int,
    max_seq_length: int,
    max_eval_samples: int,
    node: tuple[int, int] | None,
    cache_dir: str | os.PathLike | None,
    info: dict[str, Any],
) -> LMData:
    import datasets
    from datasets.distributed import split_dataset_by_node

    from .corpus import sha256_hex

    tokenizer = get_tokenizer(
        tokenizer_name,
        documents=lambda: _texts(train, text_field, tokenizer_train_documents),
        vocab_size=tokenizer_vocab_size,
        fingerprint=None if fingerprint is None else sha256_hex(fingerprint),
        cache_dir=cache_dir,
    )
    # The validation blocks are materialised (a fixed set for comparable perplexities).
    val_packed = pack_dataset(validation, tokenizer, max_seq_length, text_field=text_field)
    if isinstance(val_packed, datasets.IterableDataset):
        rows = [row["input_ids"] for row in itertools.islice(val_packed, max_eval_samples)]
        val_blocks = datasets.Dataset.from_dict({"input_ids": rows}).with_format("torch")
    else:
        val_blocks = val_packed.select(range(min(max_eval_samples, len(val_packed))))
    if len(val_blocks) == 0:
        raise ValueError(
            f"The validation text of {description} is shorter than one block of "
            f"max_seq_length={max_seq_length}."
        )
    shard = ""
    if node is not None and node[1] > 1:
        rank, world_size = node
        n_shards = train.n_shards
        train = split_dataset_by_node(train, rank=rank, world_size=world_size)
        shard = f" (process {rank} of {world_size}; the stream has {n_shards} file shards)"
    train_blocks = pack_dataset(train, tokenizer, max_seq_length, text_field=text_field)
    if next(iter(train_blocks.take(1)), None) is None:
        raise ValueError(
            f"The training stream of {description}{shard} yields no block of "
            f"max_seq_length={max_seq_length}: its shard is empty or shorter than one block. Use fewer "
            "processes (or as many as the stream has file shards), more text, or a smaller --max_seq_length."
        )
    info = {
        "dataset": source,
        "source": "hub" if isinstance(source, str) else "dataset",
        "description": f"{description}, streamed{shard}",
        **info,
        "eval_blocks": len(val_blocks),
        "max_seq_length": max_seq_length,
        "tokenizer": tokenizer_name
        or f"byte-level BPE ({len(tokenizer)} tokens) trained on the first {tokenizer_train_documents} "
        "training documents",
        "vocab_size": len(tokenizer),
    }
    return LMData(train_blocks, val_blocks, tokenizer, info)
