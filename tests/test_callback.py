"""Tests of hf_chts.callback: CHTssCallback inside a real transformers.Trainer on a tiny local LLaMA (CPU)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from _io_helpers import tiny_llama_arch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_chts.callback import STATE_DIR, CHTssCallback
from hf_chts.checkpointing import load_sparse_state, save_sparse_state
from hf_chts.config import SparseTrainingConfig
from hf_chts.masking import MASK_NAME, get_masks, layer_mask, set_masks_
from hf_chts.sparsify import sparsify_

VOCAB, SEQ = 100, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**tiny_llama_arch(VOCAB)))


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_grad_norm=1.0,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def config_for(method: str, **overrides) -> SparseTrainingConfig:
    kwargs = dict(method=method, density=0.3, update_interval=2, zeta=0.3)
    if method in ("chtss", "granet"):
        kwargs.update(initial_density=0.6, decay_end_fraction=0.6)
    kwargs.update(overrides)
    return SparseTrainingConfig(**kwargs)


class Probe(TrainerCallback):
    """Checks the invariants after every optimizer step; runs after CHTssCallback."""

    def __init__(self, sparse: CHTssCallback):
        self.sparse = sparse
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        self.captured: dict[int, bool] = {}
        self.violations: list[str] = []
        self.logs: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        grads = self.sparse._grads
        self.captured[state.global_step + 1] = bool(grads)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step + 1
        engine = self.sparse.engine
        topology_step = self.sparse.last_update_step
        snapshot = {}
        opt_state = getattr(optimizer, "optimizer", optimizer).state
        for name, module in self.sparse.modules.items():
            mask = module.weight_mask
            snapshot[name] = mask.clone()
            if torch.any(module.weight[~mask] != 0.0):
                self.violations.append(f"step {step}: masked weights of {name} not 0")
            if int(mask.sum()) != engine.target_nnz(name, topology_step):
                self.violations.append(
                    f"step {step}: {name} nnz {int(mask.sum())} != {engine.target_nnz(name, topology_step)}"
                )
            for key, value in opt_state.get(module.weight, {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == mask.shape
                    and torch.any(value[~mask] != 0)
                ):
                    self.violations.append(
                        f"step {step}: optimizer {key} of {name} not 0 at masked positions"
                    )
        self.masks[step] = snapshot

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(tmp_path, config, *, model=None, probe=True, callbacks=(), **arg_overrides):
    model = model if model is not None else tiny_llama()
    sparse = CHTssCallback(config)
    probe_cb = Probe(sparse) if probe else None
    cbs = [*callbacks, sparse] + ([probe_cb] if probe_cb else [])
    trainer = Trainer(
        model=model, args=make_args(tmp_path, **arg_overrides), train_dataset=RandomTokens(), callbacks=cbs
    )
    trainer.train()
    return trainer, sparse, probe_cb


def check_run(sparse, probe, max_steps: int = 10):
    assert probe.violations == []
    engine = sparse.engine
    assert sorted(probe.masks) == list(range(1, max_steps + 1))
    previous = {name: None for name in sparse.modules}
    for step in range(1, max_steps + 1):
        changed = any(
            previous[name] is not None and not torch.equal(previous[name], mask)
            for name, mask in probe.masks[step].items()
        )
        if step > 1:
            assert changed == engine.should_update(step), f"step {step}: changed={changed}"
        previous = probe.masks[step]
        assert probe.captured[step] == (sparse.config.needs_dense_gradient and engine.should_update(step))


# ------------------------------------------------------------------------------------------ presets
def test_chtss_adamw_invariants_every_step(tmp_path):
    trainer, sparse, probe = train(tmp_path, config_for("chtss"))
    check_run(sparse, probe)
    engine = sparse.engine
    assert [t for t in range(1, 11) if engine.should_update(t)] == [2, 4, 6]
    final = {n: int(m.sum()) for n, m in get_masks(trainer.model).items()}
    assert final == {n: engine.target_nnz(n, 10) for n in final}
    assert abs(sparse._density - 0.3) < 0.01
    # the masks travel with the model: save_model writes them next to the (zeroed) weights
    trainer.save_model(str(tmp_path / "final"))
    tensors = load_file(str(tmp_path / "final" / "model.safetensors"))
    for name, module in sparse.modules.items():
        assert torch.equal(tensors[f"{name}.{MASK_NAME}"], module.weight_mask)
        assert torch.all(tensors[f"{name}.weight"][~module.weight_mask] == 0.0)


def test_chtss_research_defaults_decay_past_t_end(tmp_path):
    # research defaults: t_end = 0.75, decay_end = 0.8 of the run; the last decay step only prunes
    config = SparseTrainingConfig(method="chtss", density=0.3, update_interval=2, zeta=0.3)
    trainer, sparse, probe = train(tmp_path, config, max_steps=20)
    check_run(sparse, probe, max_steps=20)
    engine = sparse.engine
    assert (engine.t_end, engine.last_update) == (15, 16)
    assert engine.should_update(16) and not engine.evolves(16)
    final = {n: int(m.sum()) for n, m in get_masks(trainer.model).items()}
    assert final == {n: engine.target_nnz(n, 20) for n in final}
    assert abs(sparse._density - 0.3) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("method", ["static", "set", "rigl", "mest", "granet", "cht", "chts"])
def test_presets_adamw(tmp_path, method):
    _, sparse, probe = train(tmp_path, config_for(method))
    check_run(sparse, probe)
    if method == "static":
        assert all(torch.equal(probe.masks[1][n], probe.masks[10][n]) for n in sparse.modules)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "optim", "optim_args"),
    [
        ("set", "sgd", "momentum=0.9"),
        ("chts", "sgd", "momentum=0.9"),
        ("rigl", "adafactor", None),
        ("chtss", "adafactor", None),
    ],
)
def test_presets_other_optimizers(tmp_path, method, optim, optim_args):
    _, sparse, probe = train(
        tmp_path, config_for(method), optim=optim, optim_args=optim_args, learning_rate=1e-2
    )
    check_run(sparse, probe)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rigl", "chts"])
def test_bf16_autocast(tmp_path, method):
    trainer, sparse, probe = train(tmp_path, config_for(method), bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    check_run(sparse, probe)


# ------------------------------------------------------------------------------------------ logs
class Reporter(TrainerCallback):
    """Stands in for a report_to integration, which transformers places before user callbacks."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_logs_reach_reporters_and_history(tmp_path):
    reporter = Reporter()  # placed before the sparse callback, as transformers places report_to integrations
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, max_steps=6),
        train_dataset=RandomTokens(),
        callbacks=[reporter],
    )
    sparse = CHTssCallback(config_for("chts"), log_per_layer=True).attach(trainer)
    trainer.train()
    handler = trainer.callback_handler.callbacks
    assert handler.index(sparse) == 1 and handler.count(sparse) == 1  # right after DefaultFlowCallback
    assert type(handler[0]).__name__ == "DefaultFlowCallback"
    update_logs = [log for log in reporter.logs if "sparsity/links_regrown" in log]
    assert len(update_logs) == 2  # updates at steps 2 and 4 (t_end = 4)
    keys = {
        "sparsity/density",
        "sparsity/links_removed",
        "sparsity/links_regrown",
        "sparsity/turnover",
        "sparsity/active_neurons",
        "sparsity/temperature",
        "sparsity/drop_fraction",
        "sparsity/update_seconds",
        "sparsity/update_seconds_total",
        "sparsity/model.layers.0.mlp.down_proj/density",
    }
    assert keys <= set(update_logs[0])
    assert all("sparsity/density" in log for log in reporter.logs)
    assert update_logs[0]["sparsity/links_regrown"] > 0
    history = [h for h in trainer.state.log_history if "sparsity/links_regrown" in h]
    assert [h["step"] for h in history] == [2, 4]


