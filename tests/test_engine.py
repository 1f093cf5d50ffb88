import pytest
import torch

from hf_chts._validation import link_count
from hf_chts.config import METHODS, SparseTrainingConfig
from hf_chts.engine import TopologyEngine, derive_generator
from hf_chts.topology.percolation import LayerChain

SHAPES = {"fc1": (24, 16), "fc2": (20, 24), "fc3": (10, 20)}


def make_engine(method, max_steps=100, **kw):
    kw.setdefault("update_interval", 10)
    cfg = SparseTrainingConfig(method=method, density=kw.pop("density", 0.3), **kw)
    return TopologyEngine(cfg, SHAPES, chains=[LayerChain(["fc1", "fc2", "fc3"])], max_steps=max_steps)


def fake_training_state(masks, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(m.shape, generator=g) * m for n, m in masks.items()}
    grads = {n: torch.randn(m.shape, generator=g) for n, m in masks.items()}
    return weights, grads


def test_generators_are_stable_and_distinct():
    a = torch.rand(4, generator=derive_generator(3, 10, "fc1", "remove"))
    b = torch.rand(4, generator=derive_generator(3, 10, "fc1", "remove"))
    c = torch.rand(4, generator=derive_generator(3, 10, "fc2", "remove"))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("method", METHODS)
def test_init_masks_exact_and_seeded(method):
    engine = make_engine(method)
    masks = engine.init_masks()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.shape == SHAPES[name]
        assert int(mask.sum()) == engine.target_nnz(name, 0)
    again = make_engine(method).init_masks()
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    other = make_engine(method, seed=1).init_masks()
    assert any(not torch.equal(masks[n], other[n]) for n in masks)


