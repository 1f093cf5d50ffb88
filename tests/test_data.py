"""Tests of hf_chts.data: embedded corpus, local files and user datasets through `datasets`, Hub (mocked),
tokenizer, packing with Dataset.map, streaming under several processes, errors. Offline."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from hf_chts.data import (
    build_stdlib_corpus,
    check_vocab_fits,
    collate_blocks,
    corpus,
    default_cache_dir,
    embedded_dataset,
    get_tokenizer,
    is_validation_document,
    load_lm_data,
    load_text_dataset,
    pack_dataset,
    pack_tokens,
    packing,
    resolve_source,
    split_documents,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
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


def reference_blocks(docs, tokenizer, max_seq_length: int) -> torch.Tensor:
    """The packing before `datasets`: tokenise, append eos, concatenate everything, cut into blocks."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"] if len(docs) else []
    stream = np.concatenate([np.asarray([*x, eos], dtype=np.int64) for x in ids]) if ids else np.zeros(0)
    return pack_tokens(stream, max_seq_length)


def blocks_of(dataset) -> torch.Tensor:
    rows = [torch.as_tensor(row["input_ids"]) for row in dataset]
    return torch.stack(rows) if rows else torch.zeros(0, dtype=torch.long)


# ------------------------------------------------------------------------------------------- embedded corpus
def test_stdlib_corpus_is_deterministic_clean_and_deduplicated(small_corpus):
    again = build_stdlib_corpus(modules=SMALL_MODULES)
    assert again == small_corpus
    assert len(small_corpus) > 50
    assert len(set(small_corpus)) == len(small_corpus)
    for doc in small_corpus:
        assert len(doc) >= 40
        assert "  " not in doc and "\n\n" not in doc and doc == doc.strip()
    assert any("JSON" in doc for doc in small_corpus)  # real prose, e.g. json's module docstring


def test_stdlib_corpus_skips_tests_and_gui_packages():
    assert build_stdlib_corpus(modules=["test", "idlelib", "tkinter", "encodings"]) == []


def test_embedded_dataset_size_split_and_cache(cache_dir, monkeypatch):
    corpus_dict = embedded_dataset(cache_dir)
    train, validation = corpus_dict["train"]["text"], corpus_dict["validation"]["text"]
    train, validation = list(train), list(validation)
    n_docs = len(train) + len(validation)
    assert n_docs > 3000 and sum(len(d.encode()) for d in train + validation) > 1_000_000
    assert 0.02 < len(validation) / n_docs < 0.08
    assert not set(train) & set(validation)
    assert all(is_validation_document(d) for d in validation)
    assert not any(is_validation_document(d) for d in train)
    # The second call memory-maps the Arrow files: building the corpus again would fail here.
    corpus._stdlib_documents.cache_clear()
    monkeypatch.setattr(corpus, "build_stdlib_corpus", lambda *a, **k: pytest.fail("cache not used"))
    start = time.perf_counter()
    again = embedded_dataset(cache_dir)
    assert list(again["train"]["text"]) == train and time.perf_counter() - start < 5
    assert again["train"]._fingerprint == corpus_dict["train"]._fingerprint


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_CHTS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_CHTS_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "hf_chts"


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


def texts(dataset, field: str = "text") -> list[str]:
    return [row[field] for row in dataset]


def test_load_local_txt_jsonl_gz_and_folder(tmp_path):
    cache, tmp_path = tmp_path / "cache", tmp_path / "data"
    _write_local_files(tmp_path)
    assert texts(load_text_dataset(str(tmp_path / "a.txt"), cache_dir=cache)) == [
        "First paragraph\nstill first.",
        "Second paragraph.",
    ]
    assert texts(load_text_dataset(str(tmp_path / "c.txt.gz"), cache_dir=cache)) == ["Gzipped text."]
    jsonl = load_text_dataset(str(tmp_path / "sub" / "b.jsonl.gz"), text_field="body", cache_dir=cache)
    assert isinstance(jsonl, datasets.Dataset) and jsonl.column_names == ["body"]
    assert texts(jsonl, "body") == ["From gzip jsonl.", "Second record."]
    # a folder: the text files, then the JSON Lines files, each sorted by relative path
    folder = load_text_dataset(str(tmp_path), text_field="body", cache_dir=cache)
    assert texts(folder, "body") == [
        "First paragraph\nstill first.",
        "Second paragraph.",
        "Gzipped text.",
        "From gzip jsonl.",
        "Second record.",
    ]
    streamed = load_text_dataset(str(tmp_path / "a.txt"), streaming=True, cache_dir=cache)
    assert isinstance(streamed, datasets.IterableDataset)
    assert texts(streamed) == ["First paragraph\nstill first.", "Second paragraph."]


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_dataset(str(tmp_path / "missing.txt"), cache_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field", "id": 1}\n')
    with pytest.raises(
        ValueError, match=r"no text field 'text'; its fields are \['content', 'id'\].*--text_field"
    ):
        load_text_dataset(str(bad), cache_dir=tmp_path / "c1")
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"Could not read .*bad\.jsonl"):
        load_text_dataset(str(bad), cache_dir=tmp_path / "c2")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="not text"):
        load_text_dataset(str(numbers), cache_dir=tmp_path / "c3")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no data files"):
        load_text_dataset(str(tmp_path / "empty_dir"), cache_dir=tmp_path)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(ValueError, match="Unsupported data file"):
        load_text_dataset(str(tmp_path / "x.csv"), cache_dir=tmp_path)


