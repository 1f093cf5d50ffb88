"""Model card rendering and push_to_hub (Hub API patched, nothing leaves the machine)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
from _io_helpers import make_sparse_llama, trainer_state

from hf_chts.hub import CITATION, TEMPLATE, push_to_hub, render_model_card, write_model_card

SPARSITY = {
    "method": "chtss",
    "density": 0.3,
    "density_distribution": "uniform",
    "init": "brf",
    "brf_r": 0.25,
    "brf_degree_dist": "uniform",
    "seed": 7,
    "update_interval": 100,
    "t_end": None,
    "t_end_fraction": 0.75,
    "zeta": 0.1,
    "zeta_schedule": "cosine",
    "removal": "magnitude",
    "removal_mode": "soft",
    "temperature_start": 1.0,
    "temperature_end": 9.0,
    "regrowth": "ch",
    "regrowth_mode": "soft",
    "ch_variant": "CH2_L3n",
    "chain_removal": True,
    "density_schedule": "sigmoid",
    "initial_density": 0.5,
    "decay_start": 0,
    "decay_end": 8000,
    "decay_end_fraction": 0.8,
    "decay_pruning": "ri",
}
ZERO_SHOT = {
    "results": {
        "arc_easy": {
            "acc": 0.4321,
            "acc_stderr": 0.01,
            "acc_norm": 0.4,
            "acc_norm_stderr": 0.01,
            "n_samples": 2376,
        },
        "piqa": {"acc": 0.6123, "acc_stderr": 0.011, "n_samples": 1838},
    },
    "config": {"num_fewshot": 0, "limit": None},
    "lm_eval_version": "0.4.13",
}
SECTIONS = [
    "## Method",
    "## Density per layer type",
    "## Sparse initialization (BRF)",
    "## Topology-evolution schedule",
    "## Training",
    "## Active neurons",
    "### Validation perplexity",
    "### Zero-shot",
    "## How to use",
    "## Citation",
]


@pytest.fixture
def checkpoint(tmp_path):
    model = make_sparse_llama()
    model.config.sparsity = SPARSITY
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state()))
    (folder / "zero_shot_results.json").write_text(json.dumps(ZERO_SHOT))
    (folder / "training_args.bin").write_bytes(b"pickle")
    return folder


def test_card_has_every_section_and_number(checkpoint):
    card = render_model_card(
        checkpoint, datasets=["allenai/c4"], training_tokens=1_234_567, repo_id="me/tiny"
    )
    text = card.content
    for section in SECTIONS:
        assert section in text, section
    assert "${" not in text
    # method, density per layer type, BRF, schedule
    assert "CHTss" in text and "CH2_L3n" in text
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"| {kind} | 2 | 0.2998 |" in text
    assert "randomness r = 0.25" in text and "seed 7" in text
    assert "| initial density | 0.5 |" in text and "| decay window (steps) | 0 -> 8000 |" in text
    assert "| drop fraction zeta | 0.1 (cosine) |" in text
    # training, active neurons, perplexity, zero-shot table, citation
    assert "| data | allenai/c4 |" in text and "| optimizer steps | 50 |" in text and "1,234,567" in text
    assert "MLP hidden neurons active through gate, up and down projections: 100.00%" in text
    assert "Active neurons: **100.00%**" in text
    assert f"**{math.exp(4.2):.2f}**" in text
    assert "| arc_easy | 2376 | 0.4321 ± 0.0100 | 0.4000 ± 0.0100 |" in text
    assert "| piqa | 1838 | 0.6123 ± 0.0110 | - |" in text
    assert CITATION in text and "2501.19107" in text and "@inproceedings" in text
    assert 'from_pretrained("me/tiny")' in text
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["allenai/c4"]
    assert {"hf_chts", "chtss", "sparse", "arxiv:2501.19107"} <= set(data["tags"])


def test_card_model_index_holds_the_zero_shot_results(checkpoint):
    from huggingface_hub import ModelCard

    loaded = ModelCard(str(render_model_card(checkpoint, repo_id="me/tiny")))  # what the Hub parses
    assert loaded.data.model_name == "tiny"
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert results[("arc_easy", "acc")] == 0.4321 and results[("arc_easy", "acc_norm")] == 0.4
    assert results[("piqa", "acc")] == 0.6123 and ("piqa", "acc_norm") not in results
    assert results[("held-out text (validation)", "perplexity")] == pytest.approx(math.exp(4.2))
    assert len(results) == 4


def test_arguments_override_folder_records(checkpoint):
    text = render_model_card(checkpoint, validation_perplexity=12.5, training_steps=999).content
    assert "**12.50**" in text and "| optimizer steps | 999 |" in text


def test_card_without_records(tmp_path):
    make_sparse_llama().save_pretrained(tmp_path)
    text = render_model_card(tmp_path).content
    for section in SECTIONS:
        assert section in text
    assert "not recorded" in text.lower() and "Not evaluated yet" in text
    assert "| all | 14 | 0.2998 |" in text


def test_write_model_card_round_trips(checkpoint):
    from huggingface_hub import ModelCard

    path = write_model_card(checkpoint, datasets=["allenai/c4"])
    assert path == checkpoint / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.datasets == ["allenai/c4"]
    assert "### Zero-shot" in card.text


def test_custom_template_with_unknown_placeholder(checkpoint, tmp_path):
    template = tmp_path / "t.md"
    template.write_text("---\n${card_data}\n---\n${nope}\n")
    with pytest.raises(ValueError, match=r"unknown placeholder \$\{nope\}"):
        render_model_card(checkpoint, template=template)
    assert TEMPLATE.is_file()


def test_push_to_hub_with_patched_api(checkpoint):
    uploaded = {}

    def upload_folder(**kwargs):
        uploaded["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return mock.Mock(commit_url="https://hub/commit/1")

    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.upload_folder.side_effect = upload_folder
        info = push_to_hub(checkpoint, "me/tiny-chtss", private=True, token="t0k")
    assert info.commit_url == "https://hub/commit/1"
    api_cls.assert_called_once_with(token="t0k")
    api.create_repo.assert_called_once_with(
        repo_id="me/tiny-chtss", repo_type="model", private=True, exist_ok=True
    )
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny-chtss" and kwargs["folder_path"] == str(checkpoint)
    assert "*.bin" in kwargs["ignore_patterns"]
    assert "README.md" in uploaded["files"] and "model.safetensors" in uploaded["files"]
    assert 'from_pretrained("me/tiny-chtss")' in (checkpoint / "README.md").read_text()


def test_push_keeps_an_existing_card(checkpoint):
    (checkpoint / "README.md").write_text("my card")
    with mock.patch("huggingface_hub.HfApi"):
        push_to_hub(checkpoint, "me/x")
    assert (checkpoint / "README.md").read_text() == "my card"


@pytest.mark.parametrize("repo_id", [None, "", "a/b/c", "has space/x", "-dash/x", "me/a..b"])
def test_push_needs_a_valid_repo_id(checkpoint, repo_id):
    with mock.patch("huggingface_hub.HfApi") as api_cls, pytest.raises(ValueError, match="repo"):
        push_to_hub(checkpoint, repo_id)
    api_cls.assert_not_called()


def test_sparsity_config_object_is_accepted(tmp_path):
    from hf_chts.config import SparseTrainingConfig

    make_sparse_llama(plain=True).save_pretrained(tmp_path)  # a plain LLaMA config has no `sparsity` field
    text = render_model_card(tmp_path, sparsity_config=SparseTrainingConfig(method="chts", brf_r=0.6)).content
    assert "CHTs (Cannistraci-Hebb training soft rule)" in text and "randomness r = 0.6" in text