def test_init_masks_come_from_the_layer_stream_key():
    from hf_chts.topology.init import init_mask
    from hf_chts.topology.rng import stream_key

    engine = make_engine("chtss", seed=5)
    cfg = engine.config
    for name, mask in engine.init_masks().items():
        expected = init_mask(
            SHAPES[name],
            engine.layer_density(name, 0),
            cfg.init,
            key=stream_key(5, "init", name),
            r=cfg.brf_r,
        )
        assert torch.equal(mask, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_init_masks_identical_on_cpu_and_cuda(method):
    cpu, cuda = make_engine(method).init_masks("cpu"), make_engine(method).init_masks("cuda")
    for name in cpu:
        assert cuda[name].device.type == "cuda" and torch.equal(cuda[name].cpu(), cpu[name]), name


@pytest.mark.parametrize("method", [m for m in METHODS if m != "static"])
def test_one_step_keeps_exact_counts_and_only_grows_on_empty_positions(method):
    engine = make_engine(method)
    masks = engine.init_masks()
    weights, grads = fake_training_state(masks)
    new, grown, stats = engine.step(10, masks, weights, grads)
    for name in SHAPES:
        assert int(new[name].sum()) == engine.target_nnz(name, 10)
        layer = stats.layers[name]
        assert layer.nnz == int(new[name].sum())
        # grown links are the positions of the final mask that were empty before the update
        assert torch.equal(grown[name], new[name] & ~masks[name])
        assert int(grown[name].sum()) == layer.regrown - layer.returned
    assert stats.drop_fraction > 0
    assert any(not torch.equal(masks[n], new[n]) for n in SHAPES)


def test_step_is_deterministic_and_group_sharding_agrees():
    engine = make_engine("chts", chain_removal=False)
    masks = engine.init_masks()
    weights, grads = fake_training_state(masks)
    full, _, _ = engine.step(20, masks, weights)
    again, _, _ = make_engine("chts", chain_removal=False).step(20, masks, weights)
    assert all(torch.equal(full[n], again[n]) for n in SHAPES)
    groups = engine.groups()
    assert groups == [["fc1", "fc2", "fc3"]]
    # without a chain, every layer is its own group; any subset gives the same answer for its layers
    engine2 = TopologyEngine(engine.config, SHAPES, max_steps=100)
    assert engine2.groups() == [["fc1"], ["fc2"], ["fc3"]]
    part, _, _ = engine2.step(20, masks, weights, groups=[["fc2"]])
    assert list(part) == ["fc2"] and torch.equal(part["fc2"], full["fc2"])


def test_chtss_density_follows_sigmoid_schedule_exactly():
    engine = make_engine("chtss", density=0.1, max_steps=200, update_interval=10)
    masks = engine.init_masks()
    assert all(int(m.sum()) == link_count(SHAPES[n], 0.5) for n, m in masks.items())
    previous = {n: int(m.sum()) for n, m in masks.items()}
    for step in range(10, 201, 10):
        if not engine.should_update(step):
            continue
        weights, _ = fake_training_state(masks, seed=step)
        masks, _, stats = engine.step(step, masks, weights)
        for name, mask in masks.items():
            nnz = int(mask.sum())
            assert nnz == engine.target_nnz(name, step) <= previous[name]
            previous[name] = nnz
    # decay ends at 0.8 * 200 = 160, after t_end = 150: steps 160 only prunes, to the final density
    assert engine.t_end == 150 and engine.last_update == 160
    assert engine.should_update(160) and not engine.evolves(160) and engine.evolves(150)
    assert all(int(m.sum()) == link_count(SHAPES[n], 0.1) for n, m in masks.items())
    assert stats.drop_fraction == 0.0 and all(
        s.regrown == 0 and s.removed == 0 for s in stats.layers.values()
    )
    engine.config.check_against_steps(200)


def test_chtss_reaches_final_density_when_decay_ends_before_t_end():
    engine = make_engine("chtss", density=0.1, max_steps=200, update_interval=10, decay_end_fraction=0.7)
    engine.config.check_against_steps(200)
    masks = engine.init_masks()
    for step in range(10, 151, 10):
        weights, _ = fake_training_state(masks, seed=step)
        masks, _, _ = engine.step(step, masks, weights)
    for name, mask in masks.items():
        assert int(mask.sum()) == link_count(SHAPES[name], 0.1)


def test_should_update_semantics():
    engine = make_engine("set", max_steps=100, update_interval=10)
    assert [s for s in range(0, 101) if engine.should_update(s)] == [10, 20, 30, 40, 50, 60, 70]
    assert not any(make_engine("static").should_update(s) for s in range(101))


def test_gradient_methods_require_grads():
    engine = make_engine("rigl")
    masks = engine.init_masks()
    weights, _ = fake_training_state(masks)
    with pytest.raises(ValueError, match="dense gradient of layer 'fc1'"):
        engine.step(10, masks, weights)
    engine = make_engine("mest")
    with pytest.raises(ValueError, match="MEST removal needs the gradient"):
        engine.step(10, masks, weights)


def test_rigl_grows_where_gradient_is_largest():
    engine = make_engine("rigl", chain_removal=False)
    masks = engine.init_masks()
    weights, grads = fake_training_state(masks)
    new, grown, stats = engine.step(10, masks, weights, grads)
    for name in SHAPES:
        if stats.layers[name].regrown == 0:
            continue
        g = grads[name].abs()
        # every grown link beats every candidate left empty
        empty = ~new[name]
        assert g[grown[name]].min() >= g[empty].max()


def test_stats_log_dict_and_state_round_trip():
    engine = make_engine("chts", early_stop_threshold=0.0001)
    masks = engine.init_masks()
    weights, _ = fake_training_state(masks)
    _, _, stats = engine.step(10, masks, weights)
    logs = stats.to_log_dict()
    for key in (
        "density",
        "links_removed",
        "links_regrown",
        "turnover",
        "active_neurons",
        "temperature",
        "drop_fraction",
        "update_seconds",
        "fc1/density",
        "fc2/active_out",
    ):
        assert f"sparsity/{key}" in logs, key
    assert abs(logs["sparsity/density"] - 0.3) < 0.01
    state = engine.state_dict()
    fresh = make_engine("chts", early_stop_threshold=0.0001)
    fresh.load_state_dict(state)
    assert fresh.frozen == engine.frozen
    with pytest.raises(ValueError, match="unknown layers"):
        fresh.load_state_dict({"frozen": ["nope"]})


def test_bad_inputs():
    cfg = SparseTrainingConfig(method="chts")
    with pytest.raises(ValueError, match="shapes"):
        TopologyEngine(cfg, {}, max_steps=10)
    with pytest.raises(ValueError, match="max_steps"):
        TopologyEngine(cfg, SHAPES, max_steps=0)
    with pytest.raises(ValueError, match="not among the sparse layers"):
        TopologyEngine(cfg, SHAPES, chains=[LayerChain(["fc1", "zz"])], max_steps=10)
    engine = TopologyEngine(cfg, SHAPES, max_steps=100)
    masks = engine.init_masks()
    masks["fc1"] = masks["fc1"].T.contiguous()
    weights, _ = fake_training_state(engine.init_masks())
    with pytest.raises(ValueError, match="Mask of layer 'fc1' has shape"):
        engine.step(10, masks, weights)


def test_initial_masks_need_no_valid_run_length():
    # drawing masks before training (e.g. building a model) must not depend on max_steps
    cfg = SparseTrainingConfig(method="chtss", density=0.1)
    engine = TopologyEngine(cfg, SHAPES, max_steps=1)
    masks = engine.init_masks()
    assert all(int(m.sum()) == link_count(SHAPES[n], 0.5) for n, m in masks.items())


def test_a_budget_that_gives_a_layer_no_link_is_refused():
    config = SparseTrainingConfig(method="chts", density=1e-6)
    with pytest.raises(ValueError, match=r"0 links, e\.g\. 'fc' \(8 x 16.*at least 0\.00781"):
        TopologyEngine(config, {"fc": (8, 16)}, max_steps=100)


# ------------------------------------------------------------------------------- stacks: batching invariance
STACK_SHAPES = {"a": (24, 16), "b": (24, 16), "c": (24, 16), "d": (16, 24), "e": (24, 16)}


@pytest.mark.parametrize("method", ["chts", "set", "rigl", "chtss"])
def test_layer_alone_or_in_a_stack_gets_the_same_mask(method, monkeypatch):
    # Random streams are keyed by (seed, step, layer, phase): evolving a layer alone, in a stack of its
    # shape, or in stacks split by the memory budget gives the same mask, so DDP shares and resumes agree.
    import hf_chts.topology.stacks as stacks_module

    cfg = SparseTrainingConfig(method=method, density=0.3, update_interval=10)
    engine = TopologyEngine(cfg, STACK_SHAPES, max_steps=100)
    masks = engine.init_masks()
    weights, grads = fake_training_state(masks)
    full, grown, stats = engine.step(20, masks, weights, grads)
    for name in STACK_SHAPES:
        alone, alone_grown, _ = TopologyEngine(cfg, STACK_SHAPES, max_steps=100).step(
            20, masks, weights, grads, groups=[[name]]
        )
        assert torch.equal(alone[name], full[name]) and torch.equal(alone_grown[name], grown[name])
    monkeypatch.setitem(stacks_module.STACK_ENTRIES, "cpu", 2 * 24 * 16)  # stacks of at most 2 layers
    split, _, _ = TopologyEngine(cfg, STACK_SHAPES, max_steps=100).step(20, masks, weights, grads)
    assert all(torch.equal(split[n], full[n]) for n in STACK_SHAPES)
    assert any(not torch.equal(full[n], masks[n]) for n in STACK_SHAPES)


def test_stacks_group_by_shape_and_device():
    import hf_chts.topology.stacks as stacks_module

    masks = {
        "a": torch.zeros(4, 3, dtype=torch.bool),
        "b": torch.zeros(4, 3, dtype=torch.bool, device="meta"),
        "c": torch.zeros(3, 4, dtype=torch.bool),
        "d": torch.zeros(4, 3, dtype=torch.bool),
    }
    shapes = {name: tuple(m.shape) for name, m in masks.items()}
    stacks = stacks_module.make_stacks(list(masks), masks, shapes)
    assert [(s.names, s.device.type) for s in stacks] == [
        (["a", "d"], "cpu"),
        (["b"], "meta"),
        (["c"], "cpu"),
    ]


def test_grown_are_only_new_links_and_returners_are_counted():
    # Hard CH regrowth on fresh masks brings back many of the links just removed: they are not "grown".
    for reset in (False, True):
        engine = make_engine("chts", regrowth_mode="hard", removal_mode="hard", reset_returning_links=reset)
        masks = engine.init_masks()
        weights, _ = fake_training_state(masks)
        new, grown, stats = engine.step(10, masks, weights)
        returned = sum(layer.returned for layer in stats.layers.values())
        assert returned > 0
        for name, layer in stats.layers.items():
            truly_new = new[name] & ~masks[name]
            if reset:
                # every regrown link, returners included, is reported (and so reset by the callback)
                assert torch.equal(grown[name] & truly_new, truly_new)
                assert int(grown[name].sum()) == layer.regrown
                assert int((grown[name] & masks[name]).sum()) == layer.returned
            else:
                assert torch.equal(grown[name], truly_new)
                assert int(grown[name].sum()) == layer.regrown - layer.returned


# ----------------------------------------------------------------------------- host synchronisations (GPU)
# A full update of the 84 sparse layers of LLaMA-130M read data back to the host 2,856 times before the
# engine worked on stacks (34 per layer); on a GPU each read stalls the device. The bound: one per layer.
MAX_SYNCS_130M = 84


def llama_layer_set(hidden=768, intermediate=2048, layers=12, heads=12):
    """Shapes and chains of the sparse layers of a LLaMA model, from its config (no weights built)."""
    from transformers import LlamaConfig

    from hf_chts.topology.percolation import LlamaBlockChain

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    shapes, chains = {}, []
    for i in range(cfg.num_hidden_layers):
        chain = LlamaBlockChain.from_prefix(
            f"model.layers.{i}", num_heads=heads, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim
        )
        chains.append(chain)
        d, m = cfg.hidden_size, cfg.intermediate_size
        shapes.update({chain.q: (d, d), chain.k: (kv, d), chain.v: (kv, d), chain.o: (d, d)})
        shapes.update({chain.gate: (m, d), chain.up: (m, d), chain.down: (d, m)})
    return shapes, chains


@pytest.mark.usefixtures("one_thread")
def test_full_llama_130m_update_host_syncs():
    from hf_chts.profiling import OpCounter

    shapes, chains = llama_layer_set()
    assert len(shapes) == 84
    cfg = SparseTrainingConfig(method="chtss", density=0.3, update_interval=10, init="er")
    engine = TopologyEngine(cfg, shapes, chains=chains, max_steps=100)
    masks = engine.init_masks()
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(m.shape, generator=g) * m for n, m in masks.items()}
    with OpCounter() as counter:
        new, _, stats = engine.step(50, masks, weights)
    assert counter.syncs <= MAX_SYNCS_130M, dict(counter.sync_ops)
    # the update did its work: decay, removal, chain removal's bookkeeping and regrowth to exact counts
    for name in shapes:
        assert int(new[name].sum()) == engine.target_nnz(name, 50) == stats.layers[name].nnz
    assert sum(s.removed for s in stats.layers.values()) > 0
    assert sum(s.decay_pruned for s in stats.layers.values()) > 0


