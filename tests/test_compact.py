"""Compact checkpoints (values + bitmask), reading masks from checkpoint folders, mask statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _io_helpers import make_sparse_llama
from safetensors import safe_open

from hf_chts.checkpointing import tensor_checksum
from hf_chts.compact import (
    COMPACT_FILE,
    folder_size,
    is_compact,
    layer_sort_key,
    load_compact,
    load_sparse_model,
    mask_statistics,
    mlp_active_neurons,
    pack_mask,
    read_masks,
    save_compact,
    save_dense,
    summarize_by_layer_type,
    to_dense_model,
    unpack_mask,
)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_pack_mask_layout_is_little_endian_per_row():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 0] = mask[0, 8] = True  # bit 0 of byte 0, bit 0 of byte 1
    mask[1, 7] = mask[1, 9] = True  # bit 7 of byte 0, bit 1 of byte 1
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[1, 1], [128, 2]]
    assert torch.equal(unpack_mask(packed, (2, 10)), mask)


@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (5, 13), (17, 64)])
def test_pack_unpack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = pack_mask(mask)
    assert packed.shape == (shape[0], (shape[1] + 7) // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(packed.numpy(), ref)


def test_unpack_rejects_wrong_shape():
    with pytest.raises(ValueError, match="bitmask for shape"):
        unpack_mask(torch.zeros(2, 1, dtype=torch.uint8), (2, 10))


@pytest.mark.parametrize(
    ("dtype", "tie", "plain"),
    [(torch.float32, False, False), (torch.bfloat16, True, False), (torch.float32, True, True)],
    ids=["sparse_llama-fp32", "sparse_llama-bf16-tied", "plain_llama-tied"],
)
def test_compact_round_trip_is_exact(tmp_path, dtype, tie, plain):
    model = make_sparse_llama(dtype=dtype, tie=tie, plain=plain)
    # a kept link whose value is 0.0 must survive as a link
    up = model.model.layers[0].mlp.up_proj
    kept = up.weight_mask.nonzero()[0]
    with torch.no_grad():
        up.weight[kept[0], kept[1]] = 0.0
    path = save_compact(model, tmp_path / "c")
    assert path.name == COMPACT_FILE and is_compact(tmp_path / "c")
    reloaded = load_compact(tmp_path / "c")
    assert type(reloaded) is type(model)
    assert_same_state(model, reloaded)
    assert bool(reloaded.model.layers[0].mlp.up_proj.weight_mask[kept[0], kept[1]])
    if tie:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[0, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_compact_file_layout(tmp_path):
    model = make_sparse_llama()
    save_compact(model, tmp_path)
    q = model.model.layers[1].self_attn.q_proj
    name = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(str(tmp_path / COMPACT_FILE), framework="pt") as f:
        assert f.metadata()["format"] == "hf_chts.compact"
        assert f.get_tensor(name + ".shape").tolist() == list(q.weight.shape)
        assert torch.equal(f.get_tensor(name + ".values"), q.weight.detach()[q.weight_mask])
        assert torch.equal(f.get_tensor(name + ".bitmask"), pack_mask(q.weight_mask))
        assert name not in f.keys() and name + "_mask" not in f.keys()
        assert torch.equal(
            f.get_tensor("model.embed_tokens.weight"), model.model.embed_tokens.weight.detach()
        )


def test_compact_size_at_30_percent_density(tmp_path):
    """30% density: the compact file is <= 40% of the sparse save_pretrained and of the dense export."""
    # the ratio is a property of the file format; a plain LLaMA with random masks builds in a fraction of the
    # time BRF needs for 28 layers of this size
    model = make_sparse_llama(
        hidden=128, intermediate=352, layers=4, heads=4, vocab_size=256, tie=True, plain=True
    )
    model.save_pretrained(tmp_path / "sparse")
    save_compact(model, tmp_path / "compact")
    reloaded = load_compact(tmp_path / "compact")
    assert_same_state(model, reloaded)
    # a plain LLaMA that carries masks keeps them out of DDP's per-forward buffer broadcast
    masks = [n for n, _ in reloaded.named_buffers() if n.endswith("weight_mask")]
    assert masks and set(masks) <= set(reloaded._ddp_params_and_buffers_to_ignore)
    save_dense(model, tmp_path / "dense")
    sparse, compact, dense = (folder_size(tmp_path / n) for n in ("sparse", "compact", "dense"))
    assert compact <= 0.40 * sparse, (compact, sparse)
    assert compact <= 0.40 * dense, (compact, dense)


def test_save_compact_refuses_nonzero_masked_weight(tmp_path):
    model = make_sparse_llama()
    v = model.model.layers[0].self_attn.v_proj
    off = (~v.weight_mask).nonzero()[0]
    with torch.no_grad():
        v.weight[off[0], off[1]] = 1.0
    with pytest.raises(ValueError, match="non-zero values at masked positions"):
        save_compact(model, tmp_path)


@pytest.mark.parametrize("plain", [False, True], ids=["sparse_llama", "plain_llama"])
def test_save_compact_refuses_dense_model(tmp_path, plain):
    dense = to_dense_model(make_sparse_llama(plain=plain))
    assert not any(name.endswith("weight_mask") for name, _ in dense.named_buffers())
    with pytest.raises(ValueError, match="no `weight_mask` buffers"):
        save_compact(dense, tmp_path)


def test_read_masks_same_for_both_formats(tmp_path):
    model = make_sparse_llama()
    model.save_pretrained(tmp_path / "sp")
    save_compact(model, tmp_path / "cp")
    a, b = read_masks(tmp_path / "sp"), read_masks(tmp_path / "cp")
    assert list(a) == list(b) and len(a) == 14
    for name in a:
        assert a[name].dtype == torch.bool
        assert torch.equal(a[name], b[name])
        assert torch.equal(a[name], model.get_submodule(name).weight_mask)


def test_read_masks_of_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        read_masks(tmp_path)


@pytest.mark.parametrize("plain", [False, True], ids=["sparse_llama", "plain_llama"])
def test_load_sparse_model_restores_masks(tmp_path, plain):
    model = make_sparse_llama(plain=plain)
    model.save_pretrained(tmp_path)
    loaded = load_sparse_model(tmp_path)
    assert type(loaded) is type(model)
    assert_same_state(model, loaded)


def test_save_dense_has_no_masks(tmp_path):
    from transformers import LlamaForCausalLM

    model = make_sparse_llama()
    expected = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("weight_mask")}
    save_dense(model, tmp_path)
    assert read_masks(tmp_path) == {}
    dense = LlamaForCausalLM.from_pretrained(tmp_path)
    state = dense.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_mask_statistics_hand_built():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)  # 3 out x 4 in
    stats = mask_statistics({"a.q_proj": mask})["a.q_proj"]
    assert stats["shape"] == [3, 4] and stats["nnz"] == 4 and stats["density"] == 4 / 12
    assert stats["in_degree"] == {"min": 0.0, "mean": 4 / 3, "max": 2.0, "std": pytest.approx((8 / 9) ** 0.5)}
    assert stats["out_degree"]["min"] == 0.0 and stats["out_degree"]["max"] == 2.0
    assert stats["active_out"] == 2 / 3 and stats["active_in"] == 3 / 4
    assert stats["active_neurons"] == (2 / 3 + 3 / 4) / 2
    transposed = mask_statistics({"c": mask.T}, transposed=True)["c"]
    assert transposed == stats
    summary = summarize_by_layer_type({"x.0.q_proj": stats, "x.1.q_proj": stats})
    assert summary["q_proj"]["layers"] == 2 and summary["q_proj"]["density"] == 4 / 12
    assert summary["all"]["nnz"] == 8


def test_mlp_active_neurons_hand_built():
    gate = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)  # hidden 4 x in 2; row 2 dead
    up = torch.ones(4, 2, dtype=torch.bool)
    down = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]], dtype=torch.bool)  # out 2 x hidden 4; column 3 dead
    masks = {"l.0.mlp.gate_proj": gate, "l.0.mlp.up_proj": up, "l.0.mlp.down_proj": down}
    assert mlp_active_neurons(masks) == 2 / 4
    assert mlp_active_neurons({"l.0.self_attn.q_proj": up}) is None


def test_compact_keeps_model_type(tmp_path):
    model = make_sparse_llama(tie=True)
    model.save_pretrained(tmp_path / "sp")
    save_compact(model, tmp_path / "cp")
    assert json.loads((tmp_path / "cp" / "config.json").read_text())["model_type"] == "sparse_llama"
    assert json.loads((tmp_path / "cp" / "config.json").read_text())["sparsity"]["method"] == "chts"
    from_files = read_masks(tmp_path / "sp")
    assert all(torch.equal(from_files[k], v) for k, v in read_masks(tmp_path / "cp").items())


def test_layer_order_is_numeric_then_by_type():
    names = [
        "model.layers.10.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    assert sorted(names, key=layer_sort_key) == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.10.self_attn.q_proj",
    ]
    stats = mask_statistics({n: torch.ones(2, 2, dtype=torch.bool) for n in names})
    assert list(summarize_by_layer_type(stats)) == ["q_proj", "down_proj", "all"]


# ------------------------------------------------------------------------------------------ refusing loaders
UP = "model.layers.0.mlp.up_proj"


def _rewrite_compact(folder, edit, resum=True):
    from safetensors.torch import load_file, save_file

    path = folder / COMPACT_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    result = edit(tensors, metadata)
    metadata = result if isinstance(result, dict) else metadata
    if resum:  # an edit that also rewrites the checksums, so the checks behind them are reached
        metadata["checksums"] = json.dumps({k: tensor_checksum(t) for k, t in tensors.items()})
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t, m: t.pop("model.embed_tokens.weight"), r"missing 1 tensors.*model\.embed_tokens\.weight"),
        (lambda t, m: t.update(extra=torch.zeros(2)), r"1 tensors the model does not have \(extra\)"),
        (lambda t, m: {**m, "tied": "{bad"}, r"`tied` metadata must be a JSON object"),
        (lambda t, m: {**m, "tied": '{"lm_head.weight": "nowhere"}'}, r"maps 'lm_head.weight' to 'nowhere'"),
        (
            lambda t, m: t.update({"model.layers.0.mlp.up_proj.weight.shape": torch.tensor([64, 32, 1])}),
            r"up_proj\.weight\.shape must be int64 \[rows, cols\]",
        ),
        (
            lambda t, m: t.update({UP + ".weight.values": t[UP + ".weight.values"].reshape(2, -1)}),
            r"up_proj\.weight\.values must be 1-D with one value per kept link",
        ),
        (
            lambda t, m: t.update({UP + ".weight.values": t[UP + ".weight.values"][:-1]}),
            r"up_proj\.weight\.values must be 1-D with one value per kept link",
        ),
    ],
)
def test_compact_with_missing_extra_or_bad_entries_is_refused(tmp_path, edit, match):
    save_compact(make_sparse_llama(plain=True), tmp_path / "c")
    _rewrite_compact(tmp_path / "c", edit)
    with pytest.raises(ValueError, match=match) as info:
        load_compact(tmp_path / "c")
    assert COMPACT_FILE in str(info.value)


def test_compact_with_swapped_bitmasks_is_refused_by_its_checksums(tmp_path):
    save_compact(make_sparse_llama(plain=True), tmp_path / "c")
    a, b = "model.layers.0.mlp.up_proj.weight.bitmask", "model.layers.0.mlp.gate_proj.weight.bitmask"

    def swap(tensors, metadata):
        assert tensors[a].shape == tensors[b].shape and not torch.equal(tensors[a], tensors[b])
        tensors[a], tensors[b] = tensors[b], tensors[a]

    _rewrite_compact(tmp_path / "c", swap, resum=False)
    for load in (load_compact, read_masks):
        with pytest.raises(
            ValueError, match=r"tensor '.*bitmask' has other content than the checksum"
        ) as info:
            load(tmp_path / "c")
        assert COMPACT_FILE in str(info.value) and "Export the checkpoint again" in str(info.value)


@pytest.mark.parametrize("plain", [True, False])
def test_nonzero_masked_weights_are_refused_by_both_loaders(tmp_path, plain):
    from safetensors.torch import load_file, save_file

    from hf_chts.compact import zero_masked_weights
    from hf_chts.modeling import SparseLlamaForCausalLM

    model = make_sparse_llama(plain=plain)
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.mlp.down_proj"
    weight, mask = tensors[name + ".weight"], tensors[name + ".weight_mask"]
    weight[~mask] = 0.5  # what an edit or a writer outside the masking contract leaves
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*non-zero where its weight_mask removes"):
        load_sparse_model(tmp_path / "m")
    if not plain:
        with pytest.raises(ValueError, match=rf"{name} that are non-zero where its weight_mask removes"):
            SparseLlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert zero_masked_weights(tmp_path / "m") == int((~mask).sum())
    assert_same_state(model, load_sparse_model(tmp_path / "m"))


def test_truncated_weights_file_is_refused_with_its_name(tmp_path):
    make_sparse_llama(plain=True).save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        load_sparse_model(tmp_path / "m")
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated"):
        read_masks(tmp_path / "m")


def test_an_interrupted_compact_save_leaves_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    model = make_sparse_llama(plain=True)
    save_compact(model, tmp_path / "c")
    before = (tmp_path / "c" / COMPACT_FILE).read_bytes()

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with pytest.raises(OSError):
        save_compact(model, tmp_path / "c")
    assert (tmp_path / "c" / COMPACT_FILE).read_bytes() == before
    assert_same_state(model, load_compact(tmp_path / "c"))
