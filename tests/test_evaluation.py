"""Zero-shot evaluation through lm-eval on offline tasks (shipped tiny task, local llm-foundry files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _io_helpers import make_sparse_llama, make_tokenizer

pytest.importorskip("lm_eval")

from hf_chts.evaluation import (  # noqa: E402
    PAPER_TASKS,
    available_local_tasks,
    evaluate,
    local_tasks,
    packaged_tasks,
    resolve_tasks,
    results_to_markdown,
)

STAGED = Path("/work/shared/data/lm_eval")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer()
    return make_sparse_llama(vocab_size=len(tokenizer)), tokenizer


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def icl_dir(tmp_path):
    """A folder in the staged formats: llm-foundry ICL jsonl and original HellaSwag."""
    data = tmp_path / "icl"
    (data / "sub").mkdir(parents=True)
    mc = [
        {"query": f"Question: item {i}?", "choices": ["yes", "no", "maybe"], "gold": i % 3} for i in range(4)
    ]
    write_jsonl(data / "arc_easy.jsonl", mc)
    write_jsonl(data / "sub" / "openbook_qa.jsonl", mc)
    write_jsonl(
        data / "winogrande.jsonl",
        [
            {"context_options": ["Tom gave Ann", "Ann gave Tom"], "continuation": "a book.", "gold": i % 2}
            for i in range(3)
        ],
    )
    write_jsonl(
        data / "hellaswag_small.jsonl",
        [
            {
                "activity_label": "Baking",
                "ctx_a": "A man mixes flour [title] and water.",
                "ctx_b": "he",
                "endings": ["bakes bread.", "swims.", "flies.", "sings."],
                "label": 0,
            }
        ],
    )
    write_jsonl(data / "lambada_openai.jsonl", [{"context": "The cat sat on the", "continuation": "mat"}])
    return data


def test_shipped_task_definitions():
    assert "hf_chts_tiny_mc" in packaged_tasks()
    rows = [
        json.loads(line) for line in (packaged_tasks()["hf_chts_tiny_mc"] / "hf_chts_tiny_mc.jsonl").open()
    ]
    assert len(rows) == 20
    assert all(0 <= r["gold"] < len(r["choices"]) for r in rows)
    tasks = local_tasks()
    assert {t.alias for t in tasks.values()} >= {"arc_easy", "arc_challenge", "piqa", "boolq", "hellaswag"}
    assert {t.alias for t in tasks.values()} >= {"winogrande", "openbookqa"}
    assert tasks["openbookqa_local"].patterns == ("openbook_qa.jsonl", "openbookqa.jsonl")


def test_evaluate_tiny_task_offline(tiny, tmp_path):
    model, tokenizer = tiny
    results = evaluate(
        model,
        tokenizer,
        tasks="hf_chts_tiny_mc",
        output_dir=tmp_path,
        include_lm_eval_tasks=False,
        batch_size=4,
    )
    row = results["results"]["hf_chts_tiny_mc"]
    assert row["n_samples"] == 20
    assert 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["acc_norm"] <= 1.0
    assert row["acc_stderr"] is not None
    saved = json.loads((tmp_path / "zero_shot_results.json").read_text())
    assert saved["results"] == results["results"]
    assert saved["config"]["tasks"] == ["hf_chts_tiny_mc"] and saved["config"]["num_fewshot"] == 0
    md = (tmp_path / "zero_shot_results.md").read_text()
    assert md.startswith("| task | n | acc | acc_norm |")
    assert f"| hf_chts_tiny_mc | 20 | {row['acc']:.4f} ± " in md


def test_unknown_task_fails_before_running(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError) as info:
        evaluate(model, tokenizer, tasks=["hf_chts_tiny_mcq", "arc_easy"], include_lm_eval_tasks=False)
    message = str(info.value)
    assert "'hf_chts_tiny_mcq'" in message and "did you mean hf_chts_tiny_mc" in message
    assert "arc_easy_local" in message and "arc_challenge" in message
    assert not (tmp_path / "zero_shot_results.json").exists()


def test_local_data_dir_maps_paper_names(tiny, icl_dir, tmp_path):
    found = available_local_tasks(icl_dir)
    assert set(found) == {
        "arc_easy_local",
        "openbookqa_local",
        "winogrande_local",
        "hellaswag_local",
        "lambada_openai_local",
    }
    assert found["openbookqa_local"] == icl_dir / "sub" / "openbook_qa.jsonl"
    names, _ = resolve_tasks(
        "arc_easy,winogrande", task_dir=tmp_path / "t", local_data_dir=icl_dir, include_lm_eval_tasks=False
    )
    assert names == ["arc_easy_local", "winogrande_local"]
    model, tokenizer = tiny
    results = evaluate(model, tokenizer, local_data_dir=icl_dir, include_lm_eval_tasks=False)
    rows = results["results"]
    assert set(rows) == set(found)
    assert rows["arc_easy_local"]["n_samples"] == 4 and rows["winogrande_local"]["n_samples"] == 3
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows.values())
    assert rows["lambada_openai_local"]["perplexity"] > 0
    assert "perplexity" in results_to_markdown(results)


def test_local_data_dir_without_files(tmp_path):
    with pytest.raises(ValueError, match="No local task data found"):
        resolve_tasks(None, task_dir=tmp_path / "t", local_data_dir=tmp_path, include_lm_eval_tasks=False)


@pytest.mark.slow
@pytest.mark.skipif(not STAGED.is_dir(), reason="staged real data not present")
def test_staged_real_data(tiny):
    """The shipped *_local definitions read the staged llm-foundry / HellaSwag files (3 items per task)."""
    model, tokenizer = tiny
    results = evaluate(
        model, tokenizer, tasks=list(PAPER_TASKS), local_data_dir=STAGED, limit=3, include_lm_eval_tasks=False
    )
    assert set(results["results"]) == {f"{t}_local" for t in PAPER_TASKS}
    assert all(r["n_samples"] == 3 for r in results["results"].values())


def test_results_to_markdown():
    results = {
        "results": {
            "a": {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25, "acc_norm_stderr": None, "n_samples": 8},
            "b": {"acc": 1.0, "n_samples": 2},
        }
    }
    assert results_to_markdown(results) == (
        "| task | n | acc | acc_norm |\n"
        "|---|---:|---:|---:|\n"
        "| a | 8 | 0.5000 ± 0.1000 | 0.2500 |\n"
        "| b | 2 | 1.0000 | - |\n"
    )


@pytest.mark.slow
def test_paper_tasks_resolve_through_lm_eval_index(tmp_path):
    names, manager = resolve_tasks(None, task_dir=tmp_path / "t")
    assert names == list(PAPER_TASKS)
    with pytest.raises(ValueError, match="did you mean arc_easy"):
        resolve_tasks(["arc_eazy"], task_dir=tmp_path / "u")


@pytest.mark.slow
def test_fully_offline_in_fresh_process(tmp_path):
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set before anything is imported: the local tasks still run."""
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from _io_helpers import make_sparse_llama, make_tokenizer\n"
        "from hf_chts.evaluation import evaluate\n"
        "tok = make_tokenizer(); model = make_sparse_llama(vocab_size=len(tok))\n"
        f"r = evaluate(model, tok, tasks='hf_chts_tiny_mc', limit=5, output_dir={str(tmp_path)!r})\n"
        "print(r['results']['hf_chts_tiny_mc']['acc'])\n"
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env["HF_DATASETS_CACHE"] = str(tmp_path / "cache")  # nothing cached beforehand
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.0 <= float(proc.stdout.strip().splitlines()[-1]) <= 1.0
    assert (tmp_path / "zero_shot_results.md").is_file()


def test_over_long_items_are_cut_and_counted_without_a_git_error(tiny, tmp_path, capfd, caplog):
    """A choice longer than the model's context (PIQA items against a 128-token model) is scored on its last
    max_length tokens and counted, instead of lm-eval's bare AssertionError; no stray git error line."""
    model, tokenizer = tiny
    data = tmp_path / "icl"
    data.mkdir()
    long_choice = " ".join(f"word{i}" for i in range(3 * model.config.max_position_embeddings))
    rows = [{"query": f"Question: item {i}?", "choices": ["yes", long_choice], "gold": 0} for i in range(3)]
    write_jsonl(data / "arc_easy.jsonl", rows)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` must not print its error
    try:
        with caplog.at_level("WARNING", logger="hf_chts.evaluation"):
            results = evaluate(
                model, tokenizer, tasks="arc_easy", local_data_dir=data, include_lm_eval_tasks=False
            )
    finally:
        os.chdir(cwd)
    assert [row["n_samples"] for row in results["results"].values()] == [3]
    assert results["config"]["truncated_continuations"] == 3
    assert "3 of 6 scored continuations" in caplog.text
    assert "fatal" not in capfd.readouterr().err