def test_whitespace_only_lines_separate_documents(tmp_path):
    # WikiText's " \n" separator lines: one document per paragraph, never the whole file as one
    lines = []
    for i in range(20):
        lines += [f" = Heading {i} = ", " ", f" Sentence one of doc {i}. ", " Sentence two. ", " "]
    (tmp_path / "wiki.txt").write_text("\n".join(lines) + "\n")
    docs = texts(load_text_dataset(str(tmp_path / "wiki.txt"), cache_dir=tmp_path / "c"))
    assert len(docs) == 40
    assert docs[:2] == ["= Heading 0 =", "Sentence one of doc 0. \n Sentence two."]
    streamed = load_text_dataset(str(tmp_path / "wiki.txt"), streaming=True, cache_dir=tmp_path / "c")
    assert texts(streamed) == docs
    # one sentence per line, separated by whitespace-only lines: each sentence a document
    (tmp_path / "sentences.txt").write_text("".join(f"Sentence {i} of the corpus.\n\t \n" for i in range(30)))
    data = load_lm_data(
        str(tmp_path / "sentences.txt"), tokenizer_vocab_size=300, max_seq_length=8, cache_dir=tmp_path / "c"
    )
    assert len(data.train_dataset) > 0


def test_broken_local_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.txt").write_text("")
    for name in ("empty.jsonl", "empty.txt"):
        with pytest.raises(ValueError, match=rf"{name} is empty; add text"):
            load_text_dataset(str(tmp_path / name), cache_dir=tmp_path / "c")
    (tmp_path / "random.jsonl.gz").write_bytes(bytes(range(7, 250)))
    with pytest.raises(ValueError, match=r"random\.jsonl\.gz is named \.gz but is not gzip-compressed"):
        load_text_dataset(str(tmp_path / "random.jsonl.gz"), cache_dir=tmp_path / "c")
    half = tmp_path / "half.jsonl"
    half.write_text(
        "".join(json.dumps({"text": f"doc {i}"} if i % 2 == 0 else {"body": "x"}) + "\n" for i in range(60))
    )
    with pytest.raises(ValueError, match=r"30 of 60 records in .*half\.jsonl.* have no 'text' field"):
        load_text_dataset(str(half), cache_dir=tmp_path / "c")


