"""benchmarks/reproduce.py and its package benchmarks/repro/: every experiment's smallest configuration runs a
few steps and reports.

The smoke scale trains tiny models for a few optimizer steps on the shared data when it is present (the
first lines / samples of it) and on synthetic data otherwise, so the benchmark scripts keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repro(reproduce):
    """The harness package (importable once the command-line script has put ``benchmarks/`` on the path)."""
    return importlib.import_module("repro")


@pytest.fixture(scope="module")
def smoke_results(repro, tmp_path_factory):
    """One sparse variant of every experiment (and the MLP's dense baseline), a few optimizer steps each."""
    results_dir = tmp_path_factory.mktemp("results")
    work_dir = tmp_path_factory.mktemp("work")
    paths = []
    for experiments, variants in (
        (["mlp_mnist"], ["dense", "chtss"]),
        (["llama_lm", "mt_multi30k"], ["chtss"]),
        (["brf_ablation"], ["er"]),
        (["mlp_mnist_research"], ["chts_research"]),
        (["llama_lm_research"], ["dense"]),
        (["mlp_mnist_paper"], ["set_ems"]),
    ):
        paths += repro.run_grid(
            experiments, variants, [0], "smoke", repro.DEFAULT_DATA_DIR, work_dir, results_dir
        )
    return results_dir, paths


def test_registry_covers_the_issue(repro):
    exps = repro.EXPERIMENTS
    assert set(exps) == {
        "mlp_mnist",
        "mlp_mnist_long",
        "mlp_mnist_research",
        "mlp_mnist_paper",
        "llama_lm",
        "llama_lm_research",
        "brf_ablation",
        "mt_multi30k",
    }
    assert [v.name for v in exps["mlp_mnist_research"].variants] == [
        "dense",
        "set",
        "chts_research",
        "chts_brf",
    ]
    research = exps["llama_lm_research"]
    assert [research.variant(f"static_d{d}").flags["density"] for d in (0.1, 0.3, 0.5, 1)] == [
        0.1,
        0.3,
        0.5,
        1.0,
    ]
    hard = research.variant("chts_hard").flags  # the authors' LLaMA regrowth and its two controls
    assert (hard["regrowth_mode"], hard["ch_variant"], hard["chain_removal"]) == ("hard", "CH2_L3n", False)
    assert (
        research.variant("static_er").method == "static" and research.variant("chts_er").flags["init"] == "er"
    )
    assert exps["llama_lm_research"].seeds == (0, 1, 2)
    paper = exps["mlp_mnist_paper"]
    assert [v.name for v in paper.variants] == ["dense", "set", "set_ems", "rigl", "chts", "chts_research"]
    assert paper.seeds == (0, 1, 2) and paper.resumable
    assert paper.base["cpu"]["num_train_epochs"] == 100 and paper.base["cpu"]["update_interval"] == 1875
    assert paper.variant("set_ems").flags["density_schedule"] == "em_s"
    assert [v.method for v in exps["mlp_mnist"].variants] == ["dense", "set", "rigl", "cht", "chts", "chtss"]
    assert [v.method for v in exps["llama_lm"].variants][:8] == [
        "dense", "set", "rigl", "mest", "granet", "cht", "chts", "chtss"
    ]  # fmt: skip
    assert [v.flags.get("brf_r") for v in exps["brf_ablation"].variants] == [0.0, 0.3, 0.6, 1.0, None, None]
    assert [v.flags.get("init") for v in exps["brf_ablation"].variants][-2:] == ["er", "bsw"]
    assert {v.method for v in exps["mt_multi30k"].variants} == {"dense", "chtss", "set"}
    for exp in exps.values():  # one budget per experiment: no variant overrides the number of steps
        for variant in exp.variants:
            assert not {"max_steps", "num_train_epochs", "max_train_samples"} & set(variant.flags)


def test_unknown_names_fail_early(reproduce, repro, tmp_path):
    with pytest.raises(ValueError, match="Unknown variants"):
        repro.run_grid(["mlp_mnist"], ["nope"], [0], "smoke", tmp_path, tmp_path, tmp_path)
    with pytest.raises(SystemExit, match="Unknown experiment"):
        reproduce.main(["run", "--experiment", "nope", "--scale", "smoke"])


def test_script_pins_one_thread_before_torch_loads():
    """Run as a script, the entry point sets OMP/MKL_NUM_THREADS=1 before torch is imported (the in-process
    runs of --jobs 1 then get the subprocesses' single-thread pools); a value already set is kept."""
    code = (
        "import os, runpy, sys\n"
        "sys.argv = ['reproduce.py', 'list']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'benchmarks' / 'reproduce.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(os.environ['OMP_NUM_THREADS'], os.environ['MKL_NUM_THREADS'], 'torch' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "1 1 False"
    env["OMP_NUM_THREADS"] = "3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "3 1 False"


def test_smoke_runs_write_complete_records(repro, smoke_results):
    results_dir, paths = smoke_results
    assert [p.name for p in paths] == [
        "mlp_mnist__dense__s0__smoke.json",
        "mlp_mnist__chtss__s0__smoke.json",
        "llama_lm__chtss__s0__smoke.json",
        "mt_multi30k__chtss__s0__smoke.json",
        "brf_ablation__er__s0__smoke.json",
        "mlp_mnist_research__chts_research__s0__smoke.json",
        "llama_lm_research__dense__s0__smoke.json",
        "mlp_mnist_paper__set_ems__s0__smoke.json",
    ]
    for path in paths:
        record = json.loads(path.read_text())
        exp = repro.EXPERIMENTS[record["experiment"]]
        assert record["scale"] == "smoke" and record["seed"] == 0
        assert isinstance(record["metrics"][exp.metric], float)
        assert record["wall_time_seconds"] > 0
        assert record["hardware"]["cpu"] and record["hardware"]["torch_threads"] == 1
        assert "commit" in record["git"]
        assert record["config"]["recipe_argv"]
        assert record["trace"] and "density" in record["trace"][0]
        assert any("loss" in entry for entry in record["log_history"])
        if record["method"] == "dense":
            assert record["config"]["sparse_config"] is None
            assert record["metrics"]["density"] == 1.0
        else:
            sparse = record["config"]["sparse_config"]
            assert sparse["method"] == record["method"] and sparse["seed"] == 0
            assert record["metrics"]["density"] == pytest.approx(sparse["density"], abs=0.02)
            if record["variant"] == "er":
                assert sparse["init"] == "er"
            if record["method"] == "chtss":  # the density decays from 0.5 towards the target
                assert record["trace"][0]["density"] == pytest.approx(0.5, abs=0.02)
            if record["variant"] == "set_ems":  # SET with EM_S: starts at density + 0.05
                assert sparse["density_schedule"] == "em_s"
                assert record["trace"][0]["density"] == pytest.approx(sparse["density"] + 0.05, abs=0.002)
            if record["variant"] == "chts_research":  # CSTI, CH3-L3p, EM_S: starts at density + 0.05
                assert (sparse["init"], sparse["ch_variant"], sparse["density_schedule"]) == (
                    "csti",
                    "CH3_L3p",
                    "em_s",
                )
                assert record["trace"][0]["density"] == pytest.approx(sparse["density"] + 0.05, abs=0.002)
                assert record["metrics"]["best_test_accuracy"] >= record["metrics"]["test_accuracy"] - 1e-9


def test_report_renders_tables_and_plots(repro, smoke_results):
    results_dir, _ = smoke_results
    tables = repro.report(results_dir, "smoke")
    assert set(tables) == set(repro.EXPERIMENTS) - {"mlp_mnist_long"}  # same smoke run as mlp_mnist
    for name in tables:
        text = (results_dir / f"{repro.page_of(name)}.md").read_text()
        assert "| method |" in text and "## Commands" in text
        png = results_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlp_page = (results_dir / "mlp_mnist.md").read_text()
    assert "Dense" in mlp_page and not (results_dir / "mlp_mnist_research.md").exists()
    # the paper's budget first, the shorter budgets below it, labelled
    first_earlier = mlp_page.index("## Earlier results: MLP 784")
    assert (
        mlp_page.index("the paper's budget (100 epochs)")
        < first_earlier
        < mlp_page.index("research MLP recipe")
    )
    assert "best over epochs" in mlp_page
    for page in {repro.page_of(name) for name in tables}:  # one title per page, then its sections
        lines = (results_dir / f"{page}.md").read_text().splitlines()
        fenced = [i for i, line in enumerate(lines) if line.startswith("```")]
        in_code = {i for a, b in zip(fenced[::2], fenced[1::2], strict=True) for i in range(a, b)}
        titles = [line for i, line in enumerate(lines) if line.startswith("# ") and i not in in_code]
        assert lines[0].startswith("# ") and titles == [lines[0]], page
        assert "final final" not in "\n".join(lines).lower(), page
    # the bar chart's title says "final" once, whether the metric's label has it or not
    assert repro.final_label(repro.EXPERIMENTS["mlp_mnist_research"]) == "final test accuracy"
    assert repro.final_label(repro.EXPERIMENTS["llama_lm"]) == "final validation perplexity"
    assert "training tokens" in (results_dir / "llama_lm.md").read_text().split("Earlier results")[0]


def test_identical_variant_reuses_the_run(repro, smoke_results):
    results_dir, _ = smoke_results
    llama = json.loads((results_dir / "runs" / "llama_lm__chtss__s0__smoke.json").read_text())
    # pretend llama_lm's CHTs run exists: the ablation's BRF r=0.3 variant (the same config) reuses it
    llama.update(variant="chts", method="chts")
    (results_dir / "runs" / "llama_lm__chts__s0__smoke.json").write_text(json.dumps(llama))
    [path] = repro.run_grid(
        ["brf_ablation"], ["brf_r0.3"], [0], "smoke", repro.DEFAULT_DATA_DIR, results_dir, results_dir
    )
    record = json.loads(path.read_text())
    assert record["reused_from"] == "llama_lm__chts__s0__smoke.json"
    assert record["experiment"] == "brf_ablation" and record["variant"] == "brf_r0.3"


@pytest.mark.parametrize("method", ["dense", "chts"])
def test_llama_lr_schedules_come_from_the_recipe(repro, method):
    # llama_lm_research: the recipe's research schedule for every method (2 of every 20 steps re-warmed,
    # cosine floor 0.1); llama_lm / brf_ablation keep the earlier one (cosine to 0, re-warm-up after updates)
    recipe = repro.load_recipe("llama_pretrain")
    expected = {"llama_lm_research": ((20, 2), 0, "cosine_with_min_lr"), "llama_lm": (None, 5, "cosine")}
    for name, (cycle, after_updates, scheduler) in expected.items():
        flags = dict(repro.EXPERIMENTS[name].base["cpu"], method=method)
        _, _, sparse, _, training = recipe.parse_args(repro.llama_recipe_argv(flags))
        config = recipe.build_sparse_config(sparse, training)
        rewarmup = recipe.build_rewarmup(sparse, config)
        assert (rewarmup and (rewarmup.every, rewarmup.steps)) == cycle
        assert config is None or config.rewarmup_steps == after_updates
        assert training.lr_scheduler_type.value == scheduler
        assert training.lr_scheduler_kwargs == ({"min_lr_rate": 0.1} if cycle else {})


def _row(variant, values, density=0.3):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {"variant": variant, "label": variant, "seeds": list(range(len(values))), "values": values,
            "mean": mean, "std": std, "density": density}  # fmt: skip


def test_mlp_paper_verdict_counts_matching_dense_and_the_active_neurons(repro):
    # "matches or beats" dense: a gap within the seed spread counts for the claim; the verdict is about the
    # paper's recipe (CHTs research) only, and the active-neuron bound is one of its checks
    exp = repro.EXPERIMENTS["mlp_mnist_paper"]
    research = dict(_row("chts_research", [0.9858, 0.9860, 0.9859]), active_values=[0.17, 0.18, 0.17])
    research["active"] = (0.173, 0.006)
    rows = [
        _row("dense", [0.9858, 0.9861, 0.9856]),
        _row("set", [0.9819, 0.9821, 0.9815]),
        _row("set_ems", [0.9849, 0.9847, 0.9850]),
        _row("rigl", [0.9839, 0.9836, 0.9841]),
        _row("chts", [0.9800, 0.9801, 0.9799]),  # this library's preset: not the claim's variant
        research,
    ]
    checks = "\n".join(repro.claim_checks(exp, rows))
    assert "[dense] (dense): 0.9859 vs 0.9858, better by 0.0001 -> **matches**, as the claim allows" in checks
    assert "chts vs the best of [dense] (dense): 0.9800 vs 0.9858, worse by 0.0058 -> **disagrees**" in checks
    assert "leaves 0.173 ± 0.006 of the hidden neurons active" in checks
    assert "under 30% -> **agrees**" in checks
    (line,) = repro.claim_verdict(exp, rows)
    assert "for chts_research: **reproduced**" in line
    assert "of its 4 checks: 3 agrees, 1 matches, 0 disagrees" in line
    research["active_values"] = [0.17, 0.31, 0.17]
    assert "**not reproduced**" in repro.claim_verdict(exp, rows)[0]
    research["active_values"] = [0.17, 0.18, 0.17]
    rows[0] = _row("dense", [0.9859, 0.9861, 0.9860])  # within the spread, but better on every seed
    assert "**not resolved**" in repro.claim_verdict(exp, rows)[0]
    rows[0] = _row("dense", [0.9880, 0.9881, 0.9879])  # dense beyond the spread: no longer a match
    assert "**not reproduced**" in repro.claim_verdict(exp, rows)[0]
    assert "**matches**" not in "\n".join(repro.claim_checks(exp, rows))


def test_per_seed_table_lists_every_run(repro):
    exp = repro.EXPERIMENTS["mlp_mnist_paper"]
    runs = [
        {"variant": v, "seed": s, "wall_time_seconds": 600.4, "git": {"commit": "abcdef0123"},
         "metrics": {"test_accuracy": 0.98 + s / 1e4, "best_test_accuracy_after_t_end": 0.99,
                     "active_hidden_neurons": 0.2}}
        for v in ("dense", "chts_research") for s in (0, 1)
    ]  # fmt: skip
    lines = repro.per_seed_table(exp, runs).splitlines()
    assert len(lines) == 2 + 4
    expected = "| CHTs research (CSTI, CH3-L3p, EM_S) | 1 | 0.9801 | 0.9900 | 0.200 | 600 s | abcdef0 |"
    assert lines[-1] == expected


def test_verdict_and_static_ladder_lines(repro):
    exp = repro.EXPERIMENTS["llama_lm_research"]
    ladder = [_row(v, [p, p + 2, p + 4], d) for v, p, d in
              (("static_d0.1", 150, 0.1), ("static_d0.3", 180, 0.3), ("static_d0.5", 215, 0.5),
               ("static_d1", 260, 1.0))]  # fmt: skip
    dense = _row("dense", [262, 258, 266], 1.0)
    rivals = [_row(v, [200, 202, 204]) for v in ("set", "rigl", "mest", "granet", "cht")]
    # CHTs beats every rival beyond the seed spread, CHTss does not: not reproduced as a whole
    hard = _row("chts_hard", [171, 173, 175])  # the authors' LLaMA regrowth, a CHTs too
    rows = [dense, _row("chts", [170, 172, 174]), _row("chtss", [230, 232, 234]), *rivals, *ladder, hard]
    (line,) = repro.claim_verdict(exp, rows)
    assert "**not reproduced**" in line and "2 agrees, 1 disagrees" in line
    rows[2] = _row("chtss", [190, 192, 194])
    assert "**reproduced**" in repro.claim_verdict(exp, rows)[0]
    rows[2] = _row("chtss", [199, 203, 201])  # within the seed spread
    assert "**not resolved**" in repro.claim_verdict(exp, rows)[0]
    assert "**not resolved**" in repro.claim_verdict(exp, rows[:2] + rows[3:])[0]  # CHTss missing
    text = "\n".join(repro.ladder_lines(exp, rows))
    assert "10% 152.00 ± 2.00, 30% 182.00 ± 2.00" in text and "under-trained regime" in text
    assert "Does dense beat static_d0.3 at this budget? **No**: 262.00 vs 182.00" in text
    assert "-82.00, -76.00, -82.00 (same sign on every seed)" in text
    # the other way round: more density helps, dense beats static 30%
    flipped = [_row(r["variant"], [400 - v for v in r["values"]], r["density"]) for r in ladder]
    text = "\n".join(repro.ladder_lines(exp, [_row("dense", [100, 101, 102], 1.0), *flipped]))
    assert "capacity-limited regime" in text and "**Yes**" in text
    assert repro.ladder_lines(repro.EXPERIMENTS["llama_lm"], rows) == []  # no ladder there


def test_resumable_run_continues_its_trace_and_wall_time(repro, tmp_path):
    """A resumable experiment checkpoints every epoch; a re-run resumes there and keeps the recorder trace."""
    args = ("mlp_mnist_paper", "dense", 0, "smoke", tmp_path / "no_data", tmp_path / "work", tmp_path / "res")
    first = repro.run_one(*args)
    out = tmp_path / "work" / "outputs" / "smoke" / "mlp_mnist_paper__dense__s0"
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{first['metrics']['global_step']}"]
    trained = json.loads((out / "reproduce_recorder.json").read_text())["seconds"]
    assert trained > 0
    second = repro.run_one(*args)  # resumes at the last checkpoint: no step is trained again
    assert second["metrics"]["global_step"] == first["metrics"]["global_step"]
    assert second["trace"][: len(first["trace"])] == first["trace"]
    assert second["wall_time_seconds"] > trained  # the first process's training time is carried over
