"""hf_chts.checkpointing: atomic sparse state, checked reads, resume validation, last_complete_checkpoint.

Runs a tiny LLaMA through a real ``Trainer`` (CPU) once per module and copies its output folder into each
test; docs/reliability.md maps each scenario to its test.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_callback import RandomTokens, config_for, make_args, tiny_llama, train
from transformers import Trainer
from transformers.trainer_callback import TrainerState

from hf_chts import last_complete_checkpoint
from hf_chts.callback import CHTssCallback
from hf_chts.checkpointing import (
    COMPLETE_FILE,
    LOCK_FILE,
    STATE_DIR,
    STATE_FILE,
    check_safetensors_file,
    checkpoint_problem,
    load_sparse_state,
    lock_output_dir,
    save_sparse_state,
    sparse_state_complete,
    unlock_output_dir,
)
from hf_chts.finished_run import FinishedRunGuard
from hf_chts.masking import MASK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=2)


def cfg():
    return config_for("set", t_end=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    """A finished 4-step run with checkpoint-2 and checkpoint-4, and its final state."""
    out = tmp_path_factory.mktemp("run") / "out"
    trainer, _, _ = train(out, cfg(), probe=False, **COMMON)
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return out, final


@pytest.fixture
def out(run_dir, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(run_dir[0], copy)
    return copy


def resume(out, checkpoint, callback=None, model=None):
    trainer = Trainer(
        model=model if model is not None else tiny_llama(seed=123),
        args=make_args(out, **COMMON),
        train_dataset=RandomTokens(),
        callbacks=[callback or CHTssCallback(cfg())],
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def assert_same(model, final):
    state = model.state_dict()
    assert set(state) == set(final)
    for key, value in final.items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------------------------------------ writing
def test_sparse_state_is_written_before_trainer_state_json(tmp_path, monkeypatch):
    # With save_total_limit=1 the Trainer deletes the older checkpoint right after trainer_state.json; the
    # sparse state must already be complete then, or a kill in between loses every checkpoint's masks.
    seen = []
    original = TrainerState.save_to_json

    def spy(self, json_path):
        folder = json_path.rsplit("/", 1)[0]
        seen.append(sparse_state_complete(folder))
        original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", spy)
    train(tmp_path, cfg(), probe=False, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1)
    assert len(seen) == 3 and seen == [None, None, None]
    state = json.loads((tmp_path / "checkpoint-3" / STATE_DIR / COMPLETE_FILE).read_text())
    assert state["step"] == 3
    exported = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert exported["stateful_callbacks"]["CHTssCallback"]["attributes"]["_exported"]["step"] == 3


def test_save_sparse_state_writes_marker_last_and_atomically(tmp_path):
    masks = {"a": torch.tensor([[True, False]])}
    folder = save_sparse_state(str(tmp_path), masks, {"step": 7})
    assert sparse_state_complete(tmp_path) is None
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / STATE_DIR).iterdir())
    loaded, state = load_sparse_state(folder)
    assert torch.equal(loaded["a"], masks["a"]) and state["step"] == 7 and state["format_version"] == 1
    # a rewrite removes the marker first: a crash mid-rewrite leaves the folder incomplete, not stale
    (tmp_path / STATE_DIR / STATE_FILE).write_text('{"step": 8')
    assert "another size" in sparse_state_complete(tmp_path)


# ------------------------------------------------------------------------------------------ reading files
@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "is empty"),
        ('{"step": 4, "config"', "not valid JSON"),
        ('{"step": "4"}', "field `step` must be an integer"),
        ('{"step": 4, "engine": {"frozen": "x"}}', "engine.frozen"),
        ('{"step": 4, "format_version": 99}', "format_version 99"),
        ("[1, 2]", "must hold a JSON object"),
    ],
)
def test_bad_state_json_names_the_file_and_the_fix(out, content, match):
    state_dir = out / "checkpoint-4" / STATE_DIR
    (state_dir / COMPLETE_FILE).unlink()  # as from a writer without a marker: the content itself is checked
    (state_dir / STATE_FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_sparse_state(out / "checkpoint-4")
    assert str(state_dir / STATE_FILE) in str(info.value)


@pytest.mark.parametrize("size", [0, 5, 40, -3])
def test_truncated_safetensors_names_the_file(tmp_path, size):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(8, 8)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:size] if size >= 0 else data[:size])
    with pytest.raises(ValueError, match=r"x\.safetensors.*(empty|truncated)"):
        check_safetensors_file(str(path), fix="Do X.")


# ------------------------------------------------------------------------------------------ completeness
def test_last_complete_checkpoint_skips_interrupted_saves(out):
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-4")
    # each interrupted-write leftover makes checkpoint-4 incomplete, so checkpoint-2 is the one to resume
    breakers = {
        "trainer_state.json": lambda p: p.write_text(p.read_text()[:100]),
        "model.safetensors": lambda p: p.write_bytes(p.read_bytes()[:-10]),
        "optimizer.pt": lambda p: p.write_bytes(p.read_bytes()[:-10]),
        STATE_DIR: lambda p: (p / COMPLETE_FILE).unlink(),
    }
    for name, breaker in breakers.items():
        broken = out.parent / f"broken_{name}"
        shutil.copytree(out, broken)
        breaker(broken / "checkpoint-4" / name)
        if name == STATE_DIR:  # the masks in model.safetensors still make it resumable
            assert last_complete_checkpoint(str(broken)).endswith("checkpoint-4")
            weights = broken / "checkpoint-4" / "model.safetensors"
            dense = {k: v for k, v in load_file(str(weights)).items() if not k.endswith(MASK_NAME)}
            save_file(dense, str(weights), metadata={"format": "pt"})
        assert last_complete_checkpoint(str(broken)).endswith("checkpoint-2"), name
        assert checkpoint_problem(str(broken / "checkpoint-4")) is not None
    assert last_complete_checkpoint(str(out / "nothing")) is None


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["masks", "state"])
def test_last_complete_checkpoint_skips_a_same_size_corruption_of_the_newest_state(out, name):
    state_dir = out / "checkpoint-4" / STATE_DIR
    path = state_dir / ("masks.safetensors" if name == "masks" else STATE_FILE)
    size = path.stat().st_size
    _flip_byte(path, size - 2)  # inside the mask bytes / inside the JSON's last value
    assert path.stat().st_size == size
    problem = sparse_state_complete(out / "checkpoint-4")
    assert problem is not None and "checksum" in problem and str(path) in problem
    # the model weights still carry the masks, so checkpoint-4 stays resumable, from those masks
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-4")
    weights = out / "checkpoint-4" / "model.safetensors"
    dense = {k: v for k, v in load_file(str(weights)).items() if not k.endswith(MASK_NAME)}
    save_file(dense, str(weights), metadata={"format": "pt"})
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-2")


# ------------------------------------------------------------------------------------------ resume
def test_resume_from_model_weights_when_sparse_state_is_missing(out, run_dir):
    shutil.rmtree(out / "checkpoint-2" / STATE_DIR)
    trainer = resume(out, out / "checkpoint-2")
    assert_same(trainer.model, run_dir[1])


def test_resume_refuses_state_of_another_step(out):
    # the masks and state of step 2 placed into checkpoint-4 (also: following old advice to pass
    # resume_from=checkpoint-2 while the Trainer resumes checkpoint-4)
    shutil.rmtree(out / "checkpoint-4" / STATE_DIR)
    shutil.copytree(out / "checkpoint-2" / STATE_DIR, out / "checkpoint-4" / STATE_DIR)
    with pytest.raises(ValueError, match=r"saved at step 2, but the Trainer resumes at step 4"):
        resume(out, out / "checkpoint-4")
    with pytest.raises(ValueError, match=r"saved at step 2, but the Trainer resumes at step 4"):
        resume(out, out / "checkpoint-4", CHTssCallback(cfg(), resume_from=str(out / "checkpoint-2")))


def test_resume_refuses_masks_off_the_schedule(out):
    masks, state = load_sparse_state(out / "checkpoint-4")
    dense = {name: torch.ones_like(mask) for name, mask in masks.items()}
    save_sparse_state(str(out / "checkpoint-4"), dense, state)
    with pytest.raises(ValueError, match=r"links where the schedule expects \d+ at step 4"):
        resume(out, out / "checkpoint-4")


def test_resume_refuses_state_masks_that_differ_from_the_model_weights(out):
    masks, state = load_sparse_state(out / "checkpoint-4")
    other = {name: torch.roll(mask, 1, dims=1) for name, mask in masks.items()}  # same counts, other links
    save_sparse_state(str(out / "checkpoint-4"), other, state)
    with pytest.raises(ValueError, match=r"differ from those in .*model\.safetensors"):
        resume(out, out / "checkpoint-4")


def test_resume_refuses_frozen_layers_the_config_cannot_freeze(out):
    # the documented fallback path (no hf_chts_state/, masks in the weights), nothing forged: only
    # engine.frozen in trainer_state.json set to every layer, with early_stop_threshold=None
    assert cfg().early_stop_threshold is None
    shutil.rmtree(out / "checkpoint-4" / STATE_DIR)
    path = out / "checkpoint-4" / "trainer_state.json"
    data = json.loads(path.read_text())
    exported = data["stateful_callbacks"]["CHTssCallback"]["attributes"]["_exported"]
    exported["engine"]["frozen"] = sorted(exported["layers"])
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"trainer_state\.json: `engine\.frozen` lists .*early_stop_threshold=None"
    ):
        resume(out, out / "checkpoint-4")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("last_update_step", -5, r"`last_update_step` is -5, outside \[0, 4\]"),
        ("last_update_step", 10**30, r"`last_update_step` is 1000000000000000000000000000000, outside"),
        ("update_seconds_total", float("nan"), r"`update_seconds_total` is nan, not a finite number"),
    ],
)
def test_resume_refuses_out_of_range_scalars(out, field, value, match):
    masks, state = load_sparse_state(out / "checkpoint-4")
    save_sparse_state(str(out / "checkpoint-4"), masks, {**state, field: value})
    with pytest.raises(ValueError, match=match) as info:
        resume(out, out / "checkpoint-4")
    assert str(out / "checkpoint-4" / STATE_DIR / STATE_FILE) in str(info.value)


def _trainer(out, callbacks=(), **args):
    model, data = tiny_llama(seed=123), RandomTokens()
    return Trainer(model=model, args=make_args(out, **args), train_dataset=data, callbacks=list(callbacks))


def _resume(trainer, out):
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    return trainer


FINISHED = dict(COMMON, lr_scheduler_type="constant", save_steps=4)


@pytest.mark.parametrize("how", ["callbacks", "attach", "dense_guard"])
def test_a_finished_run_resumes_as_finished(tmp_path, caplog, how):
    # Trainer resumed at max_steps (4 steps of a 10-step epoch) takes one more step; with a constant learning
    # rate it would change the weights, and at max_steps it saves checkpoint-5. The guard (CHTssCallback is
    # one) runs that step at learning rate 0, puts global_step back and cancels its log and save.
    if how == "dense_guard":
        _trainer(tmp_path, **FINISHED).train()
    else:
        train(tmp_path, cfg(), probe=False, **FINISHED)
    saved = load_file(str(tmp_path / "checkpoint-4" / "model.safetensors"))
    history = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    for _ in range(2):  # 4 -> 4 -> 4, not 4 -> 5 -> 6
        callback = FinishedRunGuard() if how == "dense_guard" else CHTssCallback(cfg())
        trainer = _trainer(tmp_path, [] if how == "attach" else [callback], **FINISHED)
        if how == "attach":
            callback.attach(trainer)
        with caplog.at_level("WARNING", logger="hf_chts"):
            _resume(trainer, tmp_path)
        assert trainer.state.global_step == 4
        assert trainer.state.log_history[: len(history)] == history
        assert not any(entry.get("step", 0) > 4 for entry in trainer.state.log_history)
        assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]
        state = trainer.model.state_dict()
        for key, value in saved.items():
            assert torch.equal(state[key], value), key
        assert "already finished (max_steps=4)" in caplog.text
        assert [group["lr"] for group in trainer.optimizer.param_groups][0] == pytest.approx(1e-2)  # put back


def test_without_a_guard_trainer_takes_a_step_past_a_finished_run(tmp_path):
    # What the guard is for: transformers' own loop resumed at max_steps runs and saves step 5.
    _trainer(tmp_path, **FINISHED).train()
    trainer = _resume(_trainer(tmp_path, **FINISHED), tmp_path)
    assert trainer.state.global_step == 5
    assert (tmp_path / "checkpoint-5").is_dir()


def test_two_guards_put_the_learning_rate_back(tmp_path):
    train(tmp_path, cfg(), probe=False, **FINISHED)
    trainer = _resume(_trainer(tmp_path, [FinishedRunGuard(), CHTssCallback(cfg())], **FINISHED), tmp_path)
    assert trainer.state.global_step == 4
    assert [group["lr"] for group in trainer.optimizer.param_groups][0] == pytest.approx(1e-2)


def test_resume_refuses_unknown_format_version(out):
    masks, state = load_sparse_state(out / "checkpoint-4")
    save_sparse_state(str(out / "checkpoint-4"), masks, {**state, "format_version": 2})
    with pytest.raises(ValueError, match=r"format_version 2; this hf_chts reads format_version <= 1"):
        resume(out, out / "checkpoint-4")


def test_trainer_resume_true_with_incomplete_newest_checkpoint_fails_but_latest_works(out, run_dir):
    # transformers' resume_from_checkpoint=True picks the highest number, complete or not;
    # last_complete_checkpoint skips it and the run finishes exactly as the uninterrupted one.
    (out / "checkpoint-4" / "trainer_state.json").write_text("{")
    assert last_complete_checkpoint(str(out)).endswith("checkpoint-2")
    trainer = resume(out, last_complete_checkpoint(str(out)))
    assert_same(trainer.model, run_dir[1])


def test_full_disk_during_a_write_keeps_the_old_file_and_names_it(tmp_path, monkeypatch):
    import errno
    import os

    from hf_chts.checkpointing import write_atomic

    path = tmp_path / "state.json"
    path.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match=r"Could not write .*state\.json \(No space left on device\)") as info:
        write_atomic(str(path), b"new")
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


# ------------------------------------------------------------------------------------------ one writer
def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    # another process's lock, taken through its own open file (flock conflicts between open files)
    (tmp_path / "out").mkdir()
    fd = os.open(tmp_path / "out" / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 4242 on elsewhere")
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(
            ValueError, match=r"being written by another training run \(pid 4242 on elsewhere"
        ):
            train(tmp_path / "out", cfg(), probe=False, max_steps=2, save_strategy="no")
        assert not any(p.name.startswith("checkpoint-") for p in (tmp_path / "out").iterdir())
    finally:
        os.close(fd)  # the first writer ends: the folder is free again
    train(tmp_path / "out", cfg(), probe=False, max_steps=2, save_strategy="steps", save_steps=2)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from hf_chts.checkpointing import lock_output_dir; "
            f"lock_output_dir({str(tmp_path)!r}); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"pid {holder.pid} on"):
            lock_output_dir(str(tmp_path))
    finally:
        holder.kill()  # kill -9: no cleanup code runs
        holder.wait()
    assert lock_output_dir(str(tmp_path)) is not None
    unlock_output_dir(str(tmp_path))
