"""`SparseTrainingConfig`: every knob of dynamic sparse training, with the paper's methods as presets.

A preset (``method="chts"``, ``"chtss"``, ``"set"`` ...) fills every field the user left at ``None``; any
field given explicitly wins. See ALGORITHM.md section 6 for the table the presets follow.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ._validation import check_choice, check_density, check_fraction, check_positive_int

INIT_METHODS = ("er", "brf", "bsw", "bsf", "csti")
REMOVAL_METHODS = ("none", "magnitude", "ri", "mest")
REGROWTH_METHODS = ("none", "random", "gradient", "ch")
SELECTION_MODES = ("hard", "soft")
CH_VARIANTS = ("CH2_L3n", "CH3_L3n", "CH3.1_L3n", "CH3_L3p")
CH_PRECISIONS = ("exact", "tf32", "bf16")
DENSITY_SCHEDULES = ("constant", "sigmoid", "cubic", "linear", "em_s")
DENSITY_DISTRIBUTIONS = ("uniform", "erk")
DECAY_PRUNING = ("ri", "magnitude")
ZETA_SCHEDULES = ("constant", "cosine")
REMASK_MODES = ("auto", "every_step", "update_steps")

# ALGORITHM.md section 6. Only the fields a preset decides are listed; the rest keep their defaults.
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
METHODS = tuple(PRESETS)


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

    method: str = _help(f"Preset filling the fields left at None: one of {METHODS}.", "chts")
    density: float = _help("Final fraction of links kept in each sparse layer, in (0, 1].", 0.3)
    density_distribution: str = _help(
        "How the global density is spread over layers: 'uniform' or 'erk' (Erdos-Renyi-Kernel).", "uniform"
    )
    # --- initial topology (ALGORITHM.md section 1)
    init: str | None = _help(f"Initial topology: one of {INIT_METHODS}.")
    brf_r: float = _help("BRF randomness r in [0, 1]: 0 = pure receptive field, 1 = uniform random.", 0.3)
    brf_degree_dist: str = _help(
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
    zeta_schedule: str | None = _help("'constant' or 'cosine' (adaptive zeta, annealed to 0 at t_end).")
    removal: str | None = _help(f"Removal score: one of {REMOVAL_METHODS}.")
    removal_mode: str | None = _help("'hard' top-k or 'soft' sampling proportional to score ** T.")
    temperature_start: float = _help("Soft-removal temperature at step 0 (T_start).", 1.0)
    temperature_end: float = _help(
        "Soft-removal temperature at t_end (T_end); higher is closer to top-k.", 9.0
    )
    mest_lambda: float = _help("MEST removal score |W| + lambda * |grad W|.", 0.01)
    # --- regrowth (section 2b, 3)
    regrowth: str | None = _help(f"Regrowth score: one of {REGROWTH_METHODS}.")
    regrowth_mode: str | None = _help("'hard' top-k or 'soft' sampling proportional to the score.")
    ch_variant: str | None = _help(f"Cannistraci-Hebb link predictor: one of {CH_VARIANTS}.")
    ch_precision: str = _help(
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
    density_schedule: str | None = _help(
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
    decay_pruning: str | None = _help("Score used by density-decay pruning: 'ri' or 'magnitude'.")
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
    rewarmup_steps: int = _help("Steps of learning-rate re-warmup after each topology update (0 = off).", 0)
    remask: str = _help(
        "When masked weights are set to 0.0 again after an optimizer step: 'auto' (after every step only for "
        "optimizers not in hf_chts.masking.ZERO_PRESERVING_OPTIMIZERS, which keep them at 0.0 by themselves; "
        "otherwise at topology updates), 'every_step', or 'update_steps' (trust the optimizer).",
        "auto",
    )

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        for key, value in PRESETS[self.method].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        # fields no preset sets but that need a concrete value
        if self.initial_density is None:
            self.initial_density = self.density
        if self.zeta_schedule is None:
            self.zeta_schedule = "constant"
        if self.ch_variant is None:
            self.ch_variant = "CH2_L3n"
        if self.removal_mode is None:
            self.removal_mode = "hard"
        if self.regrowth_mode is None:
            self.regrowth_mode = "hard"
        if self.decay_pruning is None:
            self.decay_pruning = "ri"
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the first bad field, its value and what is allowed."""
        check_density(self.density, "density")
        check_density(self.initial_density, "initial_density")
        check_choice("density_distribution", self.density_distribution, DENSITY_DISTRIBUTIONS)
        check_choice("init", self.init, INIT_METHODS)
        check_fraction(self.brf_r, "brf_r")
        check_choice("brf_degree_dist", self.brf_degree_dist, ("fixed", "uniform"))
        check_fraction(self.bsw_beta, "bsw_beta")
        check_positive_int(self.update_interval, "update_interval")
        if self.t_end is not None:
            check_positive_int(self.t_end, "t_end", allow_zero=True)
        check_fraction(self.t_end_fraction, "t_end_fraction")
        check_fraction(self.zeta, "zeta", high_open=True)
        check_choice("zeta_schedule", self.zeta_schedule, ZETA_SCHEDULES)
        check_choice("removal", self.removal, REMOVAL_METHODS)
        check_choice("removal_mode", self.removal_mode, SELECTION_MODES)
        check_choice("regrowth", self.regrowth, REGROWTH_METHODS)
        check_choice("regrowth_mode", self.regrowth_mode, SELECTION_MODES)
        check_choice("ch_variant", self.ch_variant, CH_VARIANTS)
        check_choice("ch_precision", self.ch_precision, CH_PRECISIONS)
        check_choice("density_schedule", self.density_schedule, DENSITY_SCHEDULES)
        check_choice("decay_pruning", self.decay_pruning, DECAY_PRUNING)
        check_choice("remask", self.remask, REMASK_MODES)
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
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"`{name}` must be a list of regular expressions, got {value!r}.")

    # ------------------------------------------------------------------ derived quantities
    @property
    def is_dynamic(self) -> bool:
        """Whether the topology ever changes (False for ``static``)."""
        return self.regrowth != "none" or self.density_schedule != "constant"

    @property
    def needs_dense_gradient(self) -> bool:
        """RigL/GraNet regrowth and MEST removal read the dense gradient at update steps."""
        return self.regrowth == "gradient" or self.removal == "mest"

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
        t_end = self.resolve_t_end(max_steps)
        if self.is_dynamic and self.update_interval > max(t_end, 1):
            raise ValueError(
                f"update_interval={self.update_interval} is larger than t_end={t_end} "
                f"(max_steps={max_steps}): the topology would never change. Lower `update_interval` or "
                "raise `t_end` / the number of steps, or use method='static'."
            )
        if self.density_schedule not in ("constant", "em_s"):
            decay_end = self.resolve_decay_end(max_steps)
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
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseTrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SparseTrainingConfig fields {unknown}; valid fields: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_preset(cls, method: str, **overrides: Any) -> SparseTrainingConfig:
        return cls(method=method, **overrides)
