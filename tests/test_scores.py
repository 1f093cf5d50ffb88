"""Tests of hf_chts.topology.scores: magnitude, RI and MEST on hand-built weights."""

from __future__ import annotations

import pytest
import torch

from hf_chts.topology.scores import REMOVAL_METHODS, removal_scores

W = torch.tensor([[1.0, -3.0, 0.0], [0.0, 2.0, -4.0]])


def test_magnitude_is_absolute_value():
    scores = removal_scores(W, "magnitude")
    assert scores.dtype == torch.float32
    assert torch.equal(scores, W.abs())


def test_relative_importance_exact():
    eps = 1e-5
    col = torch.tensor([1.0, 5.0, 4.0])  # sum over rows
    row = torch.tensor([[4.0], [6.0]])  # sum over columns
    expected = W.abs() / (col + eps) + W.abs() / (row + eps)
    assert torch.allclose(removal_scores(W, "ri"), expected, rtol=0, atol=1e-7)
    # by hand: |W|[0,1] = 3 -> 3/5 + 3/4
    assert removal_scores(W, "ri")[0, 1].item() == pytest.approx(0.6 + 0.75, abs=1e-5)
    assert removal_scores(W, "ri")[1, 0].item() == 0.0


def test_relative_importance_empty_rows_stay_finite():
    weight = torch.zeros(3, 4)
    weight[0, 0] = 2.0
    scores = removal_scores(weight, "ri", eps=1e-5)
    assert torch.isfinite(scores).all()
    assert scores[0, 0].item() == pytest.approx(2.0, rel=1e-4)  # 2/2 + 2/2


def test_mest_adds_scaled_gradient():
    grad = torch.tensor([[10.0, -20.0, 30.0], [0.0, 1.0, -1.0]])
    assert torch.allclose(removal_scores(W, "mest", grad=grad), W.abs() + 0.01 * grad.abs())
    assert torch.allclose(removal_scores(W, "mest", grad=grad, mest_lambda=0.5), W.abs() + 0.5 * grad.abs())


def test_mest_needs_grad():
    with pytest.raises(ValueError, match="grad="):
        removal_scores(W, "mest")
    with pytest.raises(ValueError, match="shape"):
        removal_scores(W, "mest", grad=torch.zeros(3, 2))


def test_low_precision_weights_give_float32_scores():
    for method in REMOVAL_METHODS:
        scores = removal_scores(W.bfloat16(), method, grad=torch.ones(2, 3, dtype=torch.bfloat16))
        assert scores.dtype == torch.float32 and scores.shape == W.shape


def test_input_is_not_modified():
    weight = W.clone()
    removal_scores(weight, "mest", grad=torch.ones(2, 3))
    assert torch.equal(weight, W)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "taylor"}, "'magnitude', 'ri', 'mest'"),
        ({"method": "ri", "eps": 0.0}, "eps"),
        ({"method": "mest", "grad": torch.ones(2, 3), "mest_lambda": -1.0}, "mest_lambda"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        removal_scores(W, **kwargs)


def test_weight_must_be_2d():
    with pytest.raises(ValueError, match="2-D"):
        removal_scores(torch.ones(4), "magnitude")