@pytest.mark.parametrize("attach", [False, True])
def test_callback_given_after_report_to_integrations_says_how_to_attach(tmp_path, caplog, attach):
    sparse = CHTssCallback(config_for("static"))
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, max_steps=1),
        train_dataset=RandomTokens(),
        callbacks=[] if attach else [sparse],
    )
    if attach:
        sparse.attach(trainer)
    trainer.args.report_to = ["wandb"]  # after construction: the Trainer adds no integration callback
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        trainer.train()
    assert ("attach(trainer)" in caplog.text) is not attach
    assert trainer.callback_handler.callbacks.count(sparse) == 1


# ------------------------------------------------------------------------------------------ resume
def _final_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["chts", pytest.param("rigl", marks=pytest.mark.slow)])
def test_resume_is_bit_identical(tmp_path, method):
    cfg = dict(update_interval=2, zeta=0.3, t_end=7)
    common = dict(max_steps=8, save_strategy="steps", save_steps=4, logging_steps=4)
    straight, _, _ = train(tmp_path / "a", config_for(method, **cfg), probe=False, **common)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    train(tmp_path / "b", config_for(method, **cfg), probe=False, callbacks=[StopAt()], **common)
    checkpoint = tmp_path / "b" / "checkpoint-4"
    saved = json.loads((checkpoint / STATE_DIR / "state.json").read_text())
    assert saved["step"] == 4 and saved["last_update_step"] == 4
    assert set(load_file(str(checkpoint / STATE_DIR / "masks.safetensors"))) == set(get_masks(straight.model))

    model = tiny_llama(seed=123)  # a different init: everything must come from the checkpoint
    sparse = CHTssCallback(config_for(method, **cfg))
    resumed = Trainer(
        model=model,
        args=make_args(tmp_path / "b", **common),
        train_dataset=RandomTokens(),
        callbacks=[sparse],
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = _final_state(straight.model), _final_state(resumed.model)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_with_restored_callback_state(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=3)
    train(tmp_path, config_for("set", t_end=5), probe=False, **common)
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, restore_callback_states_from_checkpoint=True, **common),
        train_dataset=RandomTokens(),
        callbacks=[CHTssCallback(config_for("set", t_end=5))],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    sparse = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CHTssCallback))
    assert sparse._exported["last_update_step"] == 2  # rebuilt by transformers from trainer_state.json
    assert len(sparse.engine.chains) == 0  # set: no chain removal
    masks = load_file(str(tmp_path / "checkpoint-6" / STATE_DIR / "masks.safetensors"))
    assert all(torch.equal(masks[n], m) for n, m in get_masks(trainer.model).items())