@pytest.mark.usefixtures("one_thread")
def test_llama_7b_layer_set_update_reads_at_most_once_per_layer(monkeypatch):
    # The structure of LLaMA-7B on a GPU at a fraction of its size: 32 blocks of 7 layers, shapes in the
    # ratio 11008 : 4096, a stack budget holding 8 square layers or 2 MLP layers as 2**27 entries do at 7B,
    # and a GPU's chunk budget.
    # The host reads a constant number of times per stack and per chunk, so chunking must keep its chunks
    # large enough: chunks of one stack budget read 416 times here (the count a GPU paid in one chunk: 196).
    import hf_chts.topology.stacks as stacks_module
    from hf_chts.profiling import OpCounter

    shapes, chains = llama_layer_set(hidden=32, intermediate=86, layers=32, heads=4)
    monkeypatch.setitem(stacks_module.STACK_ENTRIES, "cpu", 8 * 32 * 32)
    monkeypatch.setitem(stacks_module.CHUNK_STACKS, "cpu", stacks_module.CHUNK_STACKS_DEFAULT)
    cfg = SparseTrainingConfig(method="chtss", density=0.3, update_interval=10, init="er")
    engine = TopologyEngine(cfg, shapes, chains=chains, max_steps=100)
    masks = engine.init_masks()
    weights, _ = fake_training_state(masks)
    assert len(stacks_module.plan_chunks(engine.groups(), masks, engine.shapes)) > 1  # the model is chunked
    with OpCounter() as counter:
        new, _, _ = engine.step(50, masks, weights)
    assert counter.syncs <= len(shapes) == 224, dict(counter.sync_ops)
    assert all(int(new[name].sum()) == engine.target_nnz(name, 50) for name in shapes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["set", "mest"])
