"""Training text for the recipes: the embedded corpus, local files, Hub streaming, tokenizers and packing.

Everything the default recipe needs works offline on any machine with Python installed:

- the **embedded corpus** is built from the docstrings of the installed Python standard library (parsed with
  ``ast``, never imported) plus the language-reference topics of ``pydoc_data`` -- real English prose of a
  few MB, with a fixed train/validation split by a hash of each document;
- the **default tokenizer** is a byte-level BPE trained locally on the training text with ``tokenizers``;
- **packing** concatenates the tokenised documents, each followed by ``eos``, and cuts the stream into
  blocks of ``max_seq_length`` tokens (``labels = input_ids``; the model shifts them).

Local text (``.txt``, ``.jsonl``, either ``.gz``-compressed, or a folder of them) and Hub datasets (streamed
with ``datasets.load_dataset(..., streaming=True)``, e.g. ``allenai/c4``) use the same packing. Corpora,
tokenizers and packed token streams are cached under ``$HF_CHTS_CACHE`` (default ``~/.cache/hf_chts``).

Example:
    >>> from hf_chts.data import load_lm_data
    >>> data = load_lm_data(max_seq_length=128)  # embedded corpus + a 4096-token BPE trained on it
    >>> data.train_dataset[0]["input_ids"].shape
    torch.Size([128])
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_CORPUS",
    "LMData",
    "PackedDataset",
    "StreamingPackedDataset",
    "build_stdlib_corpus",
    "check_vocab_fits",
    "default_cache_dir",
    "embedded_corpus",
    "get_tokenizer",
    "hub_documents",
    "is_validation_document",
    "load_lm_data",
    "load_tokenizer",
    "pack_tokens",
    "read_documents",
    "resolve_source",
    "split_documents",
    "tokenize_documents",
    "tokenizer_fingerprint",
    "train_tokenizer",
]

EMBEDDED_CORPUS = "stdlib"
"""Name of the embedded corpus (``dataset=None`` or ``dataset="stdlib"``)."""

CORPUS_VERSION = 1
"""Bumped whenever the corpus builder changes, so stale caches are never reused."""

DEFAULT_VALIDATION_FRACTION = 0.05
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
DATA_SUFFIXES = (".txt", ".jsonl", ".json")

# Parts of the standard library whose docstrings are not prose worth learning from (tests, GUI demos,
# codec tables, vendored tools) or that are not importable stdlib at all.
_SKIPPED_PACKAGES = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "encodings",
        "lib2to3",
        "ensurepip",
        "pydoc_data",  # read separately: its topics are a dict of strings, not docstrings
        "site-packages",
        "dist-packages",
        "__pycache__",
        "__phello__",
    }
)
_MIN_DOC_CHARS = 40
_HASH_BUCKETS = 10_000


# ----------------------------------------------------------------------------------------------- utilities
def default_cache_dir() -> Path:
    """The cache root: ``$HF_CHTS_CACHE`` if set, else ``~/.cache/hf_chts``."""
    env = os.environ.get("HF_CHTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_chts"


def _sha256(parts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write through a temporary file in the same folder, so concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace inside each paragraph; paragraphs (blank-line separated) are kept one per line."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n".join(p for p in paragraphs if p)


def is_validation_document(text: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION) -> bool:
    """Whether ``text`` belongs to the validation split: a stable hash of the text, independent of order.

    The same document always lands on the same side, whatever else is in the corpus and on every machine.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"`validation_fraction` must be in [0, 1), got {validation_fraction}.")
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return bucket % _HASH_BUCKETS < round(validation_fraction * _HASH_BUCKETS)


def split_documents(
    documents: Iterable[str], validation_fraction: float = DEFAULT_VALIDATION_FRACTION
) -> tuple[list[str], list[str]]:
    """Split documents into ``(train, validation)`` by :func:`is_validation_document`, keeping their order."""
    train, validation = [], []
    for doc in documents:
        (validation if is_validation_document(doc, validation_fraction) else train).append(doc)
    return train, validation


