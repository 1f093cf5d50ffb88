"""The ``hf-chts`` command line, called in-process through ``main([...])``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from _io_helpers import make_sparse_llama, make_tokenizer, trainer_state

from hf_chts.cli import main
from hf_chts.compact import COMPACT_FILE, load_compact, read_masks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "ckpt"
    tokenizer = make_tokenizer()
    model = make_sparse_llama(vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state()))
    return folder


def test_inspect_both_formats(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), str(tmp_path / "c"), "--format", "compact"]) == 0
    capsys.readouterr()
    outputs = []
    for folder, fmt in ((checkpoint, "safetensors"), (tmp_path / "c", "compact")):
        assert main(["inspect", str(folder), "--json", str(tmp_path / f"{fmt}.json")]) == 0
        out = capsys.readouterr().out
        assert f"({fmt} format): 14 sparse layers" in out
        assert "model.layers.0.self_attn.q_proj" in out and "32x32" in out and "0.2998" in out
        assert "MLP hidden neurons active (gate, up and down): 1.0000" in out
        assert "Active neurons (mean over layers of (act.out + act.in) / 2): 1.0000" in out
        report = json.loads((tmp_path / f"{fmt}.json").read_text())
        assert report["format"] == fmt and report["by_type"]["all"]["layers"] == 14
        outputs.append(report["layers"])
    assert outputs[0] == outputs[1]


def test_inspect_dense_checkpoint(tmp_path, capsys):
    assert main(["export", str(_sparse(tmp_path)), str(tmp_path / "d"), "--format", "dense"]) == 0
    assert main(["inspect", str(tmp_path / "d")]) == 0
    assert "a dense checkpoint" in capsys.readouterr().out


def _sparse(tmp_path: Path) -> Path:
    make_sparse_llama().save_pretrained(tmp_path / "s")
    return tmp_path / "s"


def test_export_round_trips(checkpoint, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    original = make_sparse_llama(
        vocab_size=json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    )
    assert main(["export", str(checkpoint), str(tmp_path / "c"), "--format", "compact"]) == 0
    assert "Wrote compact checkpoint" in capsys.readouterr().out
    assert (tmp_path / "c" / COMPACT_FILE).is_file() and (tmp_path / "c" / "tokenizer.json").is_file()
    reloaded = load_compact(tmp_path / "c")
    for key, value in original.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key
    # compact -> dense -> plain LLaMA with the same (masked) weights
    assert main(["export", str(tmp_path / "c"), str(tmp_path / "d"), "--format", "dense"]) == 0
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "d")
    assert read_masks(tmp_path / "d") == {}
    for key, value in dense.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key
    # dense -> compact again is refused: no masks left
    assert main(["export", str(tmp_path / "d"), str(tmp_path / "e"), "--format", "compact"]) == 1
    assert "no `weight_mask` buffers" in capsys.readouterr().err


def test_plot_training_and_masks(checkpoint, tmp_path, capsys):
    out = tmp_path / "plots"
    assert (
        main(["plot", str(checkpoint), "--output_dir", str(out), "--layer", "model.layers.0.mlp.up_proj"])
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "active_neurons.png",
        "active_out.png",
        "degrees_model.layers.0.mlp.up_proj.png",
        "density.png",
        "loss.png",
        "mask_model.layers.0.mlp.up_proj.png",
    ]
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert str(out / "density.png") in capsys.readouterr().out


def test_plot_state_file_only(checkpoint, tmp_path):
    state = tmp_path / "state" / "trainer_state.json"
    state.parent.mkdir()
    shutil.copy(checkpoint / "trainer_state.json", state)
    out = tmp_path / "plots"
    assert main(["plot", str(state), "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "active_neurons.png",
        "active_out.png",
        "density.png",
        "loss.png",
    ]
    # beside its checkpoint, a state file gets the mask plots of that folder too
    assert main(["plot", str(checkpoint / "trainer_state.json"), "--output_dir", str(out)]) == 0
    assert any(p.name.startswith("mask_") for p in out.iterdir())


def test_plot_nothing(tmp_path, capsys):
    assert main(["plot", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 1
    assert "Nothing to plot" in capsys.readouterr().err


def test_eval_command(checkpoint, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    args = ["eval", str(checkpoint), "--tasks", "hf_chts_tiny_mc", "--limit", "6", "--no_lm_eval_tasks"]
    assert main([*args, "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| hf_chts_tiny_mc | 6 |" in out
    results = json.loads((tmp_path / "zero_shot_results.json").read_text())
    assert 0.0 <= results["results"]["hf_chts_tiny_mc"]["acc"] <= 1.0
    assert (tmp_path / "zero_shot_results.md").is_file()
    # the compact export scores the same items identically (same weights, same masks)
    assert main(["export", str(checkpoint), str(tmp_path / "c"), "--format", "compact"]) == 0
    assert main(["eval", str(tmp_path / "c"), *args[2:]]) == 0
    compact = json.loads((tmp_path / "c" / "zero_shot_results.json").read_text())
    assert compact["results"] == results["results"]


def test_eval_unknown_task(checkpoint, capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", str(checkpoint), "--tasks", "no_such_task", "--no_lm_eval_tasks"]) == 1
    err = capsys.readouterr().err
    assert "Unknown zero-shot task(s) 'no_such_task'" in err and "hf_chts_tiny_mc" in err


@pytest.mark.parametrize("command", ["export", "card"])
def test_push_to_hub_needs_repo_id(checkpoint, tmp_path, capsys, command):
    args = [command, str(checkpoint)] + (
        [str(tmp_path / "o"), "--format", "compact"] if command == "export" else []
    )
    with mock.patch("huggingface_hub.HfApi") as api_cls, pytest.raises(SystemExit) as info:
        main([*args, "--push_to_hub"])
    assert info.value.code == 2
    assert "--push_to_hub needs --hub_model_id" in capsys.readouterr().err
    api_cls.assert_not_called()
    assert not (tmp_path / "o").exists()


def test_export_and_push(checkpoint, tmp_path):
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        args = ["export", str(checkpoint), str(tmp_path / "c"), "--format", "compact", "--push_to_hub"]
        assert main([*args, "--hub_model_id", "me/tiny-compact"]) == 0
    api = api_cls.return_value
    api.create_repo.assert_called_once_with(
        repo_id="me/tiny-compact", repo_type="model", private=False, exist_ok=True
    )
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(tmp_path / "c")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "| all | 14 | 0.2998 |" in card and 'from_pretrained("me/tiny-compact")' in card


def test_card_command(checkpoint, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(checkpoint, folder)
    assert main(["card", str(folder), "--dataset", "allenai/c4", "--validation_perplexity", "31.5"]) == 0
    text = (folder / "README.md").read_text()
    assert "**31.50**" in text and "- allenai/c4" in text
    assert f"Wrote {folder / 'README.md'}" in capsys.readouterr().out


@pytest.mark.slow
def test_console_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "hf_chts.cli", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "{eval,inspect,plot,export,card}" in proc.stdout


def _broken(checkpoint, tmp_path, how: str) -> Path:
    folder = tmp_path / how
    if how == "compact_without_embedding":
        assert main(["export", str(checkpoint), str(folder), "--format", "compact"]) == 0
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = folder / COMPACT_FILE
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        tensors.pop("model.embed_tokens.weight")
        save_file(tensors, str(path), metadata=metadata)
        return folder
    import shutil

    shutil.copytree(checkpoint, folder)
    path = folder / "model.safetensors"
    if how == "empty_weights":
        path.write_bytes(b"")
    elif how == "truncated_weights":
        path.write_bytes(path.read_bytes()[:5000])
    elif how == "bad_config":
        (folder / "config.json").write_text('{"model_type": "sparse_llama", ')
    return folder


@pytest.mark.parametrize(
    "how", ["compact_without_embedding", "empty_weights", "truncated_weights", "bad_config"]
)
@pytest.mark.parametrize("command", ["inspect", "export", "card"])
def test_broken_checkpoints_give_one_line_and_exit_1(checkpoint, tmp_path, capsys, how, command):
    folder = _broken(checkpoint, tmp_path, how)
    capsys.readouterr()
    argv = {
        "inspect": ["inspect", str(folder)],
        "export": ["export", str(folder), str(tmp_path / "out"), "--format", "dense"],
        "card": ["card", str(folder)],
    }[command]
    if command in ("inspect", "card") and how == "compact_without_embedding":
        assert main(argv) == 0  # they read the masks and config only; those are intact
        return
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("hf-chts")]  # (progress bars aside)
    assert len(lines) == 1 and lines[0].startswith(f"hf-chts {command}: error: "), err
    assert "Traceback" not in err
    assert str(folder) in lines[0]  # the message names the file or folder
    if command == "export":
        assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing written with a random layer


def _edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


LAYER = "model.layers.1.mlp.down_proj"


def test_inspect_reports_weights_nonzero_at_masked_positions(tmp_path, capsys):
    # what PEFT's own merge_and_unload leaves: the masks are intact, the weights dense
    folder = _sparse(tmp_path)

    def densify(tensors):
        weight, mask = tensors[LAYER + ".weight"], tensors[LAYER + ".weight_mask"]
        weight[~mask] = 0.25

    _edit_weights(folder, densify)
    capsys.readouterr()
    assert main(["inspect", str(folder), "--json", str(tmp_path / "r.json")]) == 1
    captured = capsys.readouterr()
    assert "w.dens" in captured.out and "1.0000" in captured.out  # the weights' density, next to the masks'
    err = captured.err.strip()
    assert err.startswith("hf-chts inspect: error: ") and len(err.splitlines()) == 1
    assert LAYER in err and "non-zero where its weight_mask removes the link" in err
    assert "hf_chts.merge_and_unload" in err and "hf_chts.compact.zero_masked_weights" in err
    layer = json.loads((tmp_path / "r.json").read_text())["layers"][LAYER]
    assert layer["weight_density"] == 1.0 and layer["nonzero_masked"] > 0


def test_inspect_refuses_a_mask_that_is_not_bool(tmp_path, capsys):
    folder = _sparse(tmp_path)
    _edit_weights(
        folder, lambda t: t.update({LAYER + ".weight_mask": t[LAYER + ".weight_mask"].to(torch.uint8)})
    )
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 1
    assert f"mask {LAYER}.weight_mask is stored as torch.uint8, not torch.bool" in capsys.readouterr().err


def test_inspect_refuses_a_compact_popcount_mismatch(checkpoint, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hf_chts.checkpointing import tensor_checksum

    assert main(["export", str(checkpoint), str(tmp_path / "c"), "--format", "compact"]) == 0
    path = tmp_path / "c" / COMPACT_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    key = LAYER + ".weight.values"
    tensors[key] = tensors[key][:-3]
    metadata["checksums"] = json.dumps({k: tensor_checksum(t) for k, t in tensors.items()})
    save_file(tensors, str(path), metadata=metadata)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "c")]) == 1
    assert f"{key} holds" in capsys.readouterr().err


def test_plot_on_a_file_that_is_not_a_trainer_state_names_it(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not json")
    assert main(["plot", str(bad), "--output_dir", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "is not a trainer_state.json" in err
