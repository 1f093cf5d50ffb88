"""Tests of hf_chts.topology.schedules: exact values at start, middle and end, monotonicity, validation."""

from __future__ import annotations

import math

import pytest

from hf_chts.topology.schedules import (
    ConstantDensity,
    CubicDensityDecay,
    DropFraction,
    EMSDensity,
    LinearDensityDecay,
    SigmoidDensityDecay,
    Temperature,
    make_density_schedule,
)


def _sigmoid_reference(u: int, total: int, s0: float, s1: float, steepness: float = 6.0) -> float:
    """Spec section 4, written out independently: returns the density."""
    m = total / 2
    kappa = steepness / m

    def s(x):
        return 1 / (1 + math.exp(-kappa * (x - m)))

    shaped = (s(u) - 0.5) / (s(total) - s(0)) + 0.5
    return 1 - (s0 + (s1 - s0) * shaped)


def test_constant():
    schedule = ConstantDensity(0.3)
    assert [schedule(t) for t in (0, 1, 10**6)] == [0.3, 0.3, 0.3]


def test_sigmoid_exact_values():
    schedule = SigmoidDensityDecay(0.5, 0.3, decay_start=1000, decay_end=9000, update_interval=100)
    assert schedule.num_updates == 80
    assert schedule(0) == 0.5 and schedule(999) == 0.5 and schedule(1000) == 0.5 and schedule(1099) == 0.5
    assert schedule(5000) == pytest.approx(0.4, abs=1e-12)  # u = m: half-way
    # u = 20: s(20) = 1 / (1 + e^3), normalised by s(80) - s(0) = tanh(3)
    shaped = (1 / (1 + math.exp(3)) - 0.5) / math.tanh(3) + 0.5
    assert schedule(3000) == pytest.approx(1 - (0.5 + 0.2 * shaped), abs=1e-12)
    assert schedule(3000) == pytest.approx(_sigmoid_reference(20, 80, 0.5, 0.7), abs=1e-12)
    assert schedule(3099) == schedule(3000)  # constant between topology updates
    assert schedule(9000) == 0.3 and schedule(10**6) == 0.3


def test_sigmoid_endpoints_are_exact_and_curve_is_monotonic():
    for d0, d1, start, end, interval, steep in [
        (0.5, 0.05, 0, 8000, 100, 6.0),
        (1.0, 0.01, 7, 1007, 30, 10.0),
    ]:
        schedule = SigmoidDensityDecay(d0, d1, start, end, update_interval=interval, steepness=steep)
        values = [schedule(t) for t in range(0, end + 2 * interval)]
        assert values[0] == d0 and values[-1] == d1
        assert schedule(start + schedule.num_updates * interval) == d1
        assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))
        for u in range(1, schedule.num_updates):
            assert schedule(start + u * interval) == pytest.approx(
                _sigmoid_reference(u, schedule.num_updates, 1 - d0, 1 - d1, steep), abs=1e-12
            )


def test_sigmoid_shape_is_symmetric():
    schedule = SigmoidDensityDecay(0.6, 0.2, 0, 1000, update_interval=10)
    for u in range(0, 101):
        assert schedule.shaped(u) + schedule.shaped(100 - u) == pytest.approx(1.0, abs=1e-12)


def test_cubic_exact_values():
    schedule = CubicDensityDecay(0.5, 0.1, decay_start=100, decay_end=200)
    assert schedule(0) == 0.5 and schedule(100) == 0.5
    # progress 0.5: sparsity = 0.9 + (0.5 - 0.9) * 0.5 ** 3 = 0.85
    assert schedule(150) == pytest.approx(0.15, abs=1e-12)
    assert schedule(200) == 0.1 and schedule(5000) == 0.1
    values = [schedule(t) for t in range(0, 300)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))


def test_linear_exact_values():
    schedule = LinearDensityDecay(0.5, 0.1, decay_start=100, decay_end=200)
    assert schedule(100) == 0.5
    assert schedule(125) == pytest.approx(0.4, abs=1e-12)
    assert schedule(150) == pytest.approx(0.3, abs=1e-12)
    assert schedule(200) == 0.1 and schedule(201) == 0.1


def test_factory():
    assert make_density_schedule("constant", 0.3) == ConstantDensity(0.3)
    sig = make_density_schedule(
        "sigmoid", 0.3, initial_density=0.5, decay_start=0, decay_end=8000, update_interval=100
    )
    assert sig == SigmoidDensityDecay(0.5, 0.3, 0, 8000, update_interval=100)
    assert make_density_schedule("cubic", 0.2, initial_density=1.0, decay_end=10) == CubicDensityDecay(
        1.0, 0.2, 0, 10
    )
    assert isinstance(
        make_density_schedule("linear", 0.2, initial_density=1.0, decay_end=10), LinearDensityDecay
    )
    with pytest.raises(ValueError, match="'constant', 'sigmoid', 'cubic', 'linear'"):
        make_density_schedule("exponential", 0.3)
    with pytest.raises(ValueError, match="initial_density"):
        make_density_schedule("sigmoid", 0.3, decay_end=100)


def test_drop_fraction():
    constant = DropFraction(0.3, t_end=1000)
    assert constant(0) == 0.3 and constant(999) == 0.3
    cosine = DropFraction(0.1, t_end=1000, kind="cosine")
    assert cosine(0) == pytest.approx(0.1)
    assert cosine(500) == pytest.approx(0.05)
    assert cosine(250) == pytest.approx(0.05 * (1 + math.sqrt(0.5)))
    assert cosine(1000) == pytest.approx(0.0, abs=1e-15) and cosine(2000) == pytest.approx(0.0, abs=1e-15)


def test_temperature():
    schedule = Temperature(t_end=1000)
    assert (schedule(0), schedule(500), schedule(1000), schedule(5000)) == (1.0, 5.0, 9.0, 9.0)
    mt = Temperature(t_end=10, t_start_value=1.0, t_end_value=3.0)
    assert mt(5) == 2.0


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: SigmoidDensityDecay(0.5, 0.3, 0, 50, update_interval=100), "no topology update"),
        (lambda: DropFraction(0.1, 100, kind="linear"), "'constant', 'cosine'"),
        (lambda: EMSDensity(0.3, 100, first_extra=1.5), "first_extra"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "schedule",
    [ConstantDensity(0.3), LinearDensityDecay(0.5, 0.3, 0, 10), DropFraction(0.1, 10), Temperature(t_end=10)],
)
def test_bad_steps(schedule):
    for step in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            schedule(step)
