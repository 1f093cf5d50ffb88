import dataclasses
import json
import re
import typing

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
        (dict(target_modules=["q_proj", 3]), "target_modules"),
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
    for steps in (0, -1, True, 10.0):
        with pytest.raises(ValueError, match="max_steps"):
            SparseTrainingConfig(method="static").check_against_steps(steps)


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


# ---------------------------------------------------------------- presets resolved when read
def test_preset_fields_follow_a_new_method_unless_set():
    cfg = SparseTrainingConfig(method="set", init="brf")
    cfg.method = "rigl"
    assert (cfg.regrowth, cfg.zeta_schedule, cfg.init) == ("gradient", "cosine", "brf")
    cfg.init = None  # handed back to the preset
    assert cfg.init == "er"


def test_from_dict_of_a_resolved_config_with_a_new_method_takes_that_preset():
    data = SparseTrainingConfig(method="set", density=0.2).to_dict()
    data["method"] = "rigl"
    cfg = SparseTrainingConfig.from_dict(data)
    assert (cfg.regrowth, cfg.zeta_schedule, cfg.density) == ("gradient", "cosine", 0.2)


def test_callback_kwargs_override_the_method_with_its_preset():
    from hf_chts import CHTssCallback

    callback = CHTssCallback(SparseTrainingConfig(method="set", density=0.2), method="rigl")
    assert (callback.config.method, callback.config.regrowth, callback.config.density) == (
        "rigl",
        "gradient",
        0.2,
    )


def test_dicts_written_fully_resolved_still_load_to_the_same_config():
    # checkpoints written before presets were kept unresolved store every field's value
    for method in METHODS:
        cfg = SparseTrainingConfig(method=method, density=0.3)
        old = cfg.to_dict(resolved=True)
        assert None not in [old[k] for k in PRESETS[method]]
        assert SparseTrainingConfig.from_dict(old) == cfg
        assert SparseTrainingConfig.from_dict(json.loads(json.dumps(old))).to_dict(resolved=True) == old


def test_to_dict_keeps_what_the_user_set():
    cfg = SparseTrainingConfig(method="chtss", ch_variant="CH3_L3n")
    raw = cfg.to_dict()
    assert raw["ch_variant"] == "CH3_L3n" and raw["regrowth"] is None and raw["initial_density"] is None
    assert cfg.to_dict(resolved=True)["initial_density"] == 0.5
    assert cfg.user_set_fields == {"ch_variant"}


def test_string_fields_are_literal_choices():
    hints = typing.get_type_hints(SparseTrainingConfig)
    for name in ("method", "init", "removal", "regrowth", "removal_mode", "ch_variant", "density_schedule"):
        hint = hints[name]
        if typing.get_origin(hint) is not typing.Literal:  # `Literal[...] | None`
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        assert typing.get_origin(hint) is typing.Literal, name


# ---------------------------------------------------------------- strict types
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chain_removal="no"), "`chain_removal` must be True or False, got 'no'"),
        (dict(chain_removal=0), "`chain_removal` must be True or False"),
        (dict(seed=1.9), "`seed` must be an integer, got 1.9"),
        (dict(seed=True), "`seed` must be an integer, got True"),
        (dict(temperature_start=float("nan")), "`temperature_start` must be a finite number"),
        (dict(temperature_end=float("inf")), "`temperature_end` must be a finite number"),
        (dict(decay_steepness=float("inf")), "`decay_steepness` must be a finite number"),
        (dict(mest_lambda=float("nan")), "`mest_lambda` must be a finite number"),
        (dict(update_interval=10.0), "`update_interval` must be an integer"),
        (dict(t_end=1.5), "`t_end` must be an integer"),
        (dict(zeta="0.1"), "`zeta` must be a finite number"),
        (dict(method=3), "`method` must be one of"),
        (dict(removal_mode=True), "`removal_mode` must be one of"),
        (dict(early_stop_threshold=float("nan")), "`early_stop_threshold` must be a finite number"),
    ],
)
def test_every_field_is_type_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match) if "`" in match else match):
        SparseTrainingConfig(**kwargs)


def test_coerce_takes_configs_dicts_and_overrides():
    set_config = SparseTrainingConfig(method="set", density=0.2)
    assert SparseTrainingConfig.coerce(set_config) is set_config
    rigl = SparseTrainingConfig.coerce(set_config, method="rigl")
    assert rigl.method == "rigl" and rigl.density == 0.2 and rigl.regrowth == "gradient"  # preset follows
    assert SparseTrainingConfig.coerce({"method": "chts"}, density=0.1).density == 0.1
    assert SparseTrainingConfig.coerce(None, method="static").method == "static"
    with pytest.raises(ValueError, match="SparseTrainingConfig or a dict"):
        SparseTrainingConfig.coerce("chts")


def test_config_for_run_adopts_or_records_the_models_sparsity():
    from types import SimpleNamespace

    from hf_chts.config import config_for_run

    mine = SparseTrainingConfig(method="set", density=0.2)
    model = SimpleNamespace(config=SimpleNamespace(sparsity={"method": "chtss", "density": 0.1}))
    adopted = config_for_run(model, mine, given=False)
    assert adopted.method == "chtss" and adopted.density == 0.1
    assert config_for_run(model, mine, given=True) is mine
    assert model.config.sparsity == mine.to_dict(resolved=True)  # the checkpoint records what trained it
    plain = SimpleNamespace(config=SimpleNamespace())
    assert config_for_run(plain, mine, given=False) is mine and not hasattr(plain.config, "sparsity")


