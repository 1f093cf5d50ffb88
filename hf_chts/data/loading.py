"""Training text as ``datasets`` objects: the embedded corpus, local files, Hub datasets, or the user's own.

- local ``.txt`` (documents separated by blank lines: empty or whitespace-only, as WikiText's ``" \n"``),
  ``.jsonl`` / ``.json`` (JSON Lines, the text in ``text_field``; every record must have it), either
  ``.gz``-compressed, or a folder of such files: ``datasets.Dataset.from_generator`` over the text files
  (:func:`read_paragraphs`), ``datasets.load_dataset("json", data_files=...)``;
- a Hub dataset name: ``datasets.load_dataset(name, config, split=..., streaming=...)``;
- a ``datasets.Dataset`` or ``datasets.IterableDataset`` the user built: used as it is.

Every source comes back with its text column checked (a missing column names the columns there are) and
blank documents dropped.

Example:
    >>> from hf_chts.data import load_text_dataset
    >>> docs = load_text_dataset("corpus.jsonl.gz", text_field="body")  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .corpus import EMBEDDED_CORPUS, embedded_dataset

DATA_SUFFIXES = (".txt", ".jsonl", ".json")


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if _base_suffix(path) not in DATA_SUFFIXES:
            raise ValueError(
                f"Unsupported data file {path}: expected a name ending in {', '.join(DATA_SUFFIXES)} "
                "(optionally .gz), or a folder of such files."
            )
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


def _check_file(path: Path) -> None:
    """Refuse an empty file and a ``.gz`` name on a file that is not gzip-compressed, naming the file."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not head:
        raise ValueError(f"The data file {path} is empty; add text to it or remove it from the data.")
    if path.name.endswith(".gz") and head != b"\x1f\x8b":
        raise ValueError(
            f"The data file {path} is named .gz but is not gzip-compressed (it starts with {head!r}); "
            "compress it with gzip, or drop the .gz from its name if it is plain text."
        )


def read_paragraphs(files: list[str], text_field: str = "text") -> Iterator[dict[str, str]]:
    """The documents of plain-text files (``.gz`` read decompressed), one ``{text_field: text}`` each.

    A document is a run of lines up to a blank line: empty or whitespace-only (WikiText's ``" \n"`` lines
    and a file's trailing spaces count as blank), stripped of the whitespace around it.
    """
    for file in files:
        opener = gzip.open if file.endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8") as handle:
            lines: list[str] = []
            for line in handle:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield {text_field: "".join(lines).strip()}
                    lines = []
            if lines:
                yield {text_field: "".join(lines).strip()}


def _read_text_files(group: list[str], text_field: str, folder: str, streaming: bool) -> Any:
    import datasets

    features = datasets.Features({text_field: datasets.Value("string")})
    # the sizes and times are part of the cache fingerprint: an edited file is read again
    stamps = [(os.path.getsize(f), os.path.getmtime(f)) for f in group]
    kwargs = {"files": group, "text_field": text_field}
    if streaming:
        return datasets.IterableDataset.from_generator(read_paragraphs, features=features, gen_kwargs=kwargs)
    if next(read_paragraphs(group, text_field), None) is None:  # only blank lines: no document at all
        return datasets.Dataset.from_dict({text_field: []}, features=features)
    return datasets.Dataset.from_generator(
        read_paragraphs,
        features=features,
        gen_kwargs=kwargs,
        cache_dir=folder,
        fingerprint=_stamp(kwargs, stamps),
    )


def _stamp(kwargs: dict[str, Any], stamps: list[tuple[int, float]]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([kwargs, stamps]).encode()).hexdigest()[:32]


def _check_records(part: Any, text_field: str, group: list[str]) -> None:
    """Refuse JSON records without the text field (they would silently drop out of the training data)."""
    missing = part.data.column(text_field).null_count  # counted by Arrow, no text is read
    if missing:
        raise ValueError(
            f"{missing} of {len(part)} records in {group} have no {text_field!r} field (or null); training "
            f"would silently skip them. Give every record a {text_field!r} string, remove those records, or "
            "set --text_field (`text_field=`) to the field every record has."
        )


def is_dataset(obj: Any) -> bool:
    """Whether ``obj`` is a ``datasets.Dataset`` or ``datasets.IterableDataset``."""
    import sys

    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(obj, (datasets.Dataset, datasets.IterableDataset))


