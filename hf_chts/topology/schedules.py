"""Schedules of the evolution (spec sections 2 and 4): pure functions of the optimizer step.

- density: :class:`ConstantDensity`, :class:`SigmoidDensityDecay` (CHTss), :class:`CubicDensityDecay`
  (GraNet / GMP), :class:`LinearDensityDecay`, :class:`EMSDensity` (the extra-links schedule of the MLP
  and Transformer research recipes), or :func:`make_density_schedule` by name;
- fraction of links removed per evolution step: :class:`DropFraction` (constant or cosine-annealed zeta);
- soft-removal temperature: :class:`Temperature` (linear ``T_start -> T_end``).

Each is a small frozen dataclass called as ``schedule(step) -> float``. The values a run takes from
:class:`~hf_chts.config.SparseTrainingConfig` (densities, steps, zeta, steepness, temperatures) are checked
there, once, and not again here: each field's help states the range the schedule assumes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

from .._validation import check_choice, check_fraction

__all__ = [
    "DENSITY_SCHEDULES",
    "DROP_FRACTION_KINDS",
    "ConstantDensity",
    "CubicDensityDecay",
    "DropFraction",
    "EMSDensity",
    "LinearDensityDecay",
    "SigmoidDensityDecay",
    "Temperature",
    "make_density_schedule",
]

DENSITY_SCHEDULES = ("constant", "sigmoid", "cubic", "linear", "em_s")
# How the drop fraction zeta moves over the run.
DROP_FRACTION_KINDS = ("constant", "cosine")


def _check_step(step: int) -> int:
    """Accept any integer type (Python, NumPy, 0-d integer tensors); refuse bools, floats and negatives."""
    try:
        value = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(f"`step` must be an integer >= 0 (the optimizer step), got {step!r}.")
    return value


@dataclass(frozen=True)
class ConstantDensity:
    """The same density at every step (SET, RigL, CHT, CHTs).

    Example:
        >>> ConstantDensity(0.3)(1000)
        0.3
    """

    density: float = field(metadata={"help": "Target density in (0, 1], as SparseTrainingConfig checks."})

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        return self.density


@dataclass(frozen=True)
class _DensityDecay:
    """The ranges of the fields are SparseTrainingConfig's (``initial_density``, ``density``, ``decay_start``,
    ``decay_end``), checked there and not again here."""

    initial_density: float = field(metadata={"help": "Density up to `decay_start`, in (0, 1]."})
    final_density: float = field(metadata={"help": "Density from `decay_end` on, in (0, 1], <= initial."})
    decay_start: int = field(metadata={"help": "Optimizer step at which the decay starts (>= 0)."})
    decay_end: int = field(metadata={"help": "Step at which the final density is reached (> decay_start)."})

    def _progress(self, step: int) -> float:
        """Fraction of the decay window elapsed at ``step``, clipped to [0, 1]."""
        span = self.decay_end - self.decay_start
        return min(max((step - self.decay_start) / span, 0.0), 1.0)

    def _density(self, shaped: float) -> float:
        """Interpolate the *sparsity* from ``1 - initial_density`` (at 0) to ``1 - final_density`` (at 1)."""
        if shaped <= 0.0:
            return self.initial_density
        if shaped >= 1.0:
            return self.final_density
        s0, s1 = 1.0 - self.initial_density, 1.0 - self.final_density
        return 1.0 - (s0 + (s1 - s0) * shaped)


@dataclass(frozen=True)
class SigmoidDensityDecay(_DensityDecay):
    """Sigmoid decay of the density, one step per topology update (CHTss, spec section 4).

    With ``u`` the index of the evolution step since ``decay_start``
    (``floor((t - decay_start) / update_interval)``, clipped to ``[0, U]``), ``U`` the number of evolution
    steps in the decay, ``m = U / 2``, ``kappa = steepness / m`` and ``s(u) = 1 / (1 + exp(-kappa (u - m)))``:
    ``shaped(u) = (s(u) - 0.5) / (s(U) - s(0)) + 0.5`` and
    ``sparsity = s_0 + (s_1 - s_0) * shaped(u)``. The endpoints are exactly ``initial_density`` and
    ``final_density``.

    Example:
        >>> schedule = SigmoidDensityDecay(0.5, 0.3, decay_start=0, decay_end=8000, update_interval=100)
        >>> schedule(0), schedule(4000), schedule(8000)
        (0.5, 0.4, 0.3)
    """

    update_interval: int = field(default=1, metadata={"help": "Steps between topology updates (> 0)."})
    steepness: float = field(default=6.0, metadata={"help": "kappa * m (> 0): larger is a sharper sigmoid."})

    def __post_init__(self):
        # A fact of the run's length (decay_end is resolved from max_steps), not of one configured value.
        if self.num_updates < 1:
            raise ValueError(
                f"The decay window [{self.decay_start}, {self.decay_end}] holds no topology update with "
                f"update_interval={self.update_interval}; widen the window or lower `update_interval`."
            )

    @property
    def num_updates(self) -> int:
        """``U``: the number of evolution steps the decay spans."""
        return (self.decay_end - self.decay_start) // self.update_interval

    def shaped(self, u: int) -> float:
        """The normalised sigmoid, 0 at ``u = 0`` and 1 at ``u = U``."""
        total = self.num_updates
        mid = total / 2
        kappa = self.steepness / mid

        def sigmoid(x: float) -> float:
            return 1.0 / (1.0 + math.exp(-kappa * (x - mid)))

        return (sigmoid(u) - 0.5) / (sigmoid(total) - sigmoid(0)) + 0.5

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step < self.decay_start:
            return self.initial_density
        if step >= self.decay_end:
            return self.final_density
        u = min((step - self.decay_start) // self.update_interval, self.num_updates)
        if u == 0:
            return self.initial_density
        if u == self.num_updates:
            return self.final_density
        return self._density(self.shaped(u))


@dataclass(frozen=True)
class CubicDensityDecay(_DensityDecay):
    """Cubic decay (GraNet / GMP): ``sparsity = s_1 + (s_0 - s_1) * (1 - progress) ** 3``.

    ``progress = clip((t - decay_start) / (decay_end - decay_start), 0, 1)``; ``s = 1 - density``.

    Example:
        >>> round(CubicDensityDecay(1.0, 0.2, decay_start=0, decay_end=100)(50), 6)
        0.3
    """

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        return self._density(1.0 - (1.0 - self._progress(step)) ** 3)


@dataclass(frozen=True)
class LinearDensityDecay(_DensityDecay):
    """Linear decay: ``sparsity = s_0 + (s_1 - s_0) * progress``, progress as in :class:`CubicDensityDecay`.

    Example:
        >>> LinearDensityDecay(0.5, 0.3, decay_start=0, decay_end=100)(50)
        0.4
    """

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        return self._density(self._progress(step))


@dataclass(frozen=True)
class EMSDensity:
    """EM_S (``density_schedule="em_s"``): train with extra links, prune them away at the last update.

    Every layer holds ``density + first_extra`` links (as a fraction of all its ``n_out * n_in`` positions)
    from the start until ``hold_fraction * t_end``, then ``density + second_extra`` until the last update
    before ``t_end``; the last update (the largest multiple of ``update_interval`` <= ``t_end``) prunes to
    exactly ``density`` and grows nothing. Every update removes links down to ``density`` (by the removal
    score; ``zeta`` is not used) and regrows the extra ones, so an update in the first phase swaps
    ``first_extra * n_out * n_in`` links and one in the second phase ``second_extra * n_out * n_in``
    (the first update of the second phase removes ``first_extra`` and regrows ``second_extra``). With chain
    removal on, the final prune still ends at exactly ``density``: the links chain removal takes on top of the
    prune are made up by keeping back the strongest links the prune removed, between neurons that are still
    active first (docs/method.md section 4).

    Example:
        >>> schedule = EMSDensity(0.01, t_end=100, update_interval=10)
        >>> [round(schedule(t), 3) for t in (0, 60, 70, 80, 90, 100)]
        [0.06, 0.06, 0.035, 0.035, 0.035, 0.01]
        >>> schedule.regrows(90), schedule.regrows(100)
        (True, False)
    """

    density: float = field(metadata={"help": "Final density in (0, 0.95]: the extra links must fit."})
    t_end: int = field(metadata={"help": "Last step with link removal (> 0)."})
    update_interval: int = field(default=1, metadata={"help": "Steps between topology updates (> 0)."})
    hold_fraction: float = field(default=0.6, metadata={"help": "First phase ends at this x t_end."})
    first_extra: float = field(default=0.05, metadata={"help": "Extra density of the first phase."})
    second_extra: float = field(default=0.025, metadata={"help": "Extra density of the second phase."})

    def __post_init__(self):
        # density, t_end and update_interval are SparseTrainingConfig's, checked there; the phase fractions
        # below are this schedule's own.
        object.__setattr__(self, "hold_fraction", check_fraction(self.hold_fraction, "hold_fraction"))
        for name in ("first_extra", "second_extra"):
            object.__setattr__(self, name, check_fraction(getattr(self, name), name))
        if self.density + self.first_extra > 1.0:
            raise ValueError(
                f"density_schedule='em_s' holds density + {self.first_extra} links before the final prune, "
                f"which does not fit with density={self.density} (at most {1.0 - self.first_extra:.2f}); "
                "lower `density` or use density_schedule='constant'."
            )
        if self.update_interval > self.t_end:
            raise ValueError(
                f"update_interval={self.update_interval} is larger than t_end={self.t_end}: the EM_S "
                "schedule would have no update; lower `update_interval` or raise `t_end`."
            )

    @property
    def last_update(self) -> int:
        """The step of the final prune: the last update at or before ``t_end``."""
        return self.t_end // self.update_interval * self.update_interval

    def extra(self, step: int) -> float:
        """Density above the final one that a layer holds after the update at ``step``."""
        step = _check_step(step)
        if step <= self.hold_fraction * self.t_end and step < self.last_update:
            return self.first_extra
        if step < self.last_update:
            return self.second_extra
        return 0.0

    def regrows(self, step: int) -> bool:
        """Whether the update at ``step`` grows links (every update but the final prune)."""
        return _check_step(step) < self.last_update

    def __call__(self, step: int) -> float:
        return self.density + self.extra(step)


def make_density_schedule(
    kind: str,
    density: float,
    *,
    initial_density: float | None = None,
    decay_start: int = 0,
    decay_end: int | None = None,
    update_interval: int = 1,
    steepness: float = 6.0,
    t_end: int | None = None,
) -> ConstantDensity | SigmoidDensityDecay | CubicDensityDecay | LinearDensityDecay | EMSDensity:
    """Build a density schedule by name.

    Args:
        kind (`str`): ``"constant"``, ``"sigmoid"``, ``"cubic"``, ``"linear"`` or ``"em_s"``.
        density (`float`): the target (final) density.
        initial_density (`float`, *optional*): density before the decay; required by the decays.
        decay_start (`int`, defaults to 0): first step of the decay.
        decay_end (`int`, *optional*): step at which ``density`` is reached; required by the decays.
        update_interval (`int`, defaults to 1): steps between topology updates (sigmoid and em_s).
        steepness (`float`, defaults to 6.0): sigmoid steepness (sigmoid only).
        t_end (`int`, *optional*): last step with link removal; required by ``"em_s"``.

    Returns:
        A callable ``schedule(step) -> density``.

    Example:
        >>> make_density_schedule("linear", 0.3, initial_density=0.5, decay_end=100)(100)
        0.3
    """
    check_choice("density schedule", kind, DENSITY_SCHEDULES)
    if kind == "constant":
        return ConstantDensity(density)
    if kind == "em_s":
        if t_end is None:
            raise ValueError("An 'em_s' density schedule needs `t_end` (the step of the final prune).")
        return EMSDensity(density, t_end, update_interval=update_interval)
    if initial_density is None or decay_end is None:
        raise ValueError(
            f"A {kind!r} density schedule needs `initial_density` and `decay_end` "
            f"(got initial_density={initial_density!r}, decay_end={decay_end!r})."
        )
    if kind == "sigmoid":
        return SigmoidDensityDecay(
            initial_density,
            density,
            decay_start,
            decay_end,
            update_interval=update_interval,
            steepness=steepness,
        )
    decay = CubicDensityDecay if kind == "cubic" else LinearDensityDecay
    return decay(initial_density, density, decay_start, decay_end)


@dataclass(frozen=True)
class DropFraction:
    """Fraction ``zeta_t`` of each layer's links removed at an evolution step (spec section 2).

    ``"constant"``: ``zeta``; ``"cosine"`` (adaptive zeta): ``zeta / 2 * (1 + cos(pi * t / t_end))``, which
    reaches 0 at ``t_end`` and stays there.

    Example:
        >>> DropFraction(0.1, t_end=1000, kind="cosine")(500)
        0.05
    """

    zeta: float = field(metadata={"help": "Initial (or constant) drop fraction, in [0, 1)."})
    t_end: int = field(metadata={"help": "Last step of the evolution (> 0)."})
    kind: str = field(default="constant", metadata={"help": "'constant' or 'cosine'."})

    def __post_init__(self):
        check_choice("drop fraction kind", self.kind, DROP_FRACTION_KINDS)

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if self.kind == "constant":
            return self.zeta
        t = min(step, self.t_end)
        return self.zeta / 2.0 * (1.0 + math.cos(math.pi * t / self.t_end))


@dataclass(frozen=True)
class Temperature:
    """Soft-removal temperature: linear from ``t_start_value`` (step 0) to ``t_end_value`` (``t_end``).

    Constant after ``t_end`` (spec section 2a; LLaMA defaults 1 -> 9).

    Example:
        >>> Temperature(t_end=1000)(500)
        5.0
    """

    t_end: int = field(metadata={"help": "Step at which `t_end_value` is reached (> 0)."})
    t_start_value: float = field(
        default=1.0, metadata={"help": "Temperature at step 0 (> 0, as SparseTrainingConfig checks)."}
    )
    t_end_value: float = field(
        default=9.0, metadata={"help": "Temperature from `t_end` on (> 0, as SparseTrainingConfig checks)."}
    )

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step >= self.t_end:
            return self.t_end_value
        return self.t_start_value + (self.t_end_value - self.t_start_value) * step / self.t_end
