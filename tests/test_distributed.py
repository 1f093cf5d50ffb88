"""Tests of hf_chts.distributed and two-process CPU runs of CHTssCallback (gloo).

The sharding helpers are checked on one process and on two gloo processes. The Trainer cases launch
``tests/scripts/dist_train.py`` with ``torchrun --standalone --nproc_per_node 2``; the script dumps every
rank's masks after step 1 and after each update, and its final weights: identical masks on every rank,
sharded topology work.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_chts.distributed import (
    Collectives,
    broadcast_from_rank0_,
    full_tensor,
    mean_onto_owners,
    shard_groups,
    share_masks,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"

distributed = pytest.mark.distributed


# ------------------------------------------------------------------------------------------ helpers
def test_shard_groups_round_robin():
    owner, mine = shard_groups([["a"], ["b", "c"], ["d"]], rank=1, world=2)
    assert owner == {"a": 0, "b": 1, "c": 1, "d": 0} and mine == [["b", "c"]]
    assert shard_groups([["a"], ["b"]], rank=0, world=1) == ({"a": 0, "b": 0}, [["a"], ["b"]])


def test_helpers_on_one_process_pass_tensors_through():
    collectives = Collectives()
    new, grown = torch.tensor([[True, False]]), torch.tensor([[False, True]])
    shared_new, shared_grown = share_masks(collectives, {"a": (new, grown)}, {"a": new.clone()}, {"a": 0})
    assert shared_new["a"] is new and shared_grown["a"] is grown
    grad = torch.ones(2)
    assert mean_onto_owners(collectives, {"a": grad}, {"a": 0}) == {"a": grad}
    broadcast_from_rank0_(collectives, [new])
    assert new.tolist() == [[True, False]] and full_tensor(grad) is grad


SHAPES = {"a": (2, 3), "b": (3, 2), "c": (4, 4)}
OWNER = {"a": 0, "b": 1, "c": 0}


def _owner_masks(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(len(name) * 7 + ord(name))
    new = torch.rand(SHAPES[name], generator=g) < 0.5
    return new, new & (torch.rand(SHAPES[name], generator=g) < 0.5)


def _two_ranks(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    collectives = Collectives(timeout=60)
    buffers = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in SHAPES.items()}
    owned = {name: _owner_masks(name) for name in SHAPES if OWNER[name] == rank}
    new, grown = share_masks(collectives, owned, buffers, OWNER)
    grads = {name: torch.full(shape, float(rank + 1)) for name, shape in SHAPES.items()}
    mean = mean_onto_owners(collectives, grads, OWNER)
    initial = [torch.rand(3, 3, generator=torch.Generator().manual_seed(rank)) < 0.5]
    broadcast_from_rank0_(collectives, initial)
    torch.save({"new": new, "grown": grown, "mean": mean, "initial": initial[0]}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@distributed
def test_helpers_on_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in ranks:  # every rank holds every owner's masks and grown positions, bit for bit
        for name in SHAPES:
            new, grown = _owner_masks(name)
            assert torch.equal(result["new"][name], new) and torch.equal(result["grown"][name], grown)
    assert sorted(ranks[0]["mean"]) == ["a", "c"] and sorted(ranks[1]["mean"]) == ["b"]
    assert all(torch.all(m == 1.5) for r in ranks for m in r["mean"].values())  # (1 + 2) / 2
    rank0_initial = torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(ranks[0]["initial"], rank0_initial) and torch.equal(ranks[1]["initial"], rank0_initial)


# ------------------------------------------------------------------------------------------ Trainer runs


def torchrun(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``dist_train.py args`` on 2 CPU ranks (gloo), also on a machine with fewer GPUs than ranks."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def launch(out: Path, mode: str, method: str, steps: int = 6, compute: str = "dense") -> list[dict]:
    args = [
        "--mode",
        mode,
        "--method",
        method,
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--compute",
        compute,
    ]
    result = torchrun(args, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return [json.loads((out / f"summary_rank{r}.json").read_text()) for r in range(2)]


def check_ranks_agree(out: Path, summaries: list[dict]) -> None:
    for summary in summaries:
        assert summary["world_size"] == 2
        assert summary["violations"] == []
    updates = summaries[0]["updates"]
    assert updates == [2, 4]
    for step in [1, *updates]:
        rank0 = load_file(str(out / f"masks_rank0_step{step}.safetensors"))
        rank1 = load_file(str(out / f"masks_rank1_step{step}.safetensors"))
        assert set(rank0) == set(rank1) and len(rank0) == 14
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"step {step}: {name} differs between ranks"
    first = load_file(str(out / "masks_rank0_step1.safetensors"))
    second = load_file(str(out / f"masks_rank0_step{updates[0]}.safetensors"))
    assert any(not torch.equal(first[n], second[n]) for n in first)  # the topology did evolve
    # topology work is split: every layer computed by exactly one rank at each update
    for step in updates:
        owned = [set(s["owned"][str(step)]) for s in summaries]
        assert owned[0] and owned[1] and not owned[0] & owned[1]
        assert owned[0] | owned[1] == set(first)
    weights = [load_file(str(out / f"weights_rank{r}.safetensors")) for r in range(2)]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


@distributed
def test_ddp_trainer_ranks_hold_identical_masks(tmp_path):
    summaries = launch(tmp_path, "ddp", "chts")
    check_ranks_agree(tmp_path, summaries)
    assert summaries[0]["weight_types"] == ["Parameter"]


@distributed
def test_ddp_trainer_in_sparse_compute_ranks_agree(tmp_path):
    """Link values as DDP parameters: gradients all-reduced; masks and weights agree on both ranks."""
    summaries = launch(tmp_path, "ddp", "chts", compute="sparse")
    check_ranks_agree(tmp_path, summaries)
    assert all(s["sparse_compute"] == [True] for s in summaries)


@distributed
def test_fsdp2_keeps_masked_weights_zero(tmp_path):
    # RigL: the dense gradient is captured on the unsharded weights and summed over ranks for the update.
    summaries = launch(tmp_path, "fsdp2", "rigl")
    check_ranks_agree(tmp_path, summaries)
    assert summaries[0]["weight_types"] == ["DTensor"]  # really sharded


@distributed
@pytest.mark.slow
@pytest.mark.parametrize(("mode", "method"), [("ddp", "rigl"), ("ddp", "chtss"), ("fsdp2", "chtss")])
def test_more_methods(tmp_path, mode, method):
    check_ranks_agree(tmp_path, launch(tmp_path, mode, method))


@distributed
@pytest.mark.slow
def test_frozen_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    # rank 1 SIGSTOPs itself before the update at step 2; rank 0 must give up after ddp_timeout=10 s with a
    # message naming rank 1, instead of waiting in the mask broadcast for gloo's 30 minutes.
    args = ["--mode", "ddp", "--method", "chts", "--out", str(tmp_path), "--ddp_timeout", "10"]
    result = torchrun([*args, "--freeze_at", "2"], timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 freezes" in output
    match = re.search(r"rank 0 of 2 waited (\d+) s for rank 1 in the mask broadcast of model\.layers", output)
    assert match, output[-4000:]
    assert 9 <= int(match.group(1)) <= 20  # the configured 10 s, not gloo's 30 minutes


@distributed
@pytest.mark.slow
def test_rank_frozen_outside_the_update_makes_the_other_fail_within_the_timeout(tmp_path):
    # rank 1 SIGSTOPs itself before the optimizer step of step 3 (no topology update): rank 0 then waits
    # in the Trainer's own gradient all-reduce of step 4, in the default process group, which must also get
    # ddp_timeout=10 s under gloo instead of 30 minutes
    args = ["--mode", "ddp", "--method", "chts", "--out", str(tmp_path), "--ddp_timeout", "10"]
    start = time.monotonic()
    result = torchrun([*args, "--freeze_at", "3"], timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 freezes" in output
    assert time.monotonic() - start < 200, output[-4000:]
    assert "imed out" in output or "imeout" in output, output[-4000:]