# ------------------------------------------------------------------------------------------ embedded corpus
def _stdlib_python_files(stdlib_dir: Path, modules: Iterable[str] | None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path (a deterministic order)."""
    names = set(modules) if modules is not None else set(sys.stdlib_module_names)
    files = []
    for path in stdlib_dir.rglob("*.py"):
        parts = path.relative_to(stdlib_dir).parts
        top = parts[0][:-3] if len(parts) == 1 else parts[0]
        if top not in names or any(p in _SKIPPED_PACKAGES or p.startswith("test") for p in parts[:-1]):
            continue
        if parts[-1].startswith("test_") or top in _SKIPPED_PACKAGES:
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(stdlib_dir).as_posix())


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings in source order, including definitions nested in statements."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler)):  # e.g. defs under `if sys.platform ...:`
            yield from _docstrings(child)


def _pydoc_topics(stdlib_dir: Path) -> list[str]:
    """The language-reference topics shipped in ``pydoc_data/topics.py`` (absent on some distributions)."""
    path = stdlib_dir / "pydoc_data" / "topics.py"
    if not path.is_file():
        return []
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            try:
                topics = ast.literal_eval(node.value)
            except ValueError:
                return []
            return [topics[key] for key in sorted(topics) if isinstance(topics[key], str)]
    return []


def build_stdlib_corpus(
    stdlib_dir: str | os.PathLike | None = None, modules: Iterable[str] | None = None
) -> list[str]:
    """Build the embedded corpus: the installed standard library's docstrings, deduplicated, in a fixed order.

    The files are parsed with ``ast`` (nothing is imported). Tests, GUI code, codec tables and vendored tools
    are skipped; whitespace is normalised (:func:`normalize_whitespace`); documents shorter than 40 characters
    are dropped; exact duplicates are kept once (first occurrence). The ``pydoc_data`` language-reference
    topics are appended when the full standard library is read.

    Args:
        stdlib_dir (`str` or `PathLike`, *optional*): the standard library folder; default
            ``sysconfig.get_paths()["stdlib"]``.
        modules (`Iterable[str]`, *optional*): top-level module names to read; default
            ``sys.stdlib_module_names``.

    Returns:
        `list[str]`: the documents.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"Standard-library folder not found: {root}.")
    documents, seen = [], set()

    def add(raw: str) -> None:
        text = normalize_whitespace(raw)
        if len(text) >= _MIN_DOC_CHARS and text not in seen:
            seen.add(text)
            documents.append(text)

    for path in _stdlib_python_files(root, modules):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # e.g. files kept only for other Python versions
            continue
        for doc in _docstrings(tree):
            add(doc)
    if modules is None:
        for topic in _pydoc_topics(root):
            add(topic)
    return documents


def embedded_corpus(
    cache_dir: str | os.PathLike | None = None, *, rebuild: bool = False
) -> dict[str, list[str]]:
    """The embedded corpus split into ``{"train": [...], "validation": [...]}``, cached on first use.

    The split is fixed: a document is in the validation split iff :func:`is_validation_document` says so
    (5% of the documents). The cache file is keyed by the Python version and :data:`CORPUS_VERSION`.

    Args:
        cache_dir (`str` or `PathLike`, *optional*): cache root; default :func:`default_cache_dir`.
        rebuild (`bool`, *optional*, defaults to `False`): ignore an existing cache file.
    """
    version = "{}.{}.{}".format(*sys.version_info[:3])
    path = Path(cache_dir or default_cache_dir()) / "corpus" / f"stdlib-py{version}-v{CORPUS_VERSION}.json"
    if path.is_file() and not rebuild:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            return {"train": cached["train"], "validation": cached["validation"]}
        except (json.JSONDecodeError, KeyError):
            logger.warning("Ignoring a damaged corpus cache %s; rebuilding it.", path)
    documents = build_stdlib_corpus()
    if not documents:
        raise ValueError(
            "The embedded corpus is empty: no standard-library docstrings were found under "
            f"{sysconfig.get_paths()['stdlib']}. Pass a local text file or a Hub dataset instead (--dataset)."
        )
    train, validation = split_documents(documents)
    payload = {
        "version": CORPUS_VERSION,
        "python": version,
        "num_documents": len(documents),
        "num_bytes": sum(len(d.encode("utf-8")) for d in documents),
        "train": train,
        "validation": validation,
    }
    _atomic_write_bytes(path, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    return {"train": train, "validation": validation}


# ------------------------------------------------------------------------------------------------ local text
def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and _base_suffix(p) in DATA_SUFFIXES),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise ValueError(
            f"The folder {path} holds no data files; expected files ending in "
            f"{', '.join(DATA_SUFFIXES)} (optionally .gz)."
        )
    return files