def test_state_is_json(tmp_path):
    from hf_chts.topology.percolation import LayerChain, LlamaBlockChain

    chains = [
        LayerChain(("a", "b", "c")),
        LlamaBlockChain.from_prefix("model.layers.0", num_heads=4, num_kv_heads=2, head_dim=8),
    ]
    sparse = CHTssCallback(method="chts", density=0.2, chains=chains)
    exported = sparse.state()
    rebuilt = CHTssCallback.from_state(json.loads(json.dumps(exported)))
    assert rebuilt.config == sparse.config
    assert rebuilt.chains == chains
    assert CHTssCallback(method="chts", chains=lambda m, n: []).state()["args"]["chains"] is None


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="update_interval"):
        CHTssCallback(method="set", update_interval=0)
    with pytest.raises(ValueError, match="SparseTrainingConfig"):
        CHTssCallback(config=3)
    with pytest.raises(ValueError, match="nothing_here"):
        train(tmp_path, config_for("set", target_modules=["nothing_here"]), probe=False, max_steps=4)
    with pytest.raises(ValueError, match=r"update_interval=50 is larger than t_end"):
        train(tmp_path, config_for("set", update_interval=50), probe=False, max_steps=4)


def test_carried_masks_of_another_density_are_redrawn_at_step_0(tmp_path):
    model = tiny_llama()
    sparsify_(model, SparseTrainingConfig(method="set", density=0.5))
    config = config_for("set")
    _, _, probe = train(tmp_path, config, model=model, max_steps=4)
    assert probe.violations == []
    for name, mask in probe.masks[1].items():
        assert int(mask.sum()) == round(config.density * mask.numel()), name


