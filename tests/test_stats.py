"""One set of sparsity statistics behind the training log, `hf-chts inspect`, the model card and
`sparsity_summary`."""

from __future__ import annotations

import pytest
import torch
from _io_helpers import make_sparse_llama

from hf_chts.engine import LayerStats, StepStats
from hf_chts.stats import global_density, layer_statistics, mean_active_neurons


def test_global_density_counts_the_positions_of_an_empty_layer():
    assert global_density([(10, 20), (0, 100)]) == 10 / 120
    assert global_density([]) == 1.0


def test_step_log_density_is_links_over_positions_of_all_layers():
    # a layer pruned to 0 links must stay in the denominator: 10 / 120, not 10 / 20
    stats = StepStats(step=1, drop_fraction=0.1, temperature=1.0)
    stats.layers["a"] = LayerStats(nnz_before=10, nnz=10, target_nnz=10, density=0.5, numel=20)
    stats.layers["b"] = LayerStats(
        nnz_before=5, nnz=0, target_nnz=0, density=0.0, numel=100, active_out=0.0, active_in=0.0
    )
    logs = stats.to_log_dict(per_layer=False)
    assert logs["sparsity/density"] == pytest.approx(10 / 120)
    assert logs["sparsity/active_neurons"] == mean_active_neurons([(1.0, 1.0), (0.0, 0.0)]) == 0.5


def test_layer_statistics_hand_built():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    s = layer_statistics(mask)
    assert (s["nnz"], s["numel"], s["density"]) == (4, 12, 4 / 12)
    assert (s["active_out"], s["active_in"]) == (2 / 3, 3 / 4)


def test_log_inspect_card_and_summary_agree_on_a_model_with_an_empty_layer(tmp_path):
    from hf_chts.cli import _inspect
    from hf_chts.hub import card_context
    from hf_chts.masking import get_masks, set_masks_
    from hf_chts.modeling import sparsity_summary

    model = make_sparse_llama(density=0.3)
    masks = get_masks(model)
    empty = "model.layers.0.mlp.down_proj"
    masks[empty].zero_()
    set_masks_(model, masks)  # the weights follow the masks (save_pretrained refuses leaked weights)
    expected = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    model.save_pretrained(tmp_path / "ckpt")

    assert sparsity_summary(model)["density"] == pytest.approx(expected)
    assert _inspect(str(tmp_path / "ckpt"))["by_type"]["all"]["density"] == pytest.approx(expected)
    assert card_context(tmp_path / "ckpt")["layer_types"]["all"]["density"] == pytest.approx(expected)
    step = StepStats(step=1, drop_fraction=0.0, temperature=1.0)
    for name, mask in masks.items():
        n = int(mask.sum())
        step.layers[name] = LayerStats(n, n, n, n / mask.numel(), numel=mask.numel())
    assert step.to_log_dict()["sparsity/density"] == pytest.approx(expected)
