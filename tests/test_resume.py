"""Tests of hf_chts.resume: where a resumed run finds its state, what it saves, what it restores."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_chts.checkpointing import STATE_DIR, load_sparse_state
from hf_chts.config import SparseTrainingConfig
from hf_chts.engine import TopologyEngine
from hf_chts.masking import layer_view_shape
from hf_chts.resume import (
    checkpoint_candidates,
    find_state,
    last_update_before,
    restore_progress,
    resume_point,
    scalar_state,
    write_state,
)
from hf_chts.sparsify import sparsify_


def _run(method="set", **overrides):
    config = SparseTrainingConfig(method=method, density=0.3, update_interval=4, **overrides)
    modules = sparsify_(nn.Sequential(nn.ModuleList([nn.Linear(16, 8), nn.Linear(8, 4)])), config)
    engine = TopologyEngine(config, {n: layer_view_shape(m) for n, m in modules.items()}, max_steps=20)
    return config, modules, engine


def test_candidates_come_from_the_trainers_public_surface():
    args = SimpleNamespace(output_dir="out", resume_from_checkpoint="out/checkpoint-8")
    assert checkpoint_candidates(args, 8) == ["out/checkpoint-8"]  # the same folder once
    assert checkpoint_candidates(args, 8, "mine") == ["mine", "out/checkpoint-8"]
    args = SimpleNamespace(output_dir="out", resume_from_checkpoint=True)
    assert checkpoint_candidates(args, 12) == ["out/checkpoint-12"]


@pytest.mark.parametrize(("step", "expected"), [(3, 0), (4, 4), (7, 4), (12, 12), (19, 12)])
def test_last_update_before(step, expected):
    config, _, engine = _run()
    assert engine.last_update == 15  # t_end: 0.75 of 20 steps; updates at 4, 8, 12
    assert last_update_before(config, engine.last_update, step) == expected
    static = SparseTrainingConfig(method="static", density=0.3)
    assert last_update_before(static, engine.last_update, step) == 0


def test_write_then_find_round_trip(tmp_path):
    config, modules, engine = _run()
    masks = {name: m.weight_mask for name, m in modules.items()}
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=True, resume_from_checkpoint=None)
    trainer_state = SimpleNamespace(global_step=3, is_world_process_zero=True)
    state = scalar_state(config, engine, modules, 3, 0, 1.5)
    assert not write_state(args, trainer_state, masks, state)  # no checkpoint folder: not saving now
    (tmp_path / "checkpoint-3").mkdir()
    assert not write_state(
        SimpleNamespace(**{**vars(args), "should_save": False}), trainer_state, masks, state
    )
    assert write_state(args, trainer_state, masks, state)
    saved_masks, saved = load_sparse_state(str(tmp_path / "checkpoint-3"))
    assert saved["layers"] == {"0.0": [8, 16], "0.1": [4, 8]} and saved["update_seconds_total"] == 1.5
    found = find_state(args, 3, modules, engine, carried=True)
    assert found is not None and all(torch.equal(found[0][n], masks[n]) for n in masks)
    assert resume_point(args, 3, modules, engine, carried=True)[1:] == (0, 1.5)
    assert resume_point(args, 0, modules, engine, carried=True) == (None, 0, 0.0)


def test_missing_state_is_refused_unless_the_model_carries_masks(tmp_path, caplog):
    _, modules, engine = _run()
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    with pytest.raises(ValueError, match=f"no {STATE_DIR}/ and no masks"):
        find_state(args, 8, modules, engine, carried=False)
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        assert find_state(args, 8, modules, engine, carried=True) is None
    assert "keeping the masks the model carries" in caplog.text


def test_restore_progress_loads_the_engine_and_names_changed_fields(caplog):
    config, modules, engine = _run()
    saved = scalar_state(
        config.__class__(method="set", density=0.3, update_interval=4, zeta=0.5), engine, modules, 8, 8, 2.0
    )
    saved["engine"] = {**engine.state_dict(), "frozen": ["0.1"]}
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        assert restore_progress(engine, saved, 8) == (8, 2.0)
    assert "changed sparse-training config (fields ['zeta'])" in caplog.text
    assert engine.frozen == {"0.1"}
    assert restore_progress(engine, None, 10) == (8, 0.0)