# ---------------------------------------------------------------- one boundary
# The values a run takes from the config are checked here, at construction, and not again by the topology
# functions and schedules they reach (init_mask, allocate_densities, csti_mask, the density schedules,
# DropFraction, Temperature, select_rows).
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(density=0.0), r"`density` must be in \(0, 1\].*got 0.0"),
        (dict(density=-0.1), r"`density` must be in \(0, 1\].*got -0.1"),
        (dict(density=1.5), r"`density` must be in \(0, 1\].*got 1.5"),
        (dict(density=float("nan")), r"`density` must be a finite number"),
        (dict(method="chtss", initial_density=0.0), r"`initial_density` must be in \(0, 1\].*got 0.0"),
        (dict(method="chtss", initial_density=1.5), r"`initial_density` must be in \(0, 1\].*got 1.5"),
        (dict(method="chtss", initial_density=float("inf")), r"`initial_density` must be a finite number"),
        (dict(temperature_start=0.0), r"Temperatures must be > 0, got temperature_start=0.0"),
        (dict(temperature_start=-1.0), r"Temperatures must be > 0, got temperature_start=-1.0"),
        (dict(temperature_end=0.0), r"Temperatures must be > 0, .*temperature_end=0.0"),
        (dict(temperature_end=-9.0), r"Temperatures must be > 0, .*temperature_end=-9.0"),
        (dict(zeta=-0.1), r"`zeta` must be in \[0, 1\), got -0.1"),
        (dict(zeta=1.5), r"`zeta` must be in \[0, 1\), got 1.5"),
        (dict(decay_steepness=0.0), r"`decay_steepness` must be > 0, got 0.0"),
        (dict(decay_steepness=-1.0), r"`decay_steepness` must be > 0, got -1.0"),
        (dict(decay_start=-1), r"`decay_start` must be an integer >= 0, got -1"),
        (dict(decay_end=0), r"`decay_end` must be an integer > 0, got 0"),
        (dict(decay_start=100, decay_end=100), r"`decay_end` \(100\) must be after `decay_start` \(100\)"),
        (dict(update_interval=0), r"`update_interval` must be an integer > 0, got 0"),
        (dict(t_end=-1), r"`t_end` must be an integer >= 0, got -1"),
        (dict(method="chtss", density=0.5, initial_density=0.3), r"initial_density=0.3 < density=0.5"),
    ],
)
def test_run_values_are_refused_at_the_config_naming_field_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseTrainingConfig(**kwargs)


def test_run_values_are_checked_only_at_the_config():
    """``check_density`` runs in config.py and nowhere below it; the topology functions, schedules,
    initial.py and engine.py check no configured value again (no check helper given a configured name, no
    ``raise`` of a "`<name>` must ..." message of their own)."""
    import ast
    import pathlib

    import hf_chts

    root = pathlib.Path(hf_chts.__file__).parent
    configured = {
        "density", "initial_density", "final_density", "temperature", "t_start_value", "t_end_value",
        "zeta", "steepness", "decay_start", "decay_end", "update_interval", "t_end",
    }  # fmt: skip

    def calls(tree):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                yield (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)), node

    def strings(node):
        return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]

    config_tree = ast.parse((root / "config.py").read_text())
    checked = {s for name, node in calls(config_tree) if name == "check_density" for s in strings(node)}
    assert checked == {"density", "initial_density"}

    lower = sorted((root / "topology").glob("*.py")) + [root / "initial.py", root / "engine.py"]
    for path in lower:
        tree = ast.parse(path.read_text())
        for name, node in calls(tree):
            where = f"{path.relative_to(root)}:{node.lineno}"
            assert name != "check_density", f"{where} checks a density again; SparseTrainingConfig does"
            if name and name.startswith(("check_", "_check_")):
                again = configured & set(strings(node))
                assert not again, f"{where} checks {again} again; SparseTrainingConfig does"
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = " ".join(strings(node.exc))
                again = {n for n in configured if f"`{n}` must" in text}
                assert not again, f"{path.relative_to(root)}:{node.lineno} refuses {again} again"


def test_help_documents_every_field():
    doc = SparseTrainingConfig.__doc__
    for f in dataclasses.fields(SparseTrainingConfig):
        assert f"        {f.name} (`" in doc, f.name
    assert "Final fraction of links kept" in doc


def test_a_single_target_pattern_is_a_string_too():
    config = SparseTrainingConfig(target_modules="q_proj", exclude_modules="lm_head")
    assert config.target_modules == ["q_proj"] and config.exclude_modules == ["lm_head"]


def test_sparsity_is_answered_with_the_density_to_use():
    with pytest.raises(TypeError, match=r"no field 'sparsity'.*use density=0\.1 for sparsity=0\.9"):
        SparseTrainingConfig(sparsity=0.9)
    with pytest.raises(TypeError, match="did you mean density="):
        SparseTrainingConfig(densty=0.2)
