"""Tokenizers for the recipes: a byte-level BPE trained locally (cached), or one loaded by name or path.

Example:
    >>> from hf_chts.data import train_tokenizer
    >>> tokenizer = train_tokenizer(["some text to learn merges from"] * 10, vocab_size=300)
    >>> tokenizer.eos_token
    '</s>'
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .corpus import default_cache_dir, sha256_hex

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def train_tokenizer(
    documents: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2, max_length: int | None = None
):
    """Train a byte-level BPE tokenizer on ``documents`` and wrap it as a ``PreTrainedTokenizerFast``.

    The special tokens are ``<unk>`` (id 0), ``<s>``, ``</s>`` and ``<pad>``; no token is added automatically
    when encoding (packing appends ``</s>`` itself), so lm-eval and ``save_pretrained`` see an ordinary
    GPT-2-like tokenizer. Every byte is in the alphabet, so no text is ever unknown.

    Args:
        documents (`Iterable[str]`): training text.
        vocab_size (`int`, *optional*, defaults to 4096): final vocabulary size, special tokens included.
        min_frequency (`int`, *optional*, defaults to 2): minimum count of a merged pair.
        max_length (`int`, *optional*): stored as ``model_max_length``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(SPECIAL_TOKENS.values())
    if not isinstance(vocab_size, int) or vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"`tokenizer_vocab_size` must be an integer >= {len(alphabet) + len(specials)} (256 bytes + "
            f"{len(specials)} special tokens), got {vocab_size!r}."
        )
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer=trainer)
    kwargs = dict(SPECIAL_TOKENS)
    if max_length is not None:
        kwargs["model_max_length"] = max_length
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def load_tokenizer(name_or_path: str, **kwargs: Any):
    """Load a tokenizer by Hub name or local path, making sure it has ``eos`` (for packing) and ``pad``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer {name_or_path!r} has no end-of-sequence token; packing separates documents with it. "
            "Use a tokenizer with an eos token or add one: tokenizer.add_special_tokens({'eos_token': ...})."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable digest of a tokenizer's vocabulary and rules (cache key of packed token streams)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizer: its vocabulary
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return sha256_hex([type(tokenizer).__name__, body, str(tokenizer.eos_token_id)])[:16]


def get_tokenizer(
    name_or_path: str | None = None,
    *,
    documents: Callable[[], Iterable[str]] | Iterable[str] | None = None,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    fingerprint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """A tokenizer by name/path, or a byte-level BPE trained on ``documents`` and cached.

    Args:
        name_or_path (`str`, *optional*): Hub name (e.g. ``"t5-base"``) or local folder; when given the other
            arguments are ignored.
        documents (`Iterable[str]` or a callable returning one, *optional*): training text of the BPE. A
            callable is only called when the cache misses.
        vocab_size (`int`, *optional*, defaults to 4096), min_frequency (`int`, *optional*, defaults to 2).
        fingerprint (`str`, *optional*): identifies ``documents`` in the cache key; without it the BPE is
            trained every time.
        cache_dir (`str` or `PathLike`, *optional*): cache root; default :func:`default_cache_dir`.
    """
    from transformers import PreTrainedTokenizerFast

    if name_or_path:
        return load_tokenizer(name_or_path)
    if documents is None:
        raise ValueError("Pass a tokenizer name/path, or documents to train a byte-level BPE on.")
    folder = None
    if fingerprint is not None:
        key = sha256_hex([fingerprint, str(vocab_size), str(min_frequency), "bpe-v1"])[:16]
        folder = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"bpe{vocab_size}-{key}"
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(folder)
    text = documents() if callable(documents) else documents
    tokenizer = train_tokenizer(text, vocab_size, min_frequency=min_frequency)
    if folder is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, folder)  # atomic; if another process got there first, keep its copy
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def check_vocab_fits(tokenizer: Any, vocab_size: int) -> None:
    """Raise a ``ValueError`` if the tokenizer can emit ids >= the model's ``vocab_size``."""
    needed = len(tokenizer)
    if needed > vocab_size:
        raise ValueError(
            f"The tokenizer has {needed} tokens but the model's vocab_size is {vocab_size}: token ids would "
            f"index past the embedding table. Set --vocab_size {needed} (or larger), leave it unset to use "
            "the tokenizer's size, or use a smaller tokenizer (--tokenizer_vocab_size)."
        )
