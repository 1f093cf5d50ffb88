"""Tests of hf_chts.data: embedded corpus, local files, Hub streaming (mocked), tokenizer, packing, errors."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
import torch

from hf_chts import data
from hf_chts.data import (
    PackedDataset,
    StreamingPackedDataset,
    build_stdlib_corpus,
    check_vocab_fits,
    embedded_corpus,
    get_tokenizer,
    is_validation_document,
    load_lm_data,
    pack_tokens,
    read_documents,
    resolve_source,
    split_documents,
    tokenize_documents,
    train_tokenizer,
)

SMALL_MODULES = ["json", "textwrap", "string", "shlex", "fnmatch", "bisect", "heapq", "calendar", "csv"]


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    return build_stdlib_corpus(modules=SMALL_MODULES)


@pytest.fixture(scope="module")
def tokenizer(small_corpus):
    return train_tokenizer(small_corpus, vocab_size=400)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    # one cache per test session, shared by test_data.py and test_recipe.py: the corpus is built once
    path = tmp_path_factory.getbasetemp() / "hf_chts_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def full_corpus(cache_dir) -> dict[str, list[str]]:
    return embedded_corpus(cache_dir)


# ------------------------------------------------------------------------------------------- embedded corpus
def test_stdlib_corpus_is_deterministic_clean_and_deduplicated(small_corpus):
    again = build_stdlib_corpus(modules=SMALL_MODULES)
    assert again == small_corpus
    assert len(small_corpus) > 50
    assert len(set(small_corpus)) == len(small_corpus)
    for doc in small_corpus:
        assert len(doc) >= 40
        assert "  " not in doc and "\n\n" not in doc and doc == doc.strip()
    # real prose from the modules' docstrings, e.g. json's module docstring
    assert any("JSON" in doc for doc in small_corpus)


def test_stdlib_corpus_skips_tests_and_gui_packages():
    assert build_stdlib_corpus(modules=["test", "idlelib", "tkinter", "encodings"]) == []


def test_embedded_corpus_size_split_and_cache(full_corpus, cache_dir, monkeypatch):
    train, validation = full_corpus["train"], full_corpus["validation"]
    n_docs = len(train) + len(validation)
    n_bytes = sum(len(d.encode()) for d in train + validation)
    assert n_docs > 3000 and n_bytes > 1_000_000
    assert 0.02 < len(validation) / n_docs < 0.08
    assert not set(train) & set(validation)
    assert all(is_validation_document(d) for d in validation)
    assert not any(is_validation_document(d) for d in train)
    cached = list((cache_dir / "corpus").glob("stdlib-py*.json"))
    assert len(cached) == 1
    # the second call reads the cache: building again would fail here
    monkeypatch.setattr(data, "build_stdlib_corpus", lambda *a, **k: pytest.fail("cache not used"))
    start = time.perf_counter()
    assert embedded_corpus(cache_dir) == full_corpus
    assert time.perf_counter() - start < 5


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_CHTS_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_CHTS_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "hf_chts"


def test_split_is_by_content_not_order():
    docs = [f"document number {i} with some words" for i in range(400)]
    train, val = split_documents(docs)
    train_rev, val_rev = split_documents(docs[::-1])
    assert set(train) == set(train_rev) and set(val) == set(val_rev)
    assert 0 < len(val) < 60
    assert split_documents(docs, 0.0) == (docs, [])


# ------------------------------------------------------------------------------------------- local files
def _write_local_files(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("First paragraph\nstill first.\n\n\nSecond paragraph.\n")
    with gzip.open(root / "sub" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "From gzip jsonl.", "id": 1}) + "\n\n")
        f.write(json.dumps({"body": "   ", "id": 2}) + "\n")
        f.write(json.dumps({"body": "Second record.", "id": 3}) + "\n")
    with gzip.open(root / "c.txt.gz", "wt") as f:
        f.write("Gzipped text.")
    (root / "ignored.csv").write_text("x,y\n")


def test_read_local_txt_jsonl_gz_and_folder(tmp_path):
    _write_local_files(tmp_path)
    assert list(read_documents(tmp_path / "a.txt")) == ["First paragraph\nstill first.", "Second paragraph."]
    assert list(read_documents(tmp_path / "c.txt.gz")) == ["Gzipped text."]
    assert list(read_documents(tmp_path / "sub" / "b.jsonl.gz", text_field="body")) == [
        "From gzip jsonl.",
        "Second record.",
    ]
    # a folder: every data file below it, sorted by relative path
    assert list(read_documents(tmp_path, text_field="body")) == [
        "First paragraph\nstill first.",
        "Second paragraph.",
        "Gzipped text.",
        "From gzip jsonl.",
        "Second record.",
    ]


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list(read_documents(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ValueError, match=r"line 2: no field 'text' \(found \['content'\]\).*--text_field"):
        list(read_documents(bad))
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        list(read_documents(bad))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no data files"):
        list(read_documents(tmp_path / "empty_dir"))


def test_resolve_source(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    assert resolve_source(None) == ("embedded", None)
    assert resolve_source("stdlib") == ("embedded", None)
    assert resolve_source(str(tmp_path / "x.txt")) == ("local", str(tmp_path / "x.txt"))
    assert resolve_source("allenai/c4") == ("hub", "allenai/c4")
    for missing in ("data/missing.jsonl", "./nowhere", str(tmp_path / "nope"), "corpus.txt.gz"):
        with pytest.raises(FileNotFoundError, match="not found"):
            resolve_source(missing)


# ------------------------------------------------------------------------------------------- tokenizer
def test_trained_tokenizer_specials_roundtrip_and_save_load(tokenizer, small_corpus, tmp_path):
    from transformers import AutoTokenizer

    assert len(tokenizer) == 400
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
    )
    assert tokenizer.unk_token_id == 0 and len({tokenizer.bos_token_id, tokenizer.eos_token_id}) == 2
    text = "Héllo wörld — bytes 🙂 " + small_corpus[0]
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id not in ids  # nothing added automatically; packing adds eos
    assert tokenizer.decode(ids) == text  # byte-level: lossless
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded(text)["input_ids"] == ids
    assert loaded.eos_token == "</s>" and loaded.pad_token == "<pad>"


def test_tokenizer_training_is_deterministic_and_cached(small_corpus, tmp_path):
    first = get_tokenizer(documents=small_corpus, vocab_size=300, fingerprint="abc", cache_dir=tmp_path)
    folders = list((tmp_path / "tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    # a cache hit never calls the document factory
    second = get_tokenizer(
        documents=lambda: pytest.fail("retrained"), vocab_size=300, fingerprint="abc", cache_dir=tmp_path
    )
    assert second.get_vocab() == first.get_vocab()
    assert train_tokenizer(small_corpus, 300).get_vocab() == first.get_vocab()


def test_tokenizer_and_vocab_errors(tokenizer):
    with pytest.raises(ValueError, match="tokenizer_vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)
    check_vocab_fits(tokenizer, 400)
    with pytest.raises(ValueError, match=r"400 tokens but the model's vocab_size is 399.*--vocab_size 400"):
        check_vocab_fits(tokenizer, 399)


# ------------------------------------------------------------------------------------------- packing
def test_tokenize_and_pack(tokenizer):
    docs = ["alpha beta gamma", "delta"]
    stream = tokenize_documents(docs, tokenizer, batch_size=1)
    eos = tokenizer.eos_token_id
    first = tokenizer(docs[0], add_special_tokens=False)["input_ids"]
    second = tokenizer(docs[1], add_special_tokens=False)["input_ids"]
    assert stream.tolist() == first + [eos] + second + [eos]
    blocks = pack_tokens(list(range(10)), 4)
    assert blocks.dtype == torch.long and blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_tokens([1, 2, 3], 4).shape == (0, 4)
    with pytest.raises(ValueError, match="max_seq_length"):
        pack_tokens([1, 2], 1)
    ds = PackedDataset(blocks)
    assert len(ds) == 2 and ds.num_tokens == 8
    assert torch.equal(ds[1]["input_ids"], ds[1]["labels"])


def test_streaming_packing_matches_materialised(tokenizer, small_corpus):
    docs = small_corpus[:60]
    expected = pack_tokens(tokenize_documents(docs, tokenizer), 32)
    streamed = list(StreamingPackedDataset(lambda: iter(docs), tokenizer, 32, batch_size=7))
    assert len(streamed) == expected.shape[0]
    assert torch.equal(torch.stack([b["input_ids"] for b in streamed]), expected)
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in streamed)


# ------------------------------------------------------------------------------------------- load_lm_data
def test_load_lm_data_local_jsonl(small_corpus, tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"content": d}) + "\n" for d in small_corpus))
    lm = load_lm_data(
        str(path), text_field="content", tokenizer_vocab_size=300, max_seq_length=64, cache_dir=tmp_path / "c"
    )
    assert isinstance(lm.train_dataset, PackedDataset)
    item = lm.train_dataset[0]
    assert item["input_ids"].shape == (64,) and torch.equal(item["input_ids"], item["labels"])
    assert len(lm.eval_dataset) >= 1 and lm.eval_dataset[0]["input_ids"].shape == (64,)
    assert lm.info["source"] == "local" and lm.info["vocab_size"] == 300 == len(lm.tokenizer)
    assert lm.info["train_documents"] + lm.info["validation_documents"] == len(small_corpus)
    assert int(lm.train_dataset.blocks.max()) < 300
    # cached token streams: a second call gives the same blocks
    again = load_lm_data(
        str(path), text_field="content", tokenizer_vocab_size=300, max_seq_length=64, cache_dir=tmp_path / "c"
    )
    assert torch.equal(again.train_dataset.blocks, lm.train_dataset.blocks)
    assert len(list((tmp_path / "c" / "tokens").glob("*.npy"))) == 2
    capped = load_lm_data(
        str(path),
        text_field="content",
        tokenizer_vocab_size=300,
        max_seq_length=64,
        max_eval_samples=1,
        cache_dir=tmp_path / "c",
    )
    assert len(capped.eval_dataset) == 1


def test_load_lm_data_small_text_holds_out_blocks(small_corpus, tmp_path):
    # one document: the hash split puts it on one side; validation falls back to the last training blocks
    path = tmp_path / "one.txt"
    path.write_text(" ".join(small_corpus[:20]).replace("\n", " "))
    lm = load_lm_data(str(path), tokenizer_vocab_size=300, max_seq_length=32, cache_dir=tmp_path / "c")
    assert len(lm.train_dataset) >= 1 and len(lm.eval_dataset) >= 1


def test_load_lm_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lm_data(str(tmp_path / "missing.jsonl"), cache_dir=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="is empty"):
        load_lm_data(str(empty), cache_dir=tmp_path)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    with pytest.raises(ValueError, match="too few|fewer than"):
        load_lm_data(str(tiny), tokenizer_vocab_size=300, max_seq_length=256, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_seq_length"):
        load_lm_data(str(tiny), max_seq_length=1, cache_dir=tmp_path)


def test_load_lm_data_hub_streaming_is_mocked(small_corpus, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        docs = small_corpus if split == "train" else small_corpus[:10]
        return iter([{"text": d, "url": "x"} for d in docs])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    lm = load_lm_data(
        "someone/corpus",
        dataset_config="en",
        validation_split="validation",
        tokenizer_vocab_size=300,
        tokenizer_train_documents=50,
        max_seq_length=32,
        max_eval_samples=3,
        cache_dir=tmp_path,
    )
    assert ("someone/corpus", "en", "train", True) in calls
    assert ("someone/corpus", "en", "validation", True) in calls
    assert isinstance(lm.train_dataset, StreamingPackedDataset)
    assert len(lm.eval_dataset) == 3
    first = next(iter(lm.train_dataset))
    assert first["input_ids"].shape == (32,)
    assert lm.info["source"] == "hub" and len(lm.tokenizer) == 300

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter([{"content": "x"}]))
    with pytest.raises(ValueError, match="no column 'text'"):
        load_lm_data("someone/other", tokenizer_vocab_size=300, max_seq_length=32, cache_dir=tmp_path)