def test_update_identical_on_cpu_and_cuda(method):
    # Counter-based streams: the same uniforms on both devices; hard magnitude removal and uniform regrowth
    # involve no floating-point function whose rounding differs between devices, so the masks agree.
    cpu_engine, cuda_engine = make_engine(method), make_engine(method)
    masks = cpu_engine.init_masks()
    weights, grads = fake_training_state(masks)
    cpu, _, _ = cpu_engine.step(10, masks, weights, grads)
    to = lambda d: {n: t.cuda() for n, t in d.items()}  # noqa: E731
    cuda, _, _ = cuda_engine.step(10, to(masks), to(weights), to(grads))
    for name in cpu:
        assert torch.equal(cuda[name].cpu(), cpu[name]), name


# ----------------------------------------------------------------------------- chunks: bounded working set
def tiny_llama_update(blocks, method="chtss", density=0.3, **config):
    """An engine over ``blocks`` small LLaMA blocks (7 layers each, chained), its masks and weights."""
    shapes, chains = llama_layer_set(hidden=32, intermediate=64, layers=blocks, heads=4)
    cfg = SparseTrainingConfig(method=method, density=density, update_interval=10, init="er", **config)
    engine = TopologyEngine(cfg, shapes, chains=chains, max_steps=100)
    masks = engine.init_masks()
    weights, grads = fake_training_state(masks)
    return engine, masks, weights, grads


