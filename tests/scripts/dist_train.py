"""Two-process training run used by tests/test_distributed.py (not a test itself).

Launch (from the repository root):

    torchrun --standalone --nproc_per_node 2 tests/scripts/dist_train.py --mode ddp --method chts --out OUT

``--mode ddp``: every rank trains the same tiny LLaMA with ``CHTssCallback`` under
``Trainer(use_cpu=True)`` (gloo). ``--mode fsdp2``: the model is sharded with ``fully_shard`` (per decoder
layer and at the root) and a plain loop calls the callback's events in the order ``Trainer`` does
(forward/backward micro-batches, clipping, ``on_pre_optimizer_step``, ``optimizer.step()``,
``on_optimizer_step``). The Trainer cannot run FSDP2 on CPU: accelerate switches to FSDP only for GPU-type
distributed setups, and with ``use_cpu=True`` (distributed type MULTI_CPU) it silently drops the FSDP plugin
and wraps the model in DDP (``accelerate.state.AcceleratorState.__init__``).

Each rank writes, under OUT: the masks it holds after step 1 and after every topology update
(``masks_rank<r>_step<t>.safetensors``), its final sparse weights (``weights_rank<r>.safetensors``, full
tensors) and ``summary_rank<r>.json`` (invariant violations, the layers it computed at each update).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # tests/: _io_helpers

from _io_helpers import tiny_llama_arch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from hf_chts.callback import CHTssCallback  # noqa: E402
from hf_chts.config import SparseTrainingConfig  # noqa: E402

VOCAB, SEQ = 100, 16


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class Dump(TrainerCallback):
    def __init__(self, sparse: CHTssCallback, out: str):
        self.sparse, self.out = sparse, out
        self.rank = int(os.environ.get("RANK", 0))
        self.violations: list[str] = []
        self.owned: dict[int, list[str]] = {}
        self.weight_types: set[str] = set()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step + 1
        engine = self.sparse.engine
        opt_state = getattr(optimizer, "optimizer", optimizer).state
        for name, module in self.sparse.modules.items():
            self.weight_types.add(type(module.weight).__name__)
            weight = full(module.weight.detach())  # collective under FSDP2: every rank, same order
            mask = module.weight_mask
            if torch.any(weight[~mask] != 0.0):
                self.violations.append(f"step {step}: masked weights of {name} not 0")
            if int(mask.sum()) != engine.target_nnz(name, self.sparse.last_update_step):
                self.violations.append(f"step {step}: nnz of {name}")
            for key, value in sorted(opt_state.get(module.weight, {}).items()):
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(mask.shape):
                    if torch.any(full(value)[~mask] != 0):
                        self.violations.append(f"step {step}: optimizer {key} of {name} not 0 where masked")
        if step == 1 or engine.should_update(step):
            masks = {name: m.weight_mask.cpu() for name, m in self.sparse.modules.items()}
            save_file(masks, os.path.join(self.out, f"masks_rank{self.rank}_step{step}.safetensors"))
            if engine.should_update(step):
                self.owned[step] = list(self.sparse.owned_layers)

    def on_train_end(self, args, state, control, **kwargs):
        weights = {
            name: full(m.weight.detach()).cpu().contiguous() for name, m in self.sparse.modules.items()
        }
        save_file(weights, os.path.join(self.out, f"weights_rank{self.rank}.safetensors"))
        summary = {
            "violations": self.violations,
            "owned": self.owned,
            "world_size": int(os.environ.get("WORLD_SIZE", 1)),
            "weight_types": sorted(self.weight_types),
            "sparse_compute": sorted(
                {type(m).__name__.startswith("SparseCompute") for m in self.sparse.modules.values()}
            ),
            "density": self.sparse._density,
            "updates": [t for t in range(1, state.max_steps + 1) if self.sparse.engine.should_update(t)],
        }
        with open(os.path.join(self.out, f"summary_rank{self.rank}.json"), "w") as f:
            json.dump(summary, f)


class Freeze(TrainerCallback):
    """Rank 1 stops itself (SIGSTOP) before the optimizer step ``at`` (gradients already all-reduced): rank 0
    then reaches the topology update of that step alone."""

    def __init__(self, at: int):
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at and int(os.environ.get("RANK", 0)) == 1:
            print(f"rank 1 freezes before the update of step {self.at} at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**tiny_llama_arch(VOCAB)))


def run_ddp(args, config: SparseTrainingConfig) -> None:
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "run"),
        max_steps=args.steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=False,
        ddp_timeout=args.ddp_timeout,
    )
    sparse = CHTssCallback(config)
    dump = Dump(sparse, args.out)
    callbacks = ([Freeze(args.freeze_at)] if args.freeze_at else []) + [sparse, dump]
    model = tiny_llama()
    if config.compute != "dense":  # the layers switch before DDP wraps the model
        from hf_chts.sparsify import sparsify_

        sparsify_(model, config)
    trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(), callbacks=callbacks)
    if trainer.args.world_size != 2:
        raise SystemExit(f"expected 2 processes, Trainer sees world_size={trainer.args.world_size}")
    trainer.train()


def run_fsdp2(args, config: SparseTrainingConfig) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != 2:
        raise SystemExit(f"expected 2 processes, got {world}")
    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparse = CHTssCallback(config)
    dump = Dump(sparse, args.out)
    train_args = SimpleNamespace(output_dir=os.path.join(args.out, "run"), resume_from_checkpoint=None)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = args.steps
    events = dict(model=model, optimizer=optimizer)
    sparse.on_train_begin(train_args, state, control, **events)
    data = RandomTokens().ids
    accumulation = 2
    for step in range(args.steps):
        sparse.on_step_begin(train_args, state, control, **events)
        for micro in range(accumulation):
            # each rank its own micro-batches, as a distributed sampler would give
            start = ((step * accumulation + micro) * world + rank) * 2 % (len(data) - 1)
            ids = data[start : start + 2]
            loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sparse.on_pre_optimizer_step(train_args, state, control, **events)
        optimizer.step()
        sparse.on_optimizer_step(train_args, state, control, **events)
        dump.on_optimizer_step(train_args, state, control, **events)
        optimizer.zero_grad()
        state.global_step += 1
    dump.on_train_end(train_args, state, control, **events)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--method", default="chts")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp_timeout", type=int, default=1800)
    parser.add_argument("--freeze_at", type=int, default=0, help="rank 1 stops itself before this update")
    parser.add_argument(
        "--compute",
        default="dense",
        help="SparseTrainingConfig.compute; not 'dense': sparsify before the Trainer",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    extra = {}
    if args.method in ("chtss", "granet"):
        extra = {"initial_density": 0.6, "decay_end_fraction": 0.6}
    config = SparseTrainingConfig(
        method=args.method, density=0.3, update_interval=2, zeta=0.3, compute=args.compute, **extra
    )
    if args.mode == "ddp":
        run_ddp(args, config)
    else:
        run_fsdp2(args, config)


if __name__ == "__main__":
    main()
