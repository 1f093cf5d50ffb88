"""Tokenise documents and pack them into fixed-length blocks with ``Dataset.map``.

Packing concatenates the tokenised documents, each followed by ``eos``, and cuts the stream into blocks of
``max_seq_length`` tokens (``labels = input_ids``; the model shifts them; :func:`collate_blocks` adds the
labels when batching). For a ``datasets.Dataset`` both steps are ``Dataset.map`` calls with fingerprints
derived from the input's fingerprint, the tokenizer and the block length, so a second run reads the packed
blocks from the ``datasets`` cache instead of tokenising again. The blocks are exactly those of cutting the
whole token stream at once: the partial block at the end of each map batch is carried into the next one,
and only the last remainder (< ``max_seq_length`` tokens) is dropped.

A streamed ``datasets.IterableDataset`` is tokenised and packed lazily with ``IterableDataset.map``; each
batch of ``batch_size`` documents is packed on its own, dropping its last partial block (fewer than
``max_seq_length`` tokens per batch), so the stream needs no state that would leak across epochs.

Example:
    >>> import datasets
    >>> from hf_chts.data import pack_dataset, train_tokenizer
    >>> docs = datasets.Dataset.from_dict({"text": ["one two three four five six"] * 8})
    >>> tokenizer = train_tokenizer(docs["text"], vocab_size=300)
    >>> blocks = pack_dataset(docs, tokenizer, max_seq_length=8)
    >>> len(blocks[0]["input_ids"])
    8
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .corpus import sha256_hex
from .tokenizer import tokenizer_fingerprint

PACKING_VERSION = 1
"""Part of every packing fingerprint; bumped when the packing changes, so stale caches are never reused."""


def check_max_seq_length(max_seq_length: Any) -> int:
    """Return ``max_seq_length`` if it is an integer >= 2, else raise a ``ValueError``."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"`max_seq_length` must be an integer >= 2, got {max_seq_length!r}.")
    return max_seq_length


def pack_tokens(tokens: np.ndarray | torch.Tensor, max_seq_length: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``(n_blocks, max_seq_length)`` int64 blocks, dropping the remainder."""
    check_max_seq_length(max_seq_length)
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n_blocks = tokens.numel() // max_seq_length
    return tokens[: n_blocks * max_seq_length].reshape(n_blocks, max_seq_length)


def _tokenize(batch: dict[str, list], tokenizer: Any, text_field: str) -> dict[str, list]:
    eos = tokenizer.eos_token_id
    encoded = tokenizer(
        batch[text_field], add_special_tokens=False, return_attention_mask=False, verbose=False
    )
    return {"input_ids": [ids + [eos] for ids in encoded["input_ids"]]}


class _Packer:
    """Batched map function cutting token lists into blocks; with ``carry`` the remainder goes to the next
    batch (map-style datasets are mapped in order, by one process), else it is dropped."""

    def __init__(self, max_seq_length: int, carry: bool):
        self.max_seq_length, self.carry = max_seq_length, carry
        self.rest = np.zeros(0, dtype=np.int32)

    def __call__(self, batch: dict[str, list]) -> dict[str, np.ndarray]:
        pieces = [np.asarray(ids, dtype=np.int32) for ids in batch["input_ids"]]
        stream = np.concatenate([self.rest, *pieces]) if pieces else self.rest
        n = stream.size // self.max_seq_length * self.max_seq_length
        if self.carry:
            self.rest = stream[n:]
        return {"input_ids": stream[:n].reshape(-1, self.max_seq_length)}


def pack_dataset(
    dataset: Any,
    tokenizer: Any,
    max_seq_length: int,
    *,
    text_field: str = "text",
    batch_size: int = 1000,
) -> Any:
    """Tokenise ``dataset[text_field]`` (each document followed by ``eos``) and pack it into blocks.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): documents in column ``text_field``.
        tokenizer: a tokenizer with an ``eos`` token.
        max_seq_length (`int`): block length (>= 2).
        text_field (`str`, *optional*, defaults to `"text"`): the column holding the text.
        batch_size (`int`, *optional*, defaults to 1000): documents tokenised (and, streamed, packed) at once.

    Returns:
        A dataset of the same kind with one column ``"input_ids"`` (``max_seq_length`` token ids per row),
        in the ``"torch"`` format.
    """
    import datasets

    check_max_seq_length(max_seq_length)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos token; packing separates documents with it.")
    columns = dataset.column_names
    tokenize_kwargs = dict(
        batched=True,
        batch_size=batch_size,
        remove_columns=columns,
        fn_kwargs={"tokenizer": tokenizer, "text_field": text_field},
    )
    if isinstance(dataset, datasets.IterableDataset):
        tokens = dataset.map(_tokenize, **tokenize_kwargs)
        packed = tokens.map(
            _Packer(max_seq_length, carry=False),
            batched=True,
            batch_size=batch_size,
            remove_columns=["input_ids"],
        )
        return packed.with_format("torch")
    if len(dataset) == 0:  # map would return a dataset without columns
        features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
        return datasets.Dataset.from_dict({"input_ids": []}, features=features).with_format("torch")
    key = [dataset._fingerprint, tokenizer_fingerprint(tokenizer), text_field, str(PACKING_VERSION)]
    tokens = dataset.map(
        _tokenize, new_fingerprint=sha256_hex([*key, "tokens"])[:16], desc="Tokenizing", **tokenize_kwargs
    )
    packed = tokens.map(
        _Packer(max_seq_length, carry=True),
        batched=True,
        batch_size=batch_size,
        remove_columns=["input_ids"],
        new_fingerprint=sha256_hex([*key, "blocks", str(max_seq_length)])[:16],
        desc=f"Packing into blocks of {max_seq_length}",
    )
    return packed.with_format("torch")


def collate_blocks(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack packed blocks into ``{"input_ids", "labels"}`` (``labels`` a copy of ``input_ids``)."""
    ids = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
    return {"input_ids": ids, "labels": ids.clone()}