def test_resolve_source(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    assert resolve_source(None) == ("embedded", None)
    assert resolve_source("stdlib") == ("embedded", None)
    assert resolve_source(str(tmp_path / "x.txt")) == ("local", str(tmp_path / "x.txt"))
    assert resolve_source("allenai/c4") == ("hub", "allenai/c4")
    user = datasets.Dataset.from_dict({"text": ["a"]})
    assert resolve_source(user) == ("dataset", user)
    for missing in ("data/missing.jsonl", "./nowhere", str(tmp_path / "nope"), "corpus.txt.gz"):
        with pytest.raises(FileNotFoundError, match="not found"):
            resolve_source(missing)
    with pytest.raises(ValueError, match="got list"):
        resolve_source(["a"])


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
    second = get_tokenizer(  # a cache hit never calls the document factory
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
def test_pack_tokens_and_collate():
    blocks = pack_tokens(list(range(10)), 4)
    assert blocks.dtype == torch.long and blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert pack_tokens([1, 2, 3], 4).shape == (0, 4)
    with pytest.raises(ValueError, match="max_seq_length"):
        pack_tokens([1, 2], 1)
    batch = collate_blocks([{"input_ids": torch.tensor([1, 2])}, {"input_ids": [3, 4]}])
    assert batch["input_ids"].tolist() == [[1, 2], [3, 4]] and torch.equal(
        batch["labels"], batch["input_ids"]
    )
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_pack_dataset_equals_packing_the_whole_stream(tokenizer, small_corpus, batch_size):
    docs = datasets.Dataset.from_dict({"text": small_corpus[:60]})
    packed = pack_dataset(docs, tokenizer, 32, batch_size=batch_size)
    expected = reference_blocks(small_corpus[:60], tokenizer, 32)
    assert packed.column_names == ["input_ids"] and len(packed) == expected.shape[0] > 10
    assert torch.equal(packed[:]["input_ids"], expected)  # the remainder is carried across map batches


def test_pack_iterable_dataset_packs_each_batch(tokenizer, small_corpus):
    docs = small_corpus[:60]
    stream = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset()
    whole = blocks_of(pack_dataset(stream, tokenizer, 32, batch_size=1000))
    assert torch.equal(whole, reference_blocks(docs, tokenizer, 32))
    per_batch = blocks_of(pack_dataset(stream, tokenizer, 32, batch_size=20))
    expected = torch.cat([reference_blocks(docs[i : i + 20], tokenizer, 32) for i in range(0, 60, 20)])
    assert torch.equal(per_batch, expected)


def test_embedded_corpus_blocks_are_those_of_the_whole_stream(cache_dir):
    """The `datasets` pipeline reproduces the packing of the hand-written one on the embedded corpus."""
    lm = load_lm_data(max_seq_length=128, tokenizer_vocab_size=4096, cache_dir=cache_dir)
    corpus_dict = embedded_dataset(cache_dir)
    for split, packed in (("train", lm.train_dataset), ("validation", lm.eval_dataset)):
        expected = reference_blocks(list(corpus_dict[split]["text"]), lm.tokenizer, 128)
        assert torch.equal(packed[:]["input_ids"], expected), split
    assert lm.info["train_blocks"] == len(lm.train_dataset) > 3000


# ------------------------------------------------------------------------------------------- load_lm_data
def test_load_lm_data_local_jsonl_and_the_map_cache(small_corpus, tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"content": d, "n": i}) + "\n" for i, d in enumerate(small_corpus)))
    kwargs = dict(text_field="content", tokenizer_vocab_size=300, max_seq_length=64, cache_dir=tmp_path / "c")
    lm = load_lm_data(str(path), **kwargs)
    assert isinstance(lm.train_dataset, datasets.Dataset)
    item = lm.train_dataset[0]
    assert item["input_ids"].shape == (64,) and item["input_ids"].dtype == torch.int64
    batch = lm.data_collator([lm.train_dataset[0], lm.train_dataset[1]])
    assert batch["input_ids"].shape == (2, 64) and torch.equal(batch["labels"], batch["input_ids"])
    assert len(lm.eval_dataset) >= 1 and lm.info["source"] == "local"
    assert lm.info["vocab_size"] == 300 == len(lm.tokenizer)
    assert lm.info["train_documents"] + lm.info["validation_documents"] == len(small_corpus)
    assert int(lm.train_dataset[:]["input_ids"].max()) < 300
    train_docs = [d for d in small_corpus if not is_validation_document(d)]
    assert torch.equal(lm.train_dataset[:]["input_ids"], reference_blocks(train_docs, lm.tokenizer, 64))
    # A second call reads the packed blocks from the Dataset.map cache: tokenising again would fail here.
    monkeypatch.setattr(packing, "_tokenize", lambda *a, **k: pytest.fail("tokenised again"))
    again = load_lm_data(str(path), **kwargs)
    assert torch.equal(again.train_dataset[:]["input_ids"], lm.train_dataset[:]["input_ids"])
    capped = load_lm_data(str(path), max_eval_samples=1, **kwargs)
    assert len(capped.eval_dataset) == 1