def read_documents(path: str | os.PathLike, *, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a local file or folder, in a fixed order.

    - ``.txt``: documents are separated by blank lines (a file without blank lines is one document);
    - ``.jsonl`` / ``.json`` (JSON Lines): one object per line, the text in ``text_field``;
    - any of them ``.gz``-compressed; a folder: every such file below it, sorted by path.

    Args:
        path (`str` or `PathLike`): a file or a folder.
        text_field (`str`, *optional*, defaults to `"text"`): the JSON key holding the text.

    Raises:
        FileNotFoundError: the path does not exist. ValueError: unknown suffix, bad JSON, missing field.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Data file or folder not found: {path}. Check the path passed as --dataset.")
    for file in _data_files(path):
        suffix = _base_suffix(file)
        if suffix == ".txt":
            yield from _read_txt(file)
        elif suffix in (".jsonl", ".json"):
            yield from _read_jsonl(file, text_field)
        else:
            raise ValueError(
                f"Unsupported data file {file}: expected a name ending in {', '.join(DATA_SUFFIXES)} "
                "(optionally .gz), or a folder of such files."
            )


def _read_txt(file: Path) -> Iterator[str]:
    paragraph: list[str] = []
    with _open_text(file) as handle:
        for line in handle:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).strip()
                paragraph = []
    if paragraph:
        yield "".join(paragraph).strip()


def _read_jsonl(file: Path, text_field: str) -> Iterator[str]:
    with _open_text(file) as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file}, line {lineno}: not valid JSON ({err.msg}); expected JSON Lines."
                ) from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{file}, line {lineno}: no field {text_field!r} (found {keys}); set --text_field to the "
                    "key that holds the text."
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{file}, line {lineno}: field {text_field!r} is {type(text).__name__}, not text."
                )
            if text.strip():
                yield text


# ------------------------------------------------------------------------------------------------ Hub data
def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Reading a Hub dataset needs the `datasets` library: pip install datasets") from err
    return datasets


def hub_documents(
    name: str,
    config: str | None = None,
    *,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = True,
) -> Iterator[str]:
    """Yield the texts of a Hub dataset split, streamed by default (``datasets.load_dataset``).

    Args:
        name (`str`): dataset repository, e.g. ``"allenai/c4"``.
        config (`str`, *optional*): configuration, e.g. ``"en"``.
        split (`str`, *optional*, defaults to `"train"`): the split to read.
        text_field (`str`, *optional*, defaults to `"text"`): the column holding the text.
        streaming (`bool`, *optional*, defaults to `True`): stream instead of downloading the split.
    """
    datasets = _require_datasets()
    dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    for index, record in enumerate(dataset):
        if text_field not in record:
            raise ValueError(
                f"Dataset {name!r} (config {config!r}, split {split!r}) has no column {text_field!r}; "
                f"columns: {sorted(record)}. Set --text_field."
            )
        text = record[text_field]
        if isinstance(text, str) and text.strip():
            yield text
        elif index == 0 and not isinstance(text, str):
            raise ValueError(f"Column {text_field!r} of {name!r} holds {type(text).__name__}, not text.")


# ------------------------------------------------------------------------------------------------ tokenizers
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
    return _sha256([type(tokenizer).__name__, body, str(tokenizer.eos_token_id)])[:16]


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
        key = _sha256([fingerprint, str(vocab_size), str(min_frequency), "bpe-v1"])[:16]
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


