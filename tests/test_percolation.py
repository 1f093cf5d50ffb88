"""Tests of hf_chts.topology.percolation: dangling neurons, cascades, LLaMA blocks with GQA, statistics."""

from __future__ import annotations

import pytest
import torch

from hf_chts.topology.percolation import (
    LayerChain,
    LlamaBlockChain,
    PercolationStats,
    active_neurons,
    chain_removal,
)


def _m(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _assert_no_dangling(masks: dict[str, torch.Tensor], chain: LayerChain) -> None:
    for first, second in zip(chain.layers[:-1], chain.layers[1:], strict=True):
        has_in, has_out = masks[first].any(1), masks[second].any(0)
        assert torch.equal(has_in, has_out), f"dangling neuron between {first} and {second}"


def test_active_neurons():
    assert active_neurons(_m([[1, 0, 0], [0, 0, 0]])) == (0.5, 1 / 3)
    assert active_neurons(torch.ones(2, 5)) == (1.0, 1.0)
    assert active_neurons(torch.zeros(4, 2, dtype=torch.bool)) == (0.0, 0.0)


def test_two_layer_chain_exact():
    # fc1: 3 hidden x 2 inputs, fc2: 2 outputs x 3 hidden.
    # hidden 0: in and out -> kept; hidden 1: no input -> its out links go;
    # hidden 2: no output -> its in links go.
    masks = {"fc1": _m([[1, 1], [0, 0], [0, 1]]), "fc2": _m([[1, 1, 0], [0, 1, 0]])}
    new, stats = chain_removal(masks, LayerChain(["fc1", "fc2"]))
    assert new["fc1"].tolist() == [[True, True], [False, False], [False, False]]
    assert new["fc2"].tolist() == [[True, False, False], [False, False, False]]
    assert stats["fc1"] == PercolationStats(
        links_removed=1, active_out_fraction=1 / 3, active_in_fraction=1.0
    )
    assert stats["fc2"] == PercolationStats(
        links_removed=2, active_out_fraction=0.5, active_in_fraction=1 / 3
    )
    # The inputs are untouched.
    assert masks["fc1"].tolist() == [[True, True], [False, False], [False, True]]


def test_cascade_across_a_three_layer_chain():
    # fc3 never reads hidden neuron 1 of the second hidden layer -> fc2 row 1 is cleared -> the first hidden
    # neuron 1 (whose only output was fc2[1, 1]) becomes dangling -> fc1 row 1 is cleared as well.
    masks = {
        "fc1": _m([[1, 0], [1, 1]]),
        "fc2": _m([[1, 0], [0, 1]]),
        "fc3": _m([[1, 0]]),
    }
    chain = LayerChain(["fc1", "fc2", "fc3"])
    new, stats = chain_removal(masks, [chain])
    assert new["fc1"].tolist() == [[True, False], [False, False]]
    assert new["fc2"].tolist() == [[True, False], [False, False]]
    assert new["fc3"].tolist() == [[True, False]]
    assert [stats[n].links_removed for n in ("fc1", "fc2", "fc3")] == [2, 1, 0]
    _assert_no_dangling(new, chain)


def test_backward_cascade():
    # fc1 row 0 empty -> fc2 column 0 cleared -> fc2 row 0 empty -> fc3 column 0 cleared.
    masks = {"fc1": _m([[0, 0], [1, 0]]), "fc2": _m([[1, 0], [0, 1]]), "fc3": _m([[1, 1]])}
    new, _ = chain_removal(masks, LayerChain(["fc1", "fc2", "fc3"]))
    assert new["fc2"].tolist() == [[False, False], [False, True]]
    assert new["fc3"].tolist() == [[False, True]]


def test_random_chains_leave_no_dangling_neuron():
    g = torch.Generator().manual_seed(0)
    sizes = [20, 30, 25, 30, 10]
    masks = {f"fc{i}": torch.rand(sizes[i + 1], sizes[i], generator=g) < 0.04 for i in range(4)}
    chain = LayerChain([f"fc{i}" for i in range(4)])
    new, stats = chain_removal(masks, chain)
    _assert_no_dangling(new, chain)
    for name in masks:
        assert not bool((new[name] & ~masks[name]).any())
        assert stats[name].links_removed == int(masks[name].sum()) - int(new[name].sum())
    assert sum(s.links_removed for s in stats.values()) > 0
    # A second pass is a no-op: the result is a fixed point.
    again, stats2 = chain_removal(new, chain)
    assert all(torch.equal(again[n], new[n]) for n in new)
    assert all(s.links_removed == 0 for s in stats2.values())


def test_layers_outside_chains_are_reported_untouched():
    masks = {"fc1": _m([[1], [0]]), "fc2": _m([[1, 1]]), "lm_head": _m([[0, 1]])}
    new, stats = chain_removal(masks, [LayerChain(["fc1", "fc2"])])
    assert torch.equal(new["lm_head"], masks["lm_head"])
    assert stats["lm_head"] == PercolationStats(0, 1.0, 0.5)


def _llama_masks(h=4, hkv=2, hd=4, d=6, inter=5, fill=True):
    full = lambda r, c: torch.ones(r, c, dtype=torch.bool) if fill else torch.zeros(r, c, dtype=torch.bool)  # noqa: E731
    return {
        "q": full(h * hd, d),
        "k": full(hkv * hd, d),
        "v": full(hkv * hd, d),
        "o": full(d, h * hd),
        "gate": full(inter, d),
        "up": full(inter, d),
        "down": full(d, inter),
    }


def _block(rotary=False, h=4, hkv=2, hd=4):
    return LlamaBlockChain(
        q="q", k="k", v="v", o="o", gate="gate", up="up", down="down",
        num_heads=h, num_kv_heads=hkv, head_dim=hd, rotary=rotary,
    )  # fmt: skip


def test_llama_dense_block_is_untouched():
    masks = _llama_masks()
    new, stats = chain_removal(masks, _block())
    assert all(torch.equal(new[n], masks[n]) for n in masks)
    assert all(s.links_removed == 0 for s in stats.values())


def test_llama_qk_pairing_with_gqa():
    # H=4 query heads, Hkv=2 kv heads (group of 2: q heads 0,1 -> kv 0; q heads 2,3 -> kv 1), hd=4.
    masks = _llama_masks()
    hd = 4
    masks["k"][0 * hd + 1] = False  # kv head 0, dim 1 empty: q rows (0,1) and (1,1) must go
    masks["q"][2 * hd + 3] = False  # q head 2, dim 3 empty; q head 3, dim 3 still pairs with kv 1 dim 3
    masks["q"][0 * hd + 2] = False  # q heads 0 and 1 at dim 2 empty: kv 0 dim 2 has no partner left
    masks["q"][1 * hd + 2] = False
    new, stats = chain_removal(masks, _block(rotary=False))
    q_rows = new["q"].any(1).view(4, hd)
    k_rows = new["k"].any(1).view(2, hd)
    expected_q = torch.ones(4, hd, dtype=torch.bool)
    expected_q[0, 1] = expected_q[1, 1] = False
    expected_q[2, 3] = False
    expected_q[0, 2] = expected_q[1, 2] = False
    expected_k = torch.ones(2, hd, dtype=torch.bool)
    expected_k[0, 1] = False
    expected_k[0, 2] = False
    assert torch.equal(q_rows, expected_q)
    assert torch.equal(k_rows, expected_k)
    assert stats["q"].links_removed == 2 * 6  # two q rows of 6 links cleared by the pairing
    assert stats["k"].links_removed == 6  # kv 0 dim 2
    # v, o and the MLP are not affected by q/k.
    for name in ("v", "o", "gate", "up", "down"):
        assert torch.equal(new[name], masks[name])


def test_llama_qk_rotary_pairs_dimension_with_its_partner():
    masks = _llama_masks()
    hd = 4  # rotary partners: 0 <-> 2, 1 <-> 3
    masks["k"][0 * hd + 1] = False  # kv 0 dim 1 empty, but its partner dim 3 is not: q rows (0,1),(1,1) stay
    masks["k"][1 * hd + 0] = False  # kv 1 dims 0 and 2 both empty: q rows (2,0),(2,2),(3,0),(3,2) go
    masks["k"][1 * hd + 2] = False
    new, _ = chain_removal(masks, _block(rotary=True))
    q_rows = new["q"].any(1).view(4, hd)
    expected_q = torch.ones(4, hd, dtype=torch.bool)
    expected_q[2:, 0] = expected_q[2:, 2] = False
    assert torch.equal(q_rows, expected_q)
    # Without rotary pairing the q rows (0,1) and (1,1) would have been cleared too.
    new_plain, _ = chain_removal(masks, _block(rotary=False))
    assert not bool(new_plain["q"].any(1).view(4, hd)[:2, 1].any())


def test_llama_v_o_with_gqa():
    masks = _llama_masks()
    hd = 4
    masks["v"][1 * hd + 0] = False  # kv 1 dim 0 empty: o columns (2,0), (3,0) go
    masks["o"][:, 0 * hd + 3] = False  # o columns (0,3) and (1,3) empty: v row (0,3) is unused
    masks["o"][:, 1 * hd + 3] = False
    masks["o"][:, 2 * hd + 1] = False  # o column (2,1) empty, (3,1) still reads v row (1,1): v row stays
    new, stats = chain_removal(masks, _block())
    o_cols = new["o"].any(0).view(4, hd)
    v_rows = new["v"].any(1).view(2, hd)
    expected_o = torch.ones(4, hd, dtype=torch.bool)
    expected_o[2, 0] = expected_o[3, 0] = False
    expected_o[0, 3] = expected_o[1, 3] = False
    expected_o[2, 1] = False
    expected_v = torch.ones(2, hd, dtype=torch.bool)
    expected_v[1, 0] = False
    expected_v[0, 3] = False
    assert torch.equal(o_cols, expected_o)
    assert torch.equal(v_rows, expected_v)
    assert stats["o"].links_removed == 2 * 6  # the columns (2,0), (3,0) had 6 links each
    assert stats["v"].links_removed == 6


def test_llama_mlp_gate_up_down():
    masks = _llama_masks()
    masks["gate"][0] = False  # neuron 0: no gate -> up row 0 and down column 0 go
    masks["up"][1] = False  # neuron 1: no up -> gate row 1 and down column 1 go
    masks["down"][:, 2] = False  # neuron 2: unread -> gate and up rows 2 go
    new, stats = chain_removal(masks, _block())
    active = torch.tensor([False, False, False, True, True])
    assert torch.equal(new["gate"].any(1), active)
    assert torch.equal(new["up"].any(1), active)
    assert torch.equal(new["down"].any(0), active)
    assert stats["gate"].links_removed == 2 * 6 and stats["up"].links_removed == 2 * 6
    assert stats["down"].links_removed == 2 * 6
    assert stats["gate"].active_out_fraction == pytest.approx(0.4)


@pytest.mark.parametrize("rotary", [False, True])
def test_llama_random_sparse_block_reaches_a_consistent_fixed_point(rotary):
    g = torch.Generator().manual_seed(0)
    h, hkv, hd = 8, 2, 6
    masks = {
        n: torch.rand(m.shape, generator=g) < 0.04
        for n, m in _llama_masks(h, hkv, hd, d=40, inter=60).items()
    }
    block = _block(rotary=rotary, h=h, hkv=hkv, hd=hd)
    new, stats = chain_removal(masks, block)
    group = h // hkv
    # MLP: every hidden neuron has all three or none.
    gate, up, down = new["gate"].any(1), new["up"].any(1), new["down"].any(0)
    assert torch.equal(gate, up) and torch.equal(up, down)
    # v -> o: every active o column reads an active v row; every active v row is read.
    v_rows, o_cols = new["v"].any(1).view(hkv, hd), new["o"].any(0).view(h, hd)
    assert not bool((o_cols & ~v_rows.repeat_interleave(group, 0)).any())
    assert torch.equal(o_cols.view(hkv, group, hd).any(1), v_rows)
    # Fixed point.
    again, _ = chain_removal(new, block)
    assert all(torch.equal(again[n], new[n]) for n in new)
    assert sum(s.links_removed for s in stats.values()) > 0


def test_from_prefix_and_shared_chains():
    block = LlamaBlockChain.from_prefix(
        "model.layers.3.", num_heads=4, num_kv_heads=2, head_dim=4, rotary=False
    )
    assert block.down == "model.layers.3.mlp.down_proj"
    masks = {
        getattr(block, r): m
        for r, m in zip(("q", "k", "v", "o", "gate", "up", "down"), _llama_masks().values(), strict=True)
    }
    new, _ = chain_removal(masks, [block])
    assert set(new) == set(masks)


def test_bad_chains():
    with pytest.raises(ValueError, match="at least 2"):
        LayerChain(["fc1"])
    with pytest.raises(ValueError, match="sequence of layer names"):
        LayerChain("fc1")
    with pytest.raises(ValueError, match="repeat"):
        LayerChain(["a", "b", "a"])
    with pytest.raises(ValueError, match="multiple of `num_kv_heads`"):
        _block(h=4, hkv=3)
    with pytest.raises(ValueError, match="even `head_dim`"):
        _block(rotary=True, hd=3)
    with pytest.raises(ValueError, match="num_heads"):
        _block(h=0)
    masks = {"fc1": _m([[1, 1]]), "fc2": _m([[1, 1]])}
    with pytest.raises(ValueError, match="cannot be chained"):
        chain_removal(masks, LayerChain(["fc1", "fc2"]))
    with pytest.raises(ValueError, match="without a mask"):
        chain_removal(masks, LayerChain(["fc1", "fc3"]))
    with pytest.raises(ValueError, match="expected"):
        chain_removal(_llama_masks(), _block(h=2, hkv=2))
    with pytest.raises(ValueError, match="LayerChain or a LlamaBlockChain"):
        chain_removal(masks, [("fc1", "fc2")])


def test_inplace():
    masks = {"fc1": _m([[1, 1], [0, 0]]), "fc2": _m([[1, 1]])}
    fc2 = masks["fc2"]
    new, stats = chain_removal(masks, LayerChain(["fc1", "fc2"]), inplace=True)
    assert new["fc2"] is fc2 and fc2.tolist() == [[True, False]]
    assert stats["fc2"].links_removed == 1
    with pytest.raises(ValueError, match="boolean masks"):
        chain_removal(
            {"fc1": torch.ones(2, 2), "fc2": torch.ones(1, 2)}, LayerChain(["fc1", "fc2"]), inplace=True
        )