def test_load_lm_data_takes_a_users_dataset(small_corpus, tmp_path):
    user = datasets.Dataset.from_dict({"body": small_corpus, "id": list(range(len(small_corpus)))})
    lm = load_lm_data(
        user, text_field="body", tokenizer_vocab_size=300, max_seq_length=64, cache_dir=tmp_path
    )
    train_docs = [d for d in small_corpus if not is_validation_document(d)]
    assert torch.equal(lm.train_dataset[:]["input_ids"], reference_blocks(train_docs, lm.tokenizer, 64))
    assert lm.info["source"] == "dataset"
    with pytest.raises(ValueError, match=r"no text field 'text'; its fields are \['body', 'id'\]"):
        load_lm_data(user, tokenizer_vocab_size=300, max_seq_length=64, cache_dir=tmp_path)


def test_load_lm_data_takes_a_users_iterable_dataset(small_corpus, tmp_path):
    stream = datasets.Dataset.from_dict({"text": small_corpus}).to_iterable_dataset(num_shards=2)
    lm = load_lm_data(
        stream, tokenizer_vocab_size=300, max_seq_length=32, max_eval_samples=3, cache_dir=tmp_path
    )
    assert isinstance(lm.train_dataset, datasets.IterableDataset)
    assert len(lm.eval_dataset) == 3 and lm.eval_dataset[0]["input_ids"].shape == (32,)
    first = next(iter(lm.train_dataset))
    assert len(first["input_ids"]) == 32


def test_split_by_node_gives_disjoint_shards_and_refuses_an_empty_one(small_corpus, tmp_path):
    docs = [f"[doc {i}] {d}" for i, d in enumerate(small_corpus)]  # every block unique
    stream = datasets.Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=4)
    kwargs = dict(tokenizer_vocab_size=300, max_seq_length=32, split_by_node=True, cache_dir=tmp_path)
    ranks = [load_lm_data(stream, rank=r, world_size=2, **kwargs) for r in range(2)]
    blocks = [{tuple(row["input_ids"].tolist()) for row in lm.train_dataset} for lm in ranks]
    assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]
    single = load_lm_data(stream, **{**kwargs, "split_by_node": False})
    assert len(blocks[0]) + len(blocks[1]) >= 0.95 * sum(1 for _ in single.train_dataset)
    assert "process 1 of 2" in ranks[1].info["description"]
    one = datasets.Dataset.from_dict({"text": docs[:1] * 1}).to_iterable_dataset()
    (tmp_path / "val.txt").write_text(" ".join(docs[:20]))
    kwargs.update(max_seq_length=8, validation_file=str(tmp_path / "val.txt"))
    assert len(load_lm_data(one, rank=0, world_size=2, **kwargs).eval_dataset) > 0
    with pytest.raises(
        ValueError, match=r"process 1 of 2; the stream has 1 file shards\) yields no block.*fewer"
    ):
        load_lm_data(one, rank=1, world_size=2, **kwargs)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        load_lm_data(stream, rank=2, world_size=2, **kwargs)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_read_disjoint_shards(small_corpus, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"[doc {i}] {d}"}) + "\n" for i, d in enumerate(small_corpus))
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "scripts" / "dist_data.py"), str(path), str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    got = [json.loads((tmp_path / f"blocks_rank{r}.json").read_text()) for r in range(2)]
    assert [g["rank"] for g in got] == [0, 1] and all(g["world_size"] == 2 for g in got)
    shards = [{tuple(b) for b in g["blocks"]} for g in got]
    assert shards[0] and shards[1] and not shards[0] & shards[1]


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
    with pytest.raises(ValueError, match="too few|fewer"):
        load_lm_data(str(tiny), tokenizer_vocab_size=300, max_seq_length=256, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_seq_length"):
        load_lm_data(str(tiny), max_seq_length=1, cache_dir=tmp_path)


def test_load_lm_data_hub_streaming_is_mocked(small_corpus, tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming, **kwargs):
        calls.append((name, config, split, streaming))
        docs = small_corpus if split == "train" else small_corpus[:10]
        return datasets.Dataset.from_dict({"text": docs, "url": ["x"] * len(docs)}).to_iterable_dataset()

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
    assert isinstance(lm.train_dataset, datasets.IterableDataset)
    assert len(lm.eval_dataset) == 3
    assert len(next(iter(lm.train_dataset))["input_ids"]) == 32
    assert lm.info["source"] == "hub" and len(lm.tokenizer) == 300

    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.Dataset.from_dict({"content": ["x"], "id": [1]}).to_iterable_dataset(),
    )
    with pytest.raises(ValueError, match=r"no text field 'text'; its fields are \['content', 'id'\]"):
        load_lm_data("someone/other", tokenizer_vocab_size=300, max_seq_length=32, cache_dir=tmp_path)