# ------------------------------------------------------------------------------------------------ packing
def tokenize_documents(documents: Iterable[str], tokenizer: Any, *, batch_size: int = 1000) -> np.ndarray:
    """Tokenise documents in batches and concatenate them, each followed by ``eos``, into one int32 stream."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no eos token; packing separates documents with it.")
    pieces: list[np.ndarray] = []
    for batch in _batched(documents, batch_size):
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            pieces.append(np.asarray(ids, dtype=np.int32))
            pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def pack_tokens(tokens: np.ndarray | torch.Tensor, max_seq_length: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``(n_blocks, max_seq_length)`` int64 blocks, dropping the remainder."""
    if not isinstance(max_seq_length, int) or max_seq_length < 2:
        raise ValueError(f"`max_seq_length` must be an integer >= 2, got {max_seq_length!r}.")
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n_blocks = tokens.numel() // max_seq_length
    return tokens[: n_blocks * max_seq_length].reshape(n_blocks, max_seq_length)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length blocks of a packed token stream; item ``i`` is ``{"input_ids", "labels"}`` (equal).

    Args:
        blocks (`torch.Tensor` of shape `(n_blocks, seq_len)`): token ids.

    Example:
        >>> ds = PackedDataset(torch.arange(8).reshape(2, 4))
        >>> ds[1]["labels"].tolist()
        [4, 5, 6, 7]
    """

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"`blocks` must be 2-D (n_blocks, seq_len), got shape {tuple(blocks.shape)}.")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Pack a (possibly endless) stream of documents on the fly into ``max_seq_length`` blocks.

    Used for streamed Hub datasets. Each pass calls ``documents()`` again; with several dataloader workers
    each worker packs every ``num_workers``-th document.

    Args:
        documents (`Callable[[], Iterable[str]]`): returns a fresh iterator of texts.
        tokenizer: a tokenizer with an eos token.
        max_seq_length (`int`): block length.
        batch_size (`int`, *optional*, defaults to 1000): documents tokenised at once.
    """

    def __init__(
        self, documents: Callable[[], Iterable[str]], tokenizer: Any, max_seq_length: int, batch_size=1000
    ):
        pack_tokens(np.zeros(0, dtype=np.int32), max_seq_length)  # validates max_seq_length
        self.documents, self.tokenizer = documents, tokenizer
        self.max_seq_length, self.batch_size = max_seq_length, batch_size

    def _my_documents(self) -> Iterator[str]:
        info = torch.utils.data.get_worker_info()
        for index, doc in enumerate(self.documents()):
            if info is None or index % info.num_workers == info.id:
                yield doc

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        buffer = np.zeros(0, dtype=np.int32)
        for batch in _batched(self._my_documents(), self.batch_size):
            buffer = np.concatenate(
                [buffer, tokenize_documents(batch, self.tokenizer, batch_size=self.batch_size)]
            )
            blocks = pack_tokens(buffer, self.max_seq_length)
            buffer = buffer[blocks.numel() :]
            for ids in blocks:
                yield {"input_ids": ids, "labels": ids.clone()}


def _cached_token_stream(
    documents: list[str], tokenizer: Any, cache_dir: str | os.PathLike | None, tag: str
) -> np.ndarray:
    key = _sha256([_sha256(documents), tokenizer_fingerprint(tokenizer), "tokens-v1"])[:20]
    path = Path(cache_dir or default_cache_dir()) / "tokens" / f"{tag}-{key}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            logger.warning("Ignoring a damaged token cache %s.", path)
    tokens = tokenize_documents(documents, tokenizer)
    buffer = io.BytesIO()
    np.save(buffer, tokens)
    _atomic_write_bytes(path, buffer.getvalue())
    return tokens


# ------------------------------------------------------------------------------------------------ one call
@dataclass
class LMData:
    """What :func:`load_lm_data` returns: datasets ready for ``Trainer``, the tokenizer, and a summary."""

    train_dataset: torch.utils.data.Dataset
    eval_dataset: PackedDataset
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


def resolve_source(dataset: str | None) -> tuple[str, str | None]:
    """Classify ``dataset`` as ``("embedded", None)``, ``("local", path)`` or ``("hub", name)``.

    An existing path is local; a name with a data-file suffix or starting with ``/``, ``.`` or ``~`` that
    does not exist raises ``FileNotFoundError``; anything else is taken as a Hub dataset name.
    """
    if dataset is None or dataset in ("", EMBEDDED_CORPUS):
        return "embedded", None
    path = Path(dataset).expanduser()
    if path.exists():
        return "local", str(path)
    looks_local = dataset.startswith(("/", ".", "~")) or _base_suffix(path) in DATA_SUFFIXES
    if looks_local or dataset.endswith(".gz") or dataset.count("/") > 1:
        raise FileNotFoundError(
            f"Data file or folder not found: {dataset}. Pass an existing .txt/.jsonl file (optionally .gz) "
            "or folder, a Hub dataset name such as allenai/c4, or nothing for the embedded corpus."
        )
    return "hub", dataset


