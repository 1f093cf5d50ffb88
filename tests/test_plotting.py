"""PNG plots: training curves from trainer_state.json, degree distributions, mask pictures."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _io_helpers import make_sparse_llama, random_mask, trainer_state

pytest.importorskip("matplotlib")

from hf_chts.plotting import (  # noqa: E402
    load_log_history,
    metric_series,
    plot_checkpoint,
    plot_degree_distribution,
    plot_mask,
    plot_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side: int = 50):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side


def test_metric_series_collects_prefixed_keys():
    series = metric_series(trainer_state(steps=2)["log_history"])
    assert series["sparsity/density"] == ([0, 10, 20], [0.5, 0.4, pytest.approx(0.3)])
    assert "loss" not in series and "eval_loss" not in series
    assert len(series) == 6


def test_training_curves_are_pngs(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps(trainer_state()))
    paths = plot_training_curves(tmp_path / "trainer_state.json", tmp_path / "plots")
    assert [p.name for p in paths] == ["active_neurons.png", "active_out.png", "density.png"]
    for path in paths:
        assert_png(path)


def test_training_curves_other_prefix_and_many_layers(tmp_path):
    history = [{"step": s, **{f"topo/l{i}/turnover": 0.1 * i + s for i in range(40)}} for s in range(3)]
    paths = plot_training_curves(history, tmp_path, prefix="topo/", max_layers=5)
    assert [p.name for p in paths] == ["turnover.png"]
    assert_png(paths[0])


def test_training_curves_without_matching_keys(tmp_path):
    with pytest.raises(ValueError, match="keys present: loss, step"):
        plot_training_curves([{"step": 1, "loss": 2.0}], tmp_path)


def test_load_log_history_from_run_folder(tmp_path):
    for step in (5, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(trainer_state(step)))
    assert len(load_log_history(tmp_path)) == len(trainer_state(20)["log_history"])
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_log_history(tmp_path / "nothing")


def test_degree_distribution_and_mask_pngs(tmp_path):
    mask = random_mask((48, 80), 0.3, torch.Generator().manual_seed(0))
    assert_png(plot_degree_distribution(mask, tmp_path / "deg.png"))
    assert_png(plot_mask(mask, tmp_path / "mask.png"))
    big = random_mask((600, 1100), 0.1, torch.Generator().manual_seed(1))  # shown as block densities
    assert_png(plot_mask(big, tmp_path / "big.png", max_size=256))
    with pytest.raises(ValueError, match="2-D mask"):
        plot_mask(torch.ones(3, dtype=torch.bool), tmp_path / "bad.png")


def test_plot_checkpoint(tmp_path):
    make_sparse_llama().save_pretrained(tmp_path / "ckpt")
    paths = plot_checkpoint(tmp_path / "ckpt", tmp_path / "out", layer="model.layers.1.mlp.down_proj")
    assert [p.name for p in paths] == [
        "degrees_model.layers.1.mlp.down_proj.png",
        "mask_model.layers.1.mlp.down_proj.png",
    ]
    for path in paths:
        assert_png(path)
    with pytest.raises(ValueError, match="No sparse layer 'nope'"):
        plot_checkpoint(tmp_path / "ckpt", tmp_path / "out", layer="nope")


def test_constant_density_is_drawn_flat_without_an_offset_and_update_step_is_not_plotted(
    tmp_path, monkeypatch
):
    import hf_chts.plotting as plotting

    figures = {}
    save = plotting._save
    monkeypatch.setattr(
        plotting, "_save", lambda fig, path: figures.setdefault(path.name, fig) and save(fig, path)
    )
    history = [
        {"step": s, "sparsity/density": 0.3, "sparsity/update_step": float(s), "sparsity/turnover": 0.1 * s}
        for s in range(1, 6)
    ]
    paths = plot_training_curves(history, tmp_path)
    assert [p.name for p in paths] == ["density.png", "turnover.png"]  # update_step is y = x
    ax = figures["density.png"].axes[0]
    assert ax.yaxis.get_major_formatter().get_useOffset() is False
    low, high = ax.get_ylim()
    assert low < 0.3 < high and high - low >= 0.02  # a visibly flat line, not noise magnified


def test_loss_plot_and_cli_defaults(tmp_path, capsys):
    from hf_chts.cli import main
    from hf_chts.plotting import plot_loss

    state = trainer_state()
    state["log_history"] += [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.5, "eval_loss": 2.7}]
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "trainer_state.json").write_text(json.dumps(state))
    assert_png(plot_loss(run, tmp_path / "p"))
    assert plot_loss([{"step": 1, "sparsity/density": 0.3}], tmp_path / "q") is None
    make_sparse_llama().save_pretrained(run / "checkpoint-10")
    assert main(["plot", str(run)]) == 0  # no --output_dir: <run>/plots; masks from the newest checkpoint
    names = {p.name for p in (run / "plots").iterdir()}
    assert {"loss.png", "density.png"} <= names and any(n.startswith("mask_") for n in names)
    shutil.rmtree(run / "checkpoint-10")
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    assert "pass --checkpoint DIR for the mask plots" in capsys.readouterr().out