def tiny_sparse_llama(sparsity=None):
    from hf_chts.modeling import SparseLlamaConfig, SparseLlamaForCausalLM

    arch = {k: v for k, v in tiny_llama().config.to_dict().items() if k in TINY_ARCH}
    return SparseLlamaForCausalLM(SparseLlamaConfig(**arch, **({"sparsity": sparsity} if sparsity else {})))


TINY_ARCH = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)


def test_sparse_llama_trains_with_the_callbacks_config_and_records_it(tmp_path):
    # the model's own config.sparsity (chts, 0.3: 307 links in q_proj) differs from the run's chtss (0.5 at
    # step 0): the run's config wins, the masks are redrawn and the model's config records it
    model = tiny_sparse_llama()
    config = config_for("chtss")
    _, _, probe = train(tmp_path, config, model=model, max_steps=6)
    assert probe.violations == []
    assert model.config.sparsity == config.to_dict(resolved=True)
    assert model.config.sparse_training_config.method == "chtss"


def test_callback_without_a_config_adopts_the_models(tmp_path):
    model = tiny_sparse_llama({"method": "static", "density": 0.4})
    before = {n: m.clone() for n, m in get_masks(model).items()}
    callback = CHTssCallback()
    trainer = Trainer(
        model=model, args=make_args(tmp_path, max_steps=4), train_dataset=RandomTokens(), callbacks=[callback]
    )
    trainer.train()
    assert (callback.config.method, callback.config.density) == ("static", 0.4)
    assert all(torch.equal(before[n], m) for n, m in get_masks(model).items())  # kept: they fit the schedule


def test_carried_masks_are_kept(tmp_path):
    model = tiny_llama()
    sparsify_(model, config_for("set"), generator=torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in get_masks(model).items()}
    _, _, probe = train(tmp_path, config_for("set", t_end=2), model=model, max_steps=3)
    assert probe.violations == []
    assert all(torch.equal(before[n], m) for n, m in probe.masks[1].items())  # the model's own masks
    assert not all(torch.equal(before[n], m) for n, m in probe.masks[2].items())  # updated at step 2


