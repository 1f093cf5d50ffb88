"""Kill -9 a training run at random instants and at every point of a checkpoint save, resume, compare.

Used by tests/test_reliability.py (not a test itself). Launch from the repository root:

    python tests/scripts/crash_train.py --out OUT [--kills 10] [--seed 0]

The driver imports everything once and forks one child per training run (a child starts in milliseconds),
so many kills fit in a short test. Every run trains the same tiny LLaMA with ``CHTssCallback`` (CHTss,
decaying density, an update every 2 steps) under ``Trainer(use_cpu=True)`` with ``save_steps=1`` and
``save_total_limit=1``, resuming from ``hf_chts.last_complete_checkpoint(output_dir)``; a finished run writes
its final weights and masks to ``final.safetensors``.

- reference: one uninterrupted run.
- named points: for each point of the save sequence of checkpoint ``--at`` (model weights, optimizer,
  the sparse state's files and marker, a half-written ``trainer_state.json``, the deletion of the older
  checkpoint, ``on_save``), a run SIGKILLs itself there, then a run resumes and finishes.
- random: runs are killed with SIGKILL after a seeded random delay and resumed, until ``--kills`` kills
  have happened (several campaigns in fresh folders when a campaign finishes first).

Writes ``OUT/summary.json``: per named point the checkpoint resumed from, per random kill the step of the
checkpoint resumed from and whether an incomplete checkpoint was left, and whether every final state equals
the reference bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # tests/: _io_helpers

import transformers.trainer as hf_trainer  # noqa: E402
from _io_helpers import tiny_llama_arch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import TrainerState  # noqa: E402

import hf_chts.resume as hf_resume  # noqa: E402
from hf_chts.callback import CHTssCallback  # noqa: E402
from hf_chts.checkpointing import checkpoint_problem, last_complete_checkpoint  # noqa: E402
from hf_chts.config import SparseTrainingConfig  # noqa: E402

VOCAB, SEQ = 100, 16
POINTS = (
    "model_weights",  # after model.safetensors
    "optimizer",  # after optimizer.pt / scheduler.pt
    "sparse_masks_tmp",  # masks.safetensors.tmp written, not renamed
    "sparse_masks",  # masks.safetensors in place, state.json not yet
    "sparse_marker_tmp",  # COMPLETE.tmp written, not renamed
    "sparse_complete",  # hf_chts_state complete, trainer_state.json not yet
    "trainer_state_partial",  # half of trainer_state.json written
    "trainer_state",  # trainer_state.json written, older checkpoint not yet deleted
    "rotation_partial",  # older checkpoint half deleted
    "rotation",  # older checkpoint deleted
    "on_save",  # after the callback's on_save
)
# points after which the checkpoint being saved is complete (else the previous one is resumed)
COMPLETE_AFTER = {"trainer_state", "rotation_partial", "rotation", "on_save"}


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**tiny_llama_arch(VOCAB)))


def train(out: str, steps: int) -> str | None:
    config = SparseTrainingConfig(
        method="chtss", density=0.3, initial_density=0.6, decay_end_fraction=0.6, update_interval=2, zeta=0.3
    )
    args = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=tiny_llama(), args=args, train_dataset=RandomTokens(), callbacks=[CHTssCallback(config)]
    )
    resume = last_complete_checkpoint(out)
    trainer.train(resume_from_checkpoint=resume)
    final = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(final, os.path.join(out, "final.safetensors"))
    return resume


# ------------------------------------------------------------------------------------------ self-kill points
def install_crash(point: str, at: int) -> None:
    """Make this process SIGKILL itself at ``point`` of the save of ``checkpoint-<at>``."""
    saving = {"step": None}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(owner, name, predicate=lambda *a, **k: True):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            if saving["step"] == at and predicate(*args, **kwargs):
                die()
            return result

        setattr(owner, name, wrapper)

    original_save = Trainer._save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        saving["step"] = self.state.global_step
        try:
            return original_save(self, *args, **kwargs)
        finally:
            saving["step"] = None

    Trainer._save_checkpoint = save_checkpoint
    if point == "model_weights":
        after(Trainer, "save_model")
    elif point == "optimizer":
        after(Trainer, "_save_optimizer_and_scheduler")
    elif point in ("sparse_masks_tmp", "sparse_marker_tmp"):
        target = "masks.safetensors.tmp" if point == "sparse_masks_tmp" else "COMPLETE.tmp"
        replace = os.replace

        def guarded_replace(src, dst, *args, **kwargs):
            if saving["step"] == at and str(src).endswith(target):
                die()
            return replace(src, dst, *args, **kwargs)

        os.replace = guarded_replace
    elif point == "sparse_masks":
        import hf_chts.checkpointing as ckpt

        after(ckpt, "write_atomic", lambda path, data: path.endswith("masks.safetensors"))
    elif point == "sparse_complete":
        after(hf_resume, "save_sparse_state")
    elif point == "trainer_state_partial":
        original = TrainerState.save_to_json

        def half_json(self, json_path):
            if saving["step"] != at:
                return original(self, json_path)
            original(self, json_path)
            with open(json_path, "r+b") as handle:
                handle.truncate(os.path.getsize(json_path) // 2)
            die()

        TrainerState.save_to_json = half_json
    elif point == "trainer_state":
        after(TrainerState, "save_to_json")
    elif point == "rotation_partial":
        rmtree = shutil.rmtree

        def half_rmtree(path, *args, **kwargs):
            if saving["step"] == at:
                names = sorted(os.listdir(path))
                for name in names[: len(names) // 2]:
                    full = os.path.join(path, name)
                    rmtree(full) if os.path.isdir(full) else os.remove(full)
                die()
            return rmtree(path, *args, **kwargs)

        shutil.rmtree = half_rmtree
    elif point == "rotation":
        after(hf_trainer, "rotate_checkpoints")
    elif point == "on_save":
        after(CHTssCallback, "on_save", lambda self, args, state, *a, **k: state.global_step == at)
        original_save_checkpoint = Trainer._save_checkpoint

        def keep_step(self, *args, **kwargs):  # on_save runs after _save_checkpoint returns
            result = original_save_checkpoint(self, *args, **kwargs)
            saving["step"] = self.state.global_step
            return result

        Trainer._save_checkpoint = keep_step
    else:
        raise SystemExit(f"unknown crash point {point!r}; choose from {POINTS}")


# ------------------------------------------------------------------------------------------ runs
def run(out: str, steps: int, *, point: str | None = None, at: int = 0, kill_after: float | None = None):
    """Fork a training run; returns ``("ok" | "killed" | "error", checkpoint it resumed from or None)``."""
    os.makedirs(out, exist_ok=True)
    info = os.path.join(out, "resumed_from.json")
    if os.path.exists(info):
        os.remove(info)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            torch.set_num_threads(1)
            if point is not None:
                install_crash(point, at)
            resume = last_complete_checkpoint(out)
            with open(info, "w") as handle:
                json.dump({"resume": resume}, handle)
            train(out, steps)
        except BaseException:
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if kill_after is not None:
        deadline = time.monotonic() + kill_after
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.001)
        else:
            os.kill(pid, signal.SIGKILL)
            done, status = os.waitpid(pid, 0)
    else:
        done, status = os.waitpid(pid, 0)
    resumed = None
    if os.path.exists(info):
        with open(info) as handle:
            resumed = json.load(handle)["resume"]
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", resumed
    return ("ok" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "error"), resumed


def step_of(path: str | None) -> int:
    return int(path.rsplit("-", 1)[1]) if path else 0


def same_as(reference: dict, out: str) -> bool:
    final = load_file(os.path.join(out, "final.safetensors"))
    return set(final) == set(reference) and all(torch.equal(final[k], reference[k]) for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--at", type=int, default=4, help="checkpoint whose save the named points interrupt")
    parser.add_argument("--kills", type=int, default=10, help="random kills to reach")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", default=",".join(POINTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    summary: dict = {"named": {}, "random": [], "errors": []}

    ref_dir = os.path.join(args.out, "reference")
    start = time.monotonic()
    status, _ = run(ref_dir, args.steps)
    duration = time.monotonic() - start
    if status != "ok":
        raise SystemExit("the uninterrupted reference run failed")
    reference = load_file(os.path.join(ref_dir, "final.safetensors"))
    summary["reference_seconds"] = duration

    for point in [p for p in args.points.split(",") if p]:
        out = os.path.join(args.out, f"point_{point}")
        status, _ = run(out, args.steps, point=point, at=args.at)
        entry = {"crash": status, "complete_after_kill": last_complete_checkpoint(out)}
        status, resumed = run(out, args.steps)
        entry.update(resume=status, resumed_from=resumed, equal=status == "ok" and same_as(reference, out))
        entry["expected_from"] = f"checkpoint-{args.at if point in COMPLETE_AFTER else args.at - 1}"
        summary["named"][point] = entry

    rng = random.Random(args.seed)
    kills, campaign, runs = 0, 0, 0
    while kills < args.kills and campaign < 10 and runs < 60:
        out = os.path.join(args.out, f"random_{campaign}")
        campaign += 1
        previous = 0
        while runs < 60:
            runs += 1
            status, resumed = run(out, args.steps, kill_after=rng.uniform(0.0, duration))
            if resumed is not None and step_of(resumed) < previous:
                summary["errors"].append(f"{out}: resumed from {resumed} after reaching step {previous}")
            if status == "error":
                summary["errors"].append(f"{out}: a run failed")
                break
            if status == "ok":
                summary["random"].append(
                    {"campaign": out, "finished": True, "equal": same_as(reference, out)}
                )
                break
            kills += 1
            complete = last_complete_checkpoint(out)
            left = [
                name
                for name in (os.listdir(out) if os.path.isdir(out) else [])
                if name.startswith("checkpoint-") and checkpoint_problem(os.path.join(out, name)) is not None
            ]
            previous = max(previous, step_of(complete))
            summary["random"].append({"killed": True, "complete": complete, "incomplete_left": left})
    summary["kills"] = kills
    summary["seconds"] = time.monotonic() - start
    with open(os.path.join(args.out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