def load_lm_data(
    dataset: str | None = None,
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
    cache_dir: str | os.PathLike | None = None,
) -> LMData:
    """Load text, get a tokenizer and pack both splits into ``max_seq_length`` blocks.

    Args:
        dataset (`str`, *optional*): ``None`` / ``"stdlib"`` = the embedded corpus; a local file or folder
            (see :func:`read_documents`); or a Hub dataset name (streamed unless ``streaming=False``).
        dataset_config (`str`, *optional*): Hub configuration (``"en"`` for C4).
        text_field (`str`, *optional*, defaults to `"text"`): JSON key / dataset column of the text.
        validation_file (`str`, *optional*): local validation text; default: a hash split of ``dataset``.
        validation_split (`str`, *optional*): Hub split used for validation (``"validation"`` for C4);
            default: the documents of the train split that :func:`is_validation_document` picks.
        validation_fraction (`float`, *optional*, defaults to 0.05): share of documents held out by hash.
        streaming (`bool`, *optional*): stream Hub data (default for Hub names); ignored for local data.
        tokenizer_name (`str`, *optional*): Hub name or local path; default: a byte-level BPE trained here.
        tokenizer_vocab_size (`int`, *optional*, defaults to 4096): size of the BPE trained here.
        tokenizer_train_documents (`int`, *optional*, defaults to 100000): documents of a streamed dataset the
            BPE is trained on.
        max_seq_length (`int`, *optional*, defaults to 256): block length.
        max_eval_samples (`int`, *optional*): keep only the first blocks of the validation split.
        cache_dir (`str` or `PathLike`, *optional*): cache root; default :func:`default_cache_dir`.

    Raises:
        FileNotFoundError: a local file is missing. ValueError: empty corpus, corpus shorter than one block,
            bad arguments.
    """
    pack_tokens(np.zeros(0, dtype=np.int32), max_seq_length)  # validates max_seq_length early
    if max_eval_samples is not None and max_eval_samples < 1:
        raise ValueError(f"`max_eval_samples` must be >= 1, got {max_eval_samples}.")
    kind, where = resolve_source(dataset)
    if validation_file is not None and not Path(validation_file).expanduser().exists():
        raise FileNotFoundError(f"Validation file not found: {validation_file}.")
    if kind == "hub" and streaming is not False:
        return _load_streaming(
            where,
            dataset_config=dataset_config,
            text_field=text_field,
            validation_file=validation_file,
            validation_split=validation_split,
            validation_fraction=validation_fraction,
            tokenizer_name=tokenizer_name,
            tokenizer_vocab_size=tokenizer_vocab_size,
            tokenizer_train_documents=tokenizer_train_documents,
            max_seq_length=max_seq_length,
            max_eval_samples=max_eval_samples or 1000,
            cache_dir=cache_dir,
        )

    # ---- materialised text: embedded corpus, local files, or a (small) Hub split downloaded in full
    if kind == "embedded":
        corpus = embedded_corpus(cache_dir)
        train_docs, val_docs = corpus["train"], corpus["validation"]
        description = "embedded corpus (Python standard-library docstrings)"
    else:
        if kind == "local":
            docs = list(read_documents(where, text_field=text_field))
        else:
            docs = list(hub_documents(where, dataset_config, text_field=text_field, streaming=False))
        if not docs:
            raise ValueError(f"The dataset {dataset} is empty: no non-blank text was found in it.")
        if validation_file is not None:
            train_docs, val_docs = docs, list(read_documents(validation_file, text_field=text_field))
        elif kind == "hub" and validation_split:
            train_docs = docs
            val_docs = list(
                hub_documents(
                    where, dataset_config, split=validation_split, text_field=text_field, streaming=False
                )
            )
        else:
            train_docs, val_docs = split_documents(docs, validation_fraction)
        description = f"{kind} dataset {dataset}"
    if not train_docs:
        raise ValueError(
            f"The training split of {description} is empty; add text or lower --validation_fraction."
        )

    train_fp = _sha256(train_docs)
    tokenizer = get_tokenizer(
        tokenizer_name,
        documents=train_docs,
        vocab_size=tokenizer_vocab_size,
        fingerprint=train_fp,
        cache_dir=cache_dir,
    )
    train_tokens = _cached_token_stream(train_docs, tokenizer, cache_dir, "train")
    train_blocks = pack_tokens(train_tokens, max_seq_length)
    val_blocks = pack_tokens(
        _cached_token_stream(val_docs, tokenizer, cache_dir, "validation"), max_seq_length
    )
    if val_blocks.shape[0] == 0:
        # Too little held-out text for one block: hold out the last blocks of the training stream instead.
        n_val = max(1, math.ceil(validation_fraction * train_blocks.shape[0]))
        if train_blocks.shape[0] - n_val < 1:
            raise ValueError(
                f"{description} has {train_tokens.size} tokens, too few for one training and one validation "
                f"block of max_seq_length={max_seq_length}; add text or lower --max_seq_length."
            )
        logger.warning(
            "Validation text shorter than one block; holding out the last %d training blocks.", n_val
        )
        train_blocks, val_blocks = train_blocks[:-n_val], train_blocks[-n_val:]
    if train_blocks.shape[0] == 0:
        raise ValueError(
            f"{description} has {train_tokens.size} training tokens, fewer than "
            f"max_seq_length={max_seq_length}; add text or lower --max_seq_length."
        )
    if max_eval_samples is not None:
        val_blocks = val_blocks[:max_eval_samples]
    info = {
        "dataset": dataset or EMBEDDED_CORPUS,
        "source": kind,
        "description": description,
        "train_documents": len(train_docs),
        "validation_documents": len(val_docs),
        "train_tokens": int(train_blocks.numel()),
        "train_blocks": int(train_blocks.shape[0]),
        "eval_blocks": int(val_blocks.shape[0]),
        "max_seq_length": max_seq_length,
        "tokenizer": tokenizer_name
        or f"byte-level BPE ({len(tokenizer)} tokens) trained on the training split",
        "vocab_size": len(tokenizer),
    }
    return LMData(PackedDataset(train_blocks), PackedDataset(val_blocks), tokenizer, info)


