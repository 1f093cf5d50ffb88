"""The embedded default corpus (Python standard-library docstrings) as a ``datasets.DatasetDict``.

The corpus is built from the docstrings of the installed Python standard library (parsed with ``ast``, never
imported) plus the language-reference topics of ``pydoc_data``: real English prose of a few MB that every
machine with Python has, so the default recipe runs offline. Documents are split into train / validation by a
stable hash of their text (:func:`is_validation_document`). :func:`embedded_dataset` writes both splits once
with ``datasets.Dataset.from_generator`` (a fingerprint made of the Python version and
:data:`CORPUS_VERSION`), so later runs memory-map them and tokenisation is cached by ``Dataset.map``.

Example:
    >>> from hf_chts.data import embedded_dataset
    >>> corpus = embedded_dataset()  # doctest: +SKIP
    >>> corpus["train"][0]["text"][:40]  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EMBEDDED_CORPUS = "stdlib"
"""Name of the embedded corpus (``dataset=None`` or ``dataset="stdlib"``)."""

CORPUS_VERSION = 1
"""Bumped whenever the corpus builder changes, so stale caches are never reused."""

DEFAULT_VALIDATION_FRACTION = 0.05

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


def default_cache_dir() -> Path:
    """The cache root: ``$HF_CHTS_CACHE`` if set, else ``~/.cache/hf_chts``."""
    env = os.environ.get("HF_CHTS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hf_chts"


def sha256_hex(parts: Iterable[str]) -> str:
    """Hex SHA-256 of ``parts``, each followed by a NUL byte (so ``["ab", "c"]`` and ``["a", "bc"]`` differ).

    The cache fingerprints of the corpus, the trained tokenizer and the tokenized / packed datasets.

    Args:
        parts (`Iterable[str]`): the strings that identify a cached artefact, in order.

    Example:
        >>> sha256_hex(["stdlib", "1"])[:8] != sha256_hex(["stdlib1"])[:8]
        True
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


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


@functools.lru_cache(maxsize=1)
def _stdlib_documents() -> tuple[str, ...]:
    documents = build_stdlib_corpus()
    if not documents:
        raise ValueError(
            "The embedded corpus is empty: no standard-library docstrings were found under "
            f"{sysconfig.get_paths()['stdlib']}. Pass a local text file or a Hub dataset instead (--dataset)."
        )
    return tuple(documents)


def _embedded_rows(split: str, validation_fraction: float) -> Iterator[dict[str, str]]:
    train, validation = split_documents(_stdlib_documents(), validation_fraction)
    for text in train if split == "train" else validation:
        yield {"text": text}


def embedded_dataset(
    cache_dir: str | os.PathLike | None = None,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> Any:
    """The embedded corpus as a ``datasets.DatasetDict`` with ``"train"`` and ``"validation"`` splits.

    Each split has one ``"text"`` column, documents in the order :func:`build_stdlib_corpus` gives. The
    first call builds the corpus and writes it under ``<cache_dir>/datasets``; later calls (any process)
    memory-map the Arrow files. The fingerprint of each split is fixed by the Python version,
    :data:`CORPUS_VERSION`, the split and ``validation_fraction``, so ``Dataset.map`` caches keyed on it are
    reused across runs.

    Args:
        cache_dir (`str` or `PathLike`, *optional*): cache root; default :func:`default_cache_dir`.
        validation_fraction (`float`, *optional*, defaults to 0.05): share of documents held out by hash.
    """
    import datasets

    is_validation_document("", validation_fraction)  # validates the fraction before any work
    version = "{}.{}.{}".format(*sys.version_info[:3])
    folder = str(Path(cache_dir or default_cache_dir()) / "datasets")
    features = datasets.Features({"text": datasets.Value("string")})
    splits = {}
    for split in ("train", "validation"):
        key = [EMBEDDED_CORPUS, version, str(CORPUS_VERSION), split, repr(validation_fraction)]
        splits[split] = datasets.Dataset.from_generator(
            _embedded_rows,
            features=features,
            gen_kwargs={"split": split, "validation_fraction": validation_fraction},
            cache_dir=folder,
            split=split,
            fingerprint=sha256_hex(key)[:16],
        )
    return datasets.DatasetDict(splits)