BLOCK_ENTRIES = 4 * 32 * 32  # the four attention layers of a tiny block: the largest stack of one shape


@pytest.mark.parametrize(
    "method, config, step",
    [
        ("chtss", {}, 50),
        ("rigl", {"reset_returning_links": True, "chain_removal": True}, 30),
        ("chts", {"early_stop_threshold": 0.0001, "regrowth_mode": "hard", "removal_mode": "hard"}, 20),
        ("set", {"density_schedule": "em_s", "chain_removal": True}, 70),  # EM_S's final prune, keep-back
    ],
)
def test_update_in_chunks_equals_one_pass(method, config, step, monkeypatch):
    # Chunks of whole blocks are independent (chain removal couples only the layers of one block) and every
    # draw comes from the layer's own stream: masks, grown masks, statistics, their order and the frozen
    # layers come out the same whatever the chunks: one chunk, chunks of 3 blocks (chain removal in place on
    # strided views of the stacks), one block per chunk split into stacks of 2 layers (on copies).
    import dataclasses

    import hf_chts.topology.stacks as stacks_module

    results = []
    for budget, n_chunks in [(None, 1), (3 * BLOCK_ENTRIES, 3), (BLOCK_ENTRIES // 2, 8)]:
        if budget is not None:
            monkeypatch.setitem(stacks_module.STACK_ENTRIES, "cpu", budget)
        engine, masks, weights, grads = tiny_llama_update(8, method, density=0.05, **config)
        assert len(stacks_module.plan_chunks(engine.groups(), masks, engine.shapes)) == n_chunks
        new, grown, stats = engine.step(step, masks, weights, grads)
        layers = {
            n: {k: v for k, v in dataclasses.asdict(s).items() if k != "seconds"}
            for n, s in stats.layers.items()
        }
        results.append((new, grown, layers, sorted(engine.frozen)))
        assert stats.seconds > 0 and all(s.seconds == stats.seconds / 56 for s in stats.layers.values())
    (new, grown, layers, frozen), *others = results
    assert any(not torch.equal(new[n], masks[n]) for n in new)  # the update changed the masks
    assert sum(s["chain_removed"] for s in layers.values()) > 0  # (sparse enough for empty neurons)
    assert frozen or "early_stop_threshold" not in config
    for other_new, other_grown, other_layers, other_frozen in others:
        assert list(other_new) == list(new) and list(other_grown) == list(grown)
        assert all(torch.equal(other_new[n], new[n]) and torch.equal(other_grown[n], grown[n]) for n in new)
        assert list(other_layers.items()) == list(layers.items())
        assert other_frozen == frozen


@pytest.mark.usefixtures("one_thread")
def test_update_working_set_does_not_grow_with_the_model(monkeypatch):
    # Chunks of whole blocks are evolved one after another, so beyond the masks an update returns, the memory
    # it holds at once is one chunk's, however many blocks the model has. Counted as the bytes of live
    # tensors (resident memory of small tensors is noise): before chunking, every stack's old masks and
    # chain-removal copies were alive at once: 2.1x the working set here for 4x the blocks.
    import hf_chts.topology.stacks as stacks_module
    from hf_chts.profiling import PeakLiveBytes

    monkeypatch.setitem(stacks_module.STACK_ENTRIES, "cpu", 3 * BLOCK_ENTRIES)  # chunks of 3 blocks

    def working_set(blocks):
        engine, masks, weights, _ = tiny_llama_update(blocks)
        with PeakLiveBytes() as mem:
            new, grown, _ = engine.step(50, masks, weights)
        results = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*new.values(), *grown.values()]
        }
        assert mem.live == sum(results.values()) == 2 * sum(m.numel() for m in masks.values())
        return mem.peak_temporary

    small, large = working_set(6), working_set(24)
    assert small > 0 and large <= 1.2 * small, (small, large)