def _load_streaming(
    name: str,
    *,
    dataset_config: str | None,
    text_field: str,
    validation_file: str | None,
    validation_split: str | None,
    validation_fraction: float,
    tokenizer_name: str | None,
    tokenizer_vocab_size: int,
    tokenizer_train_documents: int,
    max_seq_length: int,
    max_eval_samples: int,
    cache_dir: str | os.PathLike | None,
) -> LMData:
    import itertools

    holdout = validation_file is None and not validation_split

    def train_documents() -> Iterator[str]:
        docs = hub_documents(name, dataset_config, split="train", text_field=text_field)
        if holdout:  # the held-out documents never reach training
            return (d for d in docs if not is_validation_document(d, validation_fraction))
        return docs

    def validation_documents() -> Iterator[str]:
        if validation_file is not None:
            return read_documents(validation_file, text_field=text_field)
        if validation_split:
            return hub_documents(name, dataset_config, split=validation_split, text_field=text_field)
        docs = hub_documents(name, dataset_config, split="train", text_field=text_field)
        return (d for d in docs if is_validation_document(d, validation_fraction))

    fingerprint = _sha256([name, str(dataset_config), text_field, str(tokenizer_train_documents), "stream"])
    tokenizer = get_tokenizer(
        tokenizer_name,
        documents=lambda: itertools.islice(train_documents(), tokenizer_train_documents),
        vocab_size=tokenizer_vocab_size,
        fingerprint=fingerprint,
        cache_dir=cache_dir,
    )
    # The validation blocks are materialised (a fixed set for comparable perplexities).
    blocks = list(
        itertools.islice(
            StreamingPackedDataset(validation_documents, tokenizer, max_seq_length), max_eval_samples
        )
    )
    if not blocks:
        raise ValueError(
            f"The validation text of {name!r} is shorter than one block of max_seq_length={max_seq_length}."
        )
    val_blocks = torch.stack([b["input_ids"] for b in blocks])
    info = {
        "dataset": name,
        "source": "hub",
        "dataset_config": dataset_config,
        "description": f"Hub dataset {name} ({dataset_config or 'default'}), streamed",
        "validation": validation_split
        or validation_file
        or f"hash hold-out {validation_fraction:.0%} of train",
        "eval_blocks": int(val_blocks.shape[0]),
        "max_seq_length": max_seq_length,
        "tokenizer": tokenizer_name
        or f"byte-level BPE ({len(tokenizer)} tokens) trained on the first "
        f"{tokenizer_train_documents} training documents",
        "vocab_size": len(tokenizer),
    }
    train = StreamingPackedDataset(train_documents, tokenizer, max_seq_length)
    return LMData(train, PackedDataset(val_blocks), tokenizer, info)
