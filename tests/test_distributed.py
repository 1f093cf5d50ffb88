"""Two-process CPU runs of CHTssCallback (gloo): identical masks on every rank, sharded topology work.

Each case launches ``tests/scripts/dist_train.py`` with ``torchrun --standalone --nproc_per_node 2``; the
script dumps every rank's masks after step 1 and after each update, and its final weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"

pytestmark = pytest.mark.distributed


def launch(out: Path, mode: str, method: str, steps: int = 6) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks (gloo), also on a machine with fewer GPUs than ranks
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        "--mode",
        mode,
        "--method",
        method,
        "--steps",
        str(steps),
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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


def test_ddp_trainer_ranks_hold_identical_masks(tmp_path):
    summaries = launch(tmp_path, "ddp", "chts")
    check_ranks_agree(tmp_path, summaries)
    assert summaries[0]["weight_types"] == ["Parameter"]


def test_fsdp2_keeps_masked_weights_zero(tmp_path):
    # RigL: the dense gradient is captured on the unsharded weights and summed over ranks for the update.
    summaries = launch(tmp_path, "fsdp2", "rigl")
    check_ranks_agree(tmp_path, summaries)
    assert summaries[0]["weight_types"] == ["DTensor"]  # really sharded


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "method"), [("ddp", "rigl"), ("ddp", "chtss"), ("fsdp2", "chtss")])
def test_more_methods(tmp_path, mode, method):
    check_ranks_agree(tmp_path, launch(tmp_path, mode, method))


@pytest.mark.slow
def test_frozen_rank_makes_the_other_fail_within_the_timeout(tmp_path):
    # rank 1 SIGSTOPs itself before the update at step 2; rank 0 must give up after ddp_timeout=10 s with a
    # message naming rank 1, instead of waiting in the mask broadcast for gloo's 30 minutes.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks (gloo), also on a machine with fewer GPUs than ranks
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
    ]
    cmd += [
        "--mode",
        "ddp",
        "--method",
        "chts",
        "--out",
        str(tmp_path),
        "--ddp_timeout",
        "10",
        "--freeze_at",
        "2",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 freezes" in output
    match = re.search(r"rank 0 of 2 waited (\d+) s for rank 1 in the mask broadcast of model\.layers", output)
    assert match, output[-4000:]
    assert 9 <= int(match.group(1)) <= 20  # the configured 10 s, not gloo's 30 minutes
