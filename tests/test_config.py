import dataclasses

import pytest

from hf_chts.config import METHODS, PRESETS, SparseTrainingConfig


@pytest.mark.parametrize("method", METHODS)
def test_presets_fill_every_field_and_validate(method):
    cfg = SparseTrainingConfig(method=method, density=0.3)
    for f in dataclasses.fields(cfg):
        if f.name in (
            "t_end",
            "decay_end",
            "target_modules",
            "exclude_modules",
            "early_stop_threshold",
            "csti_inputs",
        ):
            continue
        assert getattr(cfg, f.name) is not None, f.name
    for key, value in PRESETS[method].items():
        assert getattr(cfg, key) == value


def test_every_field_has_help():
    for f in dataclasses.fields(SparseTrainingConfig):
        assert f.metadata.get("help"), f.name


def test_explicit_fields_override_preset():
    cfg = SparseTrainingConfig(method="chts", regrowth_mode="hard", ch_variant="CH3_L3n", init="er")
    assert (cfg.regrowth_mode, cfg.ch_variant, cfg.init) == ("hard", "CH3_L3n", "er")
    assert cfg.removal_mode == "soft"


def test_chtss_preset_matches_spec():
    cfg = SparseTrainingConfig(method="chtss", density=0.3)
    assert cfg.initial_density == 0.5 and cfg.density_schedule == "sigmoid" and cfg.decay_pruning == "ri"
    assert cfg.removal_mode == "soft" and cfg.regrowth == "ch" and cfg.regrowth_mode == "soft"
    assert (cfg.temperature_start, cfg.temperature_end) == (1.0, 9.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="nope"), "Unknown method 'nope'.*chtss"),
        (dict(density=0.0), "density.*0.0"),
        (dict(density=1.5), "density.*1.5"),
        (dict(density=float("nan")), "density"),
        (dict(update_interval=0), "update_interval.*0"),
        (dict(update_interval=-3), "update_interval.*-3"),
        (dict(brf_r=1.2), "brf_r.*1.2"),
        (dict(init="xx"), "Unknown init 'xx'"),
        (dict(ch_variant="CH9"), "Unknown ch_variant 'CH9'"),
        (dict(ch_precision="fp16"), "Unknown ch_precision 'fp16'.*'exact', 'tf32', 'bf16'"),
        (dict(remask="always"), "Unknown remask 'always'.*'auto', 'every_step', 'update_steps'"),
        (dict(zeta=1.0), "zeta"),
        (dict(method="chts", initial_density=0.5), "initial_density.*constant"),
        (dict(method="chtss", density=0.6, initial_density=0.5), "initial_density"),
        (dict(method="set", regrowth="none"), "regrowth='none'"),
        (dict(target_modules="q_proj"), "target_modules"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseTrainingConfig(**kwargs)


def test_check_against_steps():
    cfg = SparseTrainingConfig(method="chts", update_interval=100)
    cfg.check_against_steps(10_000)
    with pytest.raises(ValueError, match="update_interval=100 is larger than t_end=7"):
        cfg.check_against_steps(10)
    SparseTrainingConfig(method="chtss", update_interval=10).check_against_steps(
        1000
    )  # decay ends after t_end
    cfg = SparseTrainingConfig(method="chtss", decay_end=2000, update_interval=10)
    with pytest.raises(ValueError, match="Density decay ends at step 2000, after the last step"):
        cfg.check_against_steps(1000)
    SparseTrainingConfig(method="static").check_against_steps(3)  # never updates: nothing to check


def test_dict_round_trip_and_unknown_fields():
    cfg = SparseTrainingConfig(method="rigl", density=0.1, target_modules=["q_proj"])
    assert SparseTrainingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown SparseTrainingConfig fields \\['bogus'\\]"):
        SparseTrainingConfig.from_dict({"bogus": 1})


def test_derived_properties():
    assert not SparseTrainingConfig(method="static").is_dynamic
    assert SparseTrainingConfig(method="rigl").needs_dense_gradient
    assert SparseTrainingConfig(method="mest").needs_dense_gradient
    assert not SparseTrainingConfig(method="chts").needs_dense_gradient
    assert SparseTrainingConfig(method="chts").resolve_t_end(1000) == 750
    assert SparseTrainingConfig(method="chtss").resolve_decay_end(1000) == 800