def test_checkpoint_mask_of_wrong_shape_is_refused(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
    train(tmp_path, config_for("set", t_end=3), probe=False, **common)
    masks, state = load_sparse_state(tmp_path / "checkpoint-2")
    name = "model.layers.0.mlp.up_proj"
    masks[name] = masks[name][:, :-1].contiguous()
    save_sparse_state(str(tmp_path / "checkpoint-2"), masks, state)
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, **common),
        train_dataset=RandomTokens(),
        callbacks=[CHTssCallback(config_for("set", t_end=3))],
    )
    with pytest.raises(ValueError, match=r"up_proj.*\(64, 31\).*expected \(64, 32\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_missing_state_on_resume_is_refused(tmp_path):
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)
    train(tmp_path, config_for("set", t_end=3), probe=False, **common)
    shutil.rmtree(tmp_path / "checkpoint-2" / STATE_DIR)
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    dense = {k: v for k, v in load_file(str(weights)).items() if not k.endswith(MASK_NAME)}
    save_file(dense, str(weights), metadata={"format": "pt"})
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, **common),
        train_dataset=RandomTokens(),
        callbacks=[CHTssCallback(config_for("set", t_end=3))],
    )
    with pytest.raises(ValueError, match="no hf_chts_state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_rewarmup_scales_learning_rate_after_updates(tmp_path):
    seen: dict[int, float] = {}

    class LrProbe(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            seen[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    class LrBefore(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            seen[-(state.global_step + 1)] = optimizer.param_groups[0]["lr"]

    sparse = CHTssCallback(config_for("set", rewarmup_steps=2, update_interval=3, t_end=3))
    trainer = Trainer(
        model=tiny_llama(),
        args=make_args(tmp_path, max_steps=6, learning_rate=0.01),
        train_dataset=RandomTokens(),
        callbacks=[sparse, LrBefore(), LrProbe()],
    )
    trainer.train()
    # steps 4 and 5 follow the update at step 3: lr x 1/3 and x 2/3 during optimizer.step(), restored after
    assert [seen[-t] / 0.01 for t in range(1, 7)] == pytest.approx([1, 1, 1, 1 / 3, 2 / 3, 1])
    assert all(seen[t] == pytest.approx(0.01) for t in range(1, 7))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["chts", "rigl"])
def test_torch_compile(tmp_path, method):
    """``torch_compile=True``: the gradient hook runs after the compiled backward; RigL captures grads."""
    trainer, sparse, probe = train(tmp_path, config_for(method), torch_compile=True)
    assert hasattr(trainer.model_wrapped, "_orig_mod")  # really compiled
    check_run(sparse, probe)


class RowMeanSGD(torch.optim.SGD):
    """Mixes positions (like Shampoo or Muon): each weight moves by its row's mean gradient too."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.dim() == 2:
                    p.add_(p.grad.mean(dim=1, keepdim=True), alpha=-group["lr"])
        return super().step(closure)


@pytest.mark.parametrize("remask", ["auto", "update_steps"])
def test_position_mixing_optimizer_is_remasked_every_step(tmp_path, remask):
    from hf_chts.masking import keeps_masked_weights_zero

    model = tiny_llama()
    optimizer = RowMeanSGD(model.parameters(), lr=1e-2)
    assert not keeps_masked_weights_zero(optimizer)
    sparse = CHTssCallback(config_for("set", remask=remask))
    probe = Probe(sparse)
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=RandomTokens(),
        callbacks=[sparse, probe],
        optimizers=(optimizer, None),
    )
    trainer.train()
    weight_violations = [v for v in probe.violations if "masked weights" in v]
    if remask == "auto":  # not a known zero-preserving optimizer: re-masked after every step
        assert sparse._remask_every_step and probe.violations == []
    else:  # trusting it is wrong for this optimizer: masked weights drift between updates
        assert not sparse._remask_every_step and weight_violations


# ------------------------------------------------------------------------------------------ returning links
def _one_update_without_trainer(reset: bool, update: bool = True):
    """A tiny LLaMA, AdamW with non-zero moments, then the callback's update at step 2 (hard CH regrowth
    on fresh masks brings back many of the links it just removed)."""
    from transformers import TrainerControl, TrainerState

    model = tiny_llama()
    cfg = config_for("chts", removal_mode="hard", regrowth_mode="hard", reset_returning_links=reset)
    callback = CHTssCallback(cfg)
    state, control = TrainerState(max_steps=10, global_step=0), TrainerControl()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    callback.on_train_begin(None, state, control, model=model, optimizer=optimizer)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    callback.on_optimizer_step(None, state, control, optimizer=optimizer)  # step 1: no update
    before = {}
    for name, module in callback.modules.items():
        st = optimizer.state[module.weight]
        before[name] = (
            layer_mask(module).clone(),
            module.weight.detach().clone(),
            st["exp_avg"].clone(),
            st["exp_avg_sq"].clone(),
        )
    if update:
        callback._update(2, optimizer)
    return callback, optimizer, before


@pytest.mark.parametrize("reset", [False, True])
def test_returning_links_keep_weight_and_adam_moments(reset):
    callback, optimizer, before = _one_update_without_trainer(reset)
    returned = sum(layer.returned for layer in callback.last_stats.layers.values())
    assert returned > 0
    changed_links = 0
    for name, module in callback.modules.items():
        old_mask, old_w, old_m, old_v = before[name]
        mask = layer_mask(module)
        st = optimizer.state[module.weight]
        kept = mask & old_mask  # links before and after the update: kept ones and returners
        new = mask & ~old_mask
        for now, then in ((module.weight.detach(), old_w), (st["exp_avg"], old_m), (st["exp_avg_sq"], old_v)):
            assert bool((now[~mask] == 0).all()) and bool((now[new] == 0).all())
            if not reset:
                assert torch.equal(now[kept], then[kept])  # bit-exact
            else:
                assert bool((now[kept] == then[kept]).sum() + (now[kept] == 0).sum() >= kept.sum())
        changed_links += int((module.weight.detach()[kept] != old_w[kept]).sum())
    # with the switch, exactly the returners start again from 0.0 (their weights were non-zero)
    assert changed_links == (returned if reset else 0)


def test_callback_update_adds_no_host_syncs():
    # The callback's update path (gather, engine, masks written, weights and optimizer state zeroed) reads
    # nothing back from the device beyond what the engine itself reads, and dispatches O(layers) ops.
    from hf_chts.masking import layer_view
    from hf_chts.profiling import OpCounter

    callback, optimizer, _ = _one_update_without_trainer(False, update=False)
    masks = {n: layer_view(m)[1].clone() for n, m in callback.modules.items()}
    weights = {n: layer_view(m)[0].detach().clone() for n, m in callback.modules.items()}
    with OpCounter() as engine_only:
        callback.engine.step(2, masks, weights)
    with OpCounter() as update:
        callback._update(2, optimizer)
    assert update.syncs == engine_only.syncs, (dict(update.sync_ops), dict(engine_only.sync_ops))
    assert update.ops - engine_only.ops <= 20 * len(callback.modules)


def test_masks_a_model_carries_stay_out_of_ddp_broadcasts(tmp_path):
    # Masks set by hand (no sparsify_): the callback adds them to DDP's ignore list before the Trainer wraps.
    model = tiny_llama()
    name = "model.layers.0.mlp.up_proj"
    shape = model.get_submodule(name).weight.shape
    set_masks_(model, {name: torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.3})
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    Trainer(model=model, args=make_args(tmp_path), callbacks=[CHTssCallback(config_for("set"))])
    assert f"{name}.{MASK_NAME}" in model._ddp_params_and_buffers_to_ignore


def test_defaults_log_global_figures_and_one_warning_start_line(tmp_path, caplog):
    """Per-layer keys only on request; the start-up summary is one WARNING line (a Trainer user sees it); a
    model without chains is told how to silence the chain-removal warning."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    arch = dict(
        n_layer=2, n_embd=32, n_head=2, n_positions=SEQ, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(GPT2Config(**arch))
    callback = CHTssCallback(method="set", density=0.3, update_interval=2, chain_removal=True)
    probe = Probe(callback)
    with caplog.at_level(logging.WARNING, logger="hf_chts"):
        Trainer(
            model=model,
            args=make_args(tmp_path, max_steps=4),
            train_dataset=RandomTokens(),
            callbacks=[callback, probe],
        ).train()
    logged = set().union(*probe.logs)
    assert "sparsity/density" in logged and "sparsity/turnover" in logged
    assert not [k for k in logged if "transformer.h." in k]  # no per-layer keys by default
    start = [r for r in caplog.records if "sparse layers, method=set" in r.getMessage()]
    assert len(start) == 1 and start[0].levelno == logging.WARNING
    assert "constant schedule" in start[0].getMessage()
    assert "chain_removal=False" in caplog.text and "to silence this" in caplog.text