def resolve_source(dataset: Any) -> tuple[str, Any]:
    """Classify ``dataset`` as ``("embedded", None)``, ``("local", path)``, ``("hub", name)`` or
    ``("dataset", the object)``.

    An existing path is local; a name with a data-file suffix or starting with ``/``, ``.`` or ``~`` that
    does not exist raises ``FileNotFoundError``; any other string is taken as a Hub dataset name.
    """
    if is_dataset(dataset):
        return "dataset", dataset
    if dataset is None or dataset in ("", EMBEDDED_CORPUS):
        return "embedded", None
    if not isinstance(dataset, (str, os.PathLike)):
        raise ValueError(
            "`dataset` must be a path, a Hub dataset name, a datasets.Dataset / IterableDataset or None, "
            f"got {type(dataset).__name__}."
        )
    dataset = str(dataset)
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


def column_names(dataset: Any) -> list[str]:
    """The columns of a dataset; for a stream with unknown features, the keys of its first example."""
    names = dataset.column_names
    if names is None:
        first = next(iter(dataset.take(1)), None)
        names = sorted(first) if first is not None else []
    return list(names)


def check_text_field(dataset: Any, text_field: str, description: str) -> None:
    """Raise a ``ValueError`` naming the available columns when ``text_field`` is missing or not text."""
    names = column_names(dataset)
    if text_field not in names:
        raise ValueError(
            f"{description} has no text field {text_field!r}; its fields are {names}. Set --text_field "
            "(`text_field=`) to the one that holds the text."
        )
    features = dataset.features
    feature = features.get(text_field) if features is not None else None
    dtype = getattr(feature, "dtype", None)
    if feature is not None and dtype not in ("string", "large_string"):
        raise ValueError(
            f"Field {text_field!r} of {description} holds {feature}, not text; set --text_field to a column "
            "of strings."
        )


def _keep_text(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def load_text_dataset(
    source: Any = None,
    *,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """The documents of ``source`` as a ``datasets.Dataset`` (or ``IterableDataset`` when streaming).

    Args:
        source: ``None`` / ``"stdlib"`` (the embedded corpus), a local file or folder, a Hub dataset name, or
            a ``datasets.Dataset`` / ``IterableDataset``.
        config (`str`, *optional*): Hub configuration (``"en"`` for C4).
        split (`str`, *optional*, defaults to `"train"`): split of a Hub dataset or of the embedded corpus.
        text_field (`str`, *optional*, defaults to `"text"`): the column (JSON key) holding the text.
        streaming (`bool`, *optional*, defaults to `False`): return an ``IterableDataset`` read lazily.
        cache_dir (`str` or `PathLike`, *optional*): cache root (the ``datasets`` cache is
            ``<cache_dir>/datasets``); default :func:`~hf_chts.data.corpus.default_cache_dir`.

    Raises:
        FileNotFoundError: a local path is missing. ValueError: no such text field (the fields are named),
            a non-text field, unreadable files.
    """
    import datasets

    from .corpus import default_cache_dir

    kind, where = resolve_source(source)
    folder = str(Path(cache_dir or default_cache_dir()) / "datasets")
    if kind == "embedded":
        ds = embedded_dataset(cache_dir)[split]
        return ds.to_iterable_dataset() if streaming else ds
    if kind == "dataset":
        ds, description = where, f"The given {type(where).__name__}"
    elif kind == "local":
        files = _data_files(Path(where))
        for file in files:
            _check_file(file)
        description = f"The local data {where}"
        parts = []
        for builder, suffixes in (("text", (".txt",)), ("json", (".jsonl", ".json"))):
            group = [str(f) for f in files if _base_suffix(f) in suffixes]
            if not group:
                continue
            try:
                if builder == "text":
                    part = _read_text_files(group, text_field, folder, streaming)
                else:
                    part = datasets.load_dataset(
                        builder, data_files=group, split="train", cache_dir=folder, streaming=streaming
                    )
            except (datasets.exceptions.DatasetGenerationError, OSError, EOFError, StopIteration) as err:
                cause = err.__cause__ or err
                raise ValueError(
                    f"Could not read {group}: {cause}. Expected JSON Lines (one object per line) for "
                    ".jsonl/.json and UTF-8 text for .txt (gzip-compressed when named .gz)."
                ) from err
            check_text_field(part, text_field, f"The local data {group}")
            part = part.select_columns([text_field])
            if builder == "json" and not streaming:
                _check_records(part, text_field, group)
            parts.append(part)
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    else:
        description = f"The Hub dataset {where!r} (config {config!r}, split {split!r})"
        ds = datasets.load_dataset(where, config, split=split, streaming=streaming)
    check_text_field(ds, text_field, description)
    return ds.filter(_keep_text, input_columns=[text_field])
