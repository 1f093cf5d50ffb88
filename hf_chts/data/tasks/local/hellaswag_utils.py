"""HellaSwag preprocessing for ``hellaswag_local`` (original jsonl -> query / choices / gold)."""

from __future__ import annotations

import re


def _clean(text: str) -> str:
    # WikiHow items carry "[title]"-style markers; drop them the way the standard zero-shot setup does.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _to_mc(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": _clean(doc["activity_label"] + ": " + ctx),
        "choices": [_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def process_docs(dataset):
    """Map every document of a ``datasets.Dataset`` to ``{"query", "choices", "gold"}``."""
    return dataset.map(_to_mc)
