"""`SparseTrainingConfig`: every knob of dynamic sparse training, with the paper's methods as presets.

A preset (``method="chts"``, ``"chtss"``, ``"set"`` ...) decides every field the user leaves at ``None``; any
field given explicitly wins. The config keeps what the user set and resolves the preset when a field is read,
so changing ``method`` later changes every field the user did not set (docs/method.md, section 6, has the
table the presets follow).

Adding a field: declare it below with ``_help(...)`` and a type hint; the type hint is checked at
construction (bools are bools, integers are integers, floats are finite, ``Literal`` strings are one of their
choices). A field a preset decides is declared ``X | None`` with default ``None`` and gets a value in every
preset or in ``_FALLBACK``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._validation import (
    check_choice,
    check_density,
    check_fraction,
    check_positive_int,
    document_fields_,
    refuse_unknown_fields_,
)
from .sparse_ops import COMPUTE_MODES
from .topology.init import DEGREE_DISTRIBUTIONS, DENSITY_DISTRIBUTIONS, INIT_METHODS
from .topology.link_prediction import CH_PRECISIONS, CH_VARIANTS
from .topology.regrowth import REGROWTH_METHODS as GROWTH_METHODS
from .topology.sampling import SELECTION_MODES
from .topology.schedules import DENSITY_SCHEDULES, DROP_FRACTION_KINDS
from .topology.scores import DECAY_SCORES
from .topology.scores import REMOVAL_METHODS as SCORE_METHODS

logger = logging.getLogger(__name__)

# Every option list is the topology's own (the layer that runs the option); a config value is one of them,
# or "none" where a phase can be switched off.
REMOVAL_METHODS = ("none", *SCORE_METHODS)
REGROWTH_METHODS = ("none", *GROWTH_METHODS)
DECAY_PRUNING = DECAY_SCORES
ZETA_SCHEDULES = DROP_FRACTION_KINDS
REMASK_MODES = ("auto", "every_step", "update_steps")

Method = Literal["static", "set", "rigl", "mest", "granet", "cht", "chts", "chtss"]
InitMethod = Literal[INIT_METHODS]
RemovalMethod = Literal[REMOVAL_METHODS]
RegrowthMethod = Literal[REGROWTH_METHODS]
SelectionMode = Literal[SELECTION_MODES]
CHVariant = Literal[CH_VARIANTS]
CHPrecision = Literal[CH_PRECISIONS]
DensitySchedule = Literal[DENSITY_SCHEDULES]
DensityDistribution = Literal[DENSITY_DISTRIBUTIONS]
DecayPruning = Literal[DECAY_PRUNING]
ZetaSchedule = Literal[ZETA_SCHEDULES]
DegreeDistribution = Literal[DEGREE_DISTRIBUTIONS]
RemaskMode = Literal[REMASK_MODES]
ComputeMode = Literal[COMPUTE_MODES]

# docs/method.md section 6. Only the fields a preset decides are listed; the rest keep their defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "static": dict(
        init="brf", removal="none", regrowth="none", density_schedule="constant", chain_removal=False
    ),
    "set": dict(
        init="er",
        removal="magnitude",
        removal_mode="hard",
        regrowth="random",
        regrowth_mode="hard",
        density_schedule="constant",
        chain_removal=False,
        zeta_schedule="constant",
    ),
    "rigl": dict(
        init="er",
        removal="magnitude",
        removal_mode="hard",
        regrowth="gradient",
        regrowth_mode="hard",
        density_schedule="constant",
        chain_removal=False,
        zeta_schedule="cosine",
    ),
    "mest": dict(
        init="er",
        removal="mest",
        removal_mode="hard",
        regrowth="random",
        regrowth_mode="hard",
        density_schedule="constant",
        chain_removal=False,
        zeta_schedule="constant",
    ),
    "granet": dict(
        init="er",
        removal="magnitude",
        removal_mode="hard",
        regrowth="gradient",
        regrowth_mode="hard",
        density_schedule="cubic",
        initial_density=0.5,
        decay_pruning="magnitude",
        chain_removal=False,
        zeta_schedule="cosine",
    ),
    "cht": dict(
        init="bsw",
        removal="magnitude",
        removal_mode="hard",
        regrowth="ch",
        regrowth_mode="hard",
        ch_variant="CH3_L3n",
        density_schedule="constant",
        chain_removal=True,
        zeta_schedule="constant",
    ),
    "chts": dict(
        init="brf",
        removal="magnitude",
        removal_mode="soft",
        regrowth="ch",
        regrowth_mode="soft",
        ch_variant="CH2_L3n",
        density_schedule="constant",
        chain_removal=True,
        zeta_schedule="cosine",
    ),
    "chtss": dict(
        init="brf",
        removal="magnitude",
        removal_mode="soft",
        regrowth="ch",
        regrowth_mode="soft",
        ch_variant="CH2_L3n",
        density_schedule="sigmoid",
        initial_density=0.5,
        decay_pruning="ri",
        chain_removal=True,
        zeta_schedule="cosine",
    ),
}
METHODS = typing.get_args(Method)

# Values of the preset-decided fields that a preset leaves out. ``initial_density`` falls back to ``density``.
_FALLBACK: dict[str, Any] = dict(
    zeta_schedule="constant",
    ch_variant="CH2_L3n",
    removal_mode="hard",
    regrowth_mode="hard",
    decay_pruning="ri",
)


def _help(text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class SparseTrainingConfig:
    """Configuration of dynamic sparse training (topology evolution) for a set of linear layers.

    Fields left at ``None`` are filled from the preset named by ``method``; every field can be overridden.

    Example:
        >>> cfg = SparseTrainingConfig(method="chtss", density=0.3)
        >>> cfg.regrowth, cfg.density_schedule, cfg.initial_density
        ('ch', 'sigmoid', 0.5)
    """

    method: Method = _help(f"Preset filling the fields left at None: one of {METHODS}.", "chts")
    density: float = _help("Final fraction of links kept in each sparse layer, in (0, 1].", 0.3)
    density_distribution: DensityDistribution = _help(
        "How the global density is spread over layers: 'uniform' or 'erk' (Erdos-Renyi-Kernel).", "uniform"
    )
    # --- initial topology (docs/method.md section 1)
    init: InitMethod | None = _help(f"Initial topology: one of {INIT_METHODS}.")
    brf_r: float = _help("BRF randomness r in [0, 1]: 0 = pure receptive field, 1 = uniform random.", 0.3)
    brf_degree_dist: DegreeDistribution = _help(
        "BRF degree distribution of the smaller side: 'fixed' or 'uniform'.", "uniform"
    )
    bsw_beta: float = _help("BSW rewiring probability beta in [0, 1].", 0.1)
    csti_inputs: str | None = _help(
        "init='csti': path of the calibration inputs (a .pt tensor or .npy array, samples x n_features); a "
        "tensor can be passed instead as `csti_inputs=` to CHTssCallback, TopologyEngine or sparsify_."
    )
    # --- evolution timing (section 2)
    update_interval: int = _help("Optimizer steps between topology updates (> 0).", 100)
    t_end: int | None = _help(
        "Last optimizer step with link removal and regrowth; default t_end_fraction x max_steps. A density "
        "decay that ends later keeps pruning (only) at update steps until decay_end."
    )
    t_end_fraction: float = _help(
        "t_end as a fraction of the total optimizer steps, when t_end is None.", 0.75
    )
    # --- removal (section 2a)
    zeta: float = _help("Fraction of existing links removed at each update (drop fraction), in [0, 1).", 0.1)
    zeta_schedule: ZetaSchedule | None = _help(
        "'constant' or 'cosine' (adaptive zeta, annealed to 0 at t_end)."
    )
    removal: RemovalMethod | None = _help(f"Removal score: one of {REMOVAL_METHODS}.")
    removal_mode: SelectionMode | None = _help("'hard' top-k or 'soft' sampling proportional to score ** T.")
    temperature_start: float = _help("Soft-removal temperature at step 0 (T_start).", 1.0)
    temperature_end: float = _help(
        "Soft-removal temperature at t_end (T_end); higher is closer to top-k.", 9.0
    )
    mest_lambda: float = _help("MEST removal score |W| + lambda * |grad W|.", 0.01)
    # --- regrowth (section 2b, 3)
    regrowth: RegrowthMethod | None = _help(f"Regrowth score: one of {REGROWTH_METHODS}.")
    regrowth_mode: SelectionMode | None = _help("'hard' top-k or 'soft' sampling proportional to the score.")
    ch_variant: CHVariant | None = _help(f"Cannistraci-Hebb link predictor: one of {CH_VARIANTS}.")
    ch_precision: CHPrecision = _help(
        f"Precision of the CH link predictor's products with the node weights: one of {CH_PRECISIONS}. "
        "'exact' (float32) by default; 'tf32' / 'bf16' are faster on GPUs at a small score error, with "
        "counts exact in all (measured in docs/PRECISION.md).",
        "exact",
    )
    # --- chain removal (section 5)
    chain_removal: bool | None = _help(
        "Remove links of neurons left without inputs or outputs (percolation)."
    )
    # --- density schedule (section 4)
    density_schedule: DensitySchedule | None = _help(
        f"Target-density schedule: one of {DENSITY_SCHEDULES}. 'em_s' holds density + 0.05 until "
        "0.6 x t_end, then density + 0.025, and prunes to `density` at the last update (every update "
        "removes down to `density` and regrows the extra links; `zeta` is unused)."
    )
    initial_density: float | None = _help("Starting density of a decaying schedule (CHTss: 0.5).")
    decay_start: int = _help("Optimizer step where density decay starts.", 0)
    decay_end: int | None = _help(
        "Optimizer step where density decay ends; default decay_end_fraction x max."
    )
    decay_end_fraction: float = _help("decay_end as a fraction of total steps, when decay_end is None.", 0.8)
    decay_steepness: float = _help("Steepness of the CHTss sigmoid decay (research default 6).", 6.0)
    decay_pruning: DecayPruning | None = _help("Score used by density-decay pruning: 'ri' or 'magnitude'.")
    # --- which layers (used by the Hugging Face integration)
    target_modules: list[str] | None = _help(
        "Regular expressions of module names to sparsify; default: every linear layer inside the blocks."
    )
    exclude_modules: list[str] | None = _help("Regular expressions of module names to keep dense.")
    # --- misc
    seed: int = _help(
        "Seed of every random choice (init, soft sampling); the same seed gives the same masks.", 0
    )
    early_stop_threshold: float | None = _help(
        "Freeze a layer's topology once this fraction of the regrown links were the ones just removed."
    )
    reset_returning_links: bool = _help(
        "Treat a link removed and regrown in the same update as new: weight 0.0 and optimizer state zeroed. "
        "Off by default: such a link keeps its weight and optimizer state, as in the research code; only "
        "links absent before the update start from zero.",
        False,
    )
    rewarmup_steps: int = _help("Steps of learning-rate re-warmup after each topology update (0 = off).", 0)
    remask: RemaskMode = _help(
        "When masked weights are set to 0.0 again after an optimizer step: 'auto' (after every step only for "
        "optimizers not in hf_chts.masking.ZERO_PRESERVING_OPTIMIZERS, which keep them at 0.0 by themselves; "
        "otherwise at topology updates), 'every_step', or 'update_steps' (trust the optimizer).",
        "auto",
    )
    compute: ComputeMode = _help(
        "How sparse layers compute: 'sparse' (sparse kernels; the trainable weight and the optimizer state "
        "hold the links only), 'dense' (dense products on masked weights), or 'auto' (sparse for each layer "
        "where it is measured faster: see docs/DESIGN.md, 'Sparse compute'; dense otherwise, and wherever "
        "sparse compute cannot run, with one log line).",
        "auto",
    )

    def __post_init__(self) -> None:
        _check_type("method", self.method, Method)
        for name in [n for n in ("target_modules", "exclude_modules") if isinstance(self.__dict__[n], str)]:
            object.__setattr__(self, name, [self.__dict__[name]])  # one pattern as a string, as PEFT takes
        # Which preset-decided fields the user set; the others follow `method` whenever they are read.
        object.__setattr__(
            self, "_user_set", {name for name in _PRESET_FIELDS if self.__dict__.get(name) is not None}
        )
        self._resolve()
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        # Setting a preset-decided field to a value pins it; setting it to None hands it back to the preset.
        # Any assignment re-resolves the fields the user did not set (e.g. a new `method`).
        user_set = self.__dict__.get("_user_set")
        if user_set is not None and name == "method":
            _check_type("method", value, Method)
        if user_set is not None and name in _PRESET_FIELDS:
            if value is None:
                user_set.discard(name)
            else:
                user_set.add(name)
        object.__setattr__(self, name, value)
        if user_set is not None:
            self._resolve()

    def _resolve(self) -> None:
        preset = PRESETS.get(self.__dict__.get("method"), {})
        for name in _PRESET_FIELDS:
            if name in self._user_set:
                continue
            if name in preset:
                value = preset[name]
            elif name == "initial_density":
                value = self.__dict__.get("density")
            else:
                value = _FALLBACK[name]
            object.__setattr__(self, name, value)

    @property
    def user_set_fields(self) -> frozenset[str]:
        """The preset-decided fields given explicitly (the others follow ``method``)."""
        return frozenset(self._user_set)

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field, its value and what is allowed."""
        hints = _type_hints()
        for f in dataclasses.fields(self):  # types, and every option against its list (the Literal hints)
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        check_density(self.density, "density")
        check_density(self.initial_density, "initial_density")
        check_fraction(self.brf_r, "brf_r")
        check_fraction(self.bsw_beta, "bsw_beta")
        check_positive_int(self.update_interval, "update_interval")
        if self.t_end is not None:
            check_positive_int(self.t_end, "t_end", allow_zero=True)
        check_fraction(self.t_end_fraction, "t_end_fraction")
        check_fraction(self.zeta, "zeta", high_open=True)
        check_positive_int(self.decay_start, "decay_start", allow_zero=True)
        if self.decay_end is not None:
            check_positive_int(self.decay_end, "decay_end")
            if self.decay_end <= self.decay_start:
                raise ValueError(
                    f"`decay_end` ({self.decay_end}) must be after `decay_start` ({self.decay_start})."
                )
        check_fraction(self.decay_end_fraction, "decay_end_fraction", low_open=True)
        if self.decay_steepness <= 0:
            raise ValueError(f"`decay_steepness` must be > 0, got {self.decay_steepness}.")
        if self.temperature_start <= 0 or self.temperature_end <= 0:
            raise ValueError(
                f"Temperatures must be > 0, got temperature_start={self.temperature_start}, "
                f"temperature_end={self.temperature_end}."
            )
        if self.mest_lambda < 0:
            raise ValueError(f"`mest_lambda` must be >= 0, got {self.mest_lambda}.")
        check_positive_int(self.rewarmup_steps, "rewarmup_steps", allow_zero=True)
        if not isinstance(self.reset_returning_links, bool):
            raise ValueError(
                f"`reset_returning_links` must be True or False, got {self.reset_returning_links!r}."
            )
        if self.early_stop_threshold is not None:
            check_fraction(self.early_stop_threshold, "early_stop_threshold", low_open=True)
        if self.density_schedule == "em_s" and self.density > 0.95:
            raise ValueError(
                f"density_schedule='em_s' trains with density + 0.05 before pruning to `density`, so "
                f"`density` must be <= 0.95, got {self.density}; lower `density` or use "
                "density_schedule='constant'."
            )
        if self.density_schedule in ("constant", "em_s"):
            if self.initial_density != self.density:
                raise ValueError(
                    f"`initial_density` ({self.initial_density}) differs from `density` ({self.density}) "
                    f"but `density_schedule` is {self.density_schedule!r}; use 'sigmoid', 'cubic' or "
                    "'linear' to decay, or drop `initial_density`."
                )
        elif self.initial_density < self.density:
            raise ValueError(
                f"A decaying schedule goes from `initial_density` down to `density`, but initial_density="
                f"{self.initial_density} < density={self.density}; set initial_density >= density."
            )
        if self.removal == "none" and self.regrowth != "none" and self.density_schedule == "constant":
            raise ValueError(
                f"regrowth={self.regrowth!r} with removal='none' would grow links beyond the target "
                "density; set a removal method or regrowth='none'."
            )
        if self.removal != "none" and self.regrowth == "none":
            raise ValueError(
                f"removal={self.removal!r} with regrowth='none' would shrink the network below `density` "
                "at every update; set a regrowth method, or removal='none' for a static mask."
            )

    # ------------------------------------------------------------------ derived quantities
    @property
    def is_dynamic(self) -> bool:
        """Whether the topology ever changes (False for ``static``)."""
        return self.regrowth != "none" or self.density_schedule != "constant"

    @property
    def needs_dense_gradient(self) -> bool:
        """RigL/GraNet regrowth and MEST removal read the dense gradient at update steps."""
        return self.regrowth == "gradient" or self.removal == "mest"

    def resolve_steps(self, max_steps: int) -> tuple[int, int]:
        """``(t_end, decay_end)`` of a run of ``max_steps`` optimizer steps."""
        return self.resolve_t_end(max_steps), self.resolve_decay_end(max_steps)

    def resolve_t_end(self, max_steps: int) -> int:
        """The last step with a topology update, given the total number of optimizer steps."""
        if self.t_end is not None:
            return self.t_end
        return int(self.t_end_fraction * max_steps)

    def resolve_decay_end(self, max_steps: int) -> int:
        """The step where density decay ends, given the total number of optimizer steps."""
        if self.decay_end is not None:
            return self.decay_end
        return max(self.decay_start + 1, int(self.decay_end_fraction * max_steps))

    def check_against_steps(self, max_steps: int) -> None:
        """Refuse schedules that cannot work over ``max_steps`` optimizer steps, naming the fix."""
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
            raise ValueError(
                f"max_steps={max_steps!r}: the number of optimizer steps must be known and positive; set "
                "`max_steps` in TrainingArguments (e.g. for an IterableDataset)."
            )
        t_end, decay_end = self.resolve_steps(max_steps)
        if self.is_dynamic and self.update_interval > max(t_end, 1):
            raise ValueError(
                f"update_interval={self.update_interval} is larger than t_end={t_end} "
                f"(max_steps={max_steps}): the topology would never change. Lower `update_interval` or "
                "raise `t_end` / the number of steps, or use method='static'."
            )
        if self.density_schedule not in ("constant", "em_s"):
            if decay_end > max_steps:
                raise ValueError(
                    f"Density decay ends at step {decay_end}, after the last step ({max_steps}); the final "
                    f"density {self.density} would never be reached. Lower `decay_end` / "
                    "`decay_end_fraction`."
                )
            if (decay_end - self.decay_start) < self.update_interval:
                raise ValueError(
                    f"The density decay window [{self.decay_start}, {decay_end}] is shorter than "
                    f"update_interval={self.update_interval}; no decay step would happen."
                )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self, resolved: bool = False) -> dict[str, Any]:
        """The fields as a JSON-ready dict.

        Args:
            resolved (`bool`, defaults to `False`): by default, the preset-decided fields the user did not set
                are ``None`` (so ``from_dict({**cfg.to_dict(), "method": "rigl"})`` gives RigL's settings);
                ``True`` writes the value every field has now.
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not resolved and f.name in _PRESET_FIELDS and f.name not in self._user_set:
                value = None
            out[f.name] = copy.deepcopy(value)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseTrainingConfig:
        """Build a config from :meth:`to_dict` output (also the fully resolved dicts of older checkpoints)."""
        if not isinstance(data, dict):
            raise ValueError(
                f"`data` must be a dict of SparseTrainingConfig fields, got {type(data).__name__}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SparseTrainingConfig fields {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_preset(cls, method: Method, **overrides: Any) -> SparseTrainingConfig:
        return cls(method=method, **overrides)

    @classmethod
    def coerce(cls, config: Any = None, **overrides: Any) -> SparseTrainingConfig:
        """A config from a ``SparseTrainingConfig``, a dict of its fields or None, with ``overrides`` applied.

        Fields the user did not set stay unset, so an overriding ``method`` still decides them.
        """
        if config is None:
            return cls(**overrides)
        if isinstance(config, Mapping):
            return cls.from_dict({**dict(config), **overrides})
        if isinstance(config, cls):
            return cls.from_dict({**config.to_dict(), **overrides}) if overrides else config
        raise ValueError(
            f"`config` must be a SparseTrainingConfig or a dict of its fields, got {type(config).__name__}."
        )


_PRESET_FIELDS: frozenset[str] = frozenset(
    f.name
    for f in dataclasses.fields(SparseTrainingConfig)
    if f.name in _FALLBACK or f.name == "initial_density"
) | frozenset(key for preset in PRESETS.values() for key in preset)


def _check_presets() -> None:
    """Every preset names a known method and only preset-decided fields (``X | None`` defaulting to None)."""
    if set(PRESETS) != set(METHODS):
        raise RuntimeError(f"PRESETS {sorted(PRESETS)} and the Method choices {sorted(METHODS)} differ.")
    defaults = {f.name: f.default for f in dataclasses.fields(SparseTrainingConfig)}
    for name in _PRESET_FIELDS:
        if defaults.get(name, "missing") is not None:
            raise RuntimeError(f"Preset-decided field {name!r} must be declared with default None.")
    for method, preset in PRESETS.items():
        for name in _PRESET_FIELDS - {"initial_density"}:
            if name not in preset and name not in _FALLBACK:
                raise RuntimeError(f"Preset {method!r} leaves {name!r} undecided and it has no fallback.")


_check_presets()
document_fields_(SparseTrainingConfig)  # help(SparseTrainingConfig) lists every field
refuse_unknown_fields_(SparseTrainingConfig)  # sparsity=0.9 -> "use density=0.1"


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(SparseTrainingConfig)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Refuse ``value`` unless it has the type ``hint`` declares, naming the field, the value and the fix."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if not isinstance(value, str):
            raise ValueError(
                f"`{name}` must be one of {', '.join(map(repr, args))}, got {value!r} ({_type_name(value)})."
            )
        check_choice(name, value, args)
    elif hint is str:
        if not isinstance(value, str):
            raise ValueError(f"`{name}` must be a string, got {value!r} ({_type_name(value)}).")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be True or False, got {value!r} ({_type_name(value)}).")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"`{name}` must be an integer, got {value!r} ({_type_name(value)}); e.g. {name}=0."
            )
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r} ({_type_name(value)}).")
    elif origin is list:
        if (
            isinstance(value, str)
            or not isinstance(value, (list, tuple))
            or not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"`{name}` must be a list of regular expressions, got {value!r}.")


def config_for_run(model: Any, config: SparseTrainingConfig, *, given: bool) -> SparseTrainingConfig:
    """One sparsity config per run: the model's ``config.sparsity`` or ``config``, written into the model.

    A transformers model of any architecture records its settings in ``model.config.sparsity`` (so in
    ``config.json``). Without a config of its own (``given`` False) the run adopts the model's if it has one;
    else ``config`` is written there (:func:`record_settings_`). Other models leave ``config`` as it is.
    """
    model_config = _model_config(model)
    if model_config is None:
        return config
    if not given and getattr(model_config, "sparsity", None):
        config = SparseTrainingConfig.from_dict(dict(model_config.sparsity))
        logger.info("hf_chts: training with the model's config.sparsity (method=%s).", config.method)
        return config
    model_config.sparsity = config.to_dict(resolved=True)
    return config


def record_settings_(model: Any, config: SparseTrainingConfig) -> None:
    """Write ``config`` into ``model.config.sparsity`` (a transformers model; others are left alone)."""
    model_config = _model_config(model)
    if model_config is not None:
        model_config.sparsity = config.to_dict(resolved=True)


def _model_config(model: Any) -> Any:
    """The config of ``model`` (or its PEFT base) that can record settings, or None."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    model_config = getattr(base, "config", None)
    records = hasattr(model_config, "sparsity") or callable(getattr(model_config, "to_json_string", None))
    return model_config if records else None
