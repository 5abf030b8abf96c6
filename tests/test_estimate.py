"""The memory estimate: exact parameter counts from the config alone, and the Llama-3-8B budget."""

from __future__ import annotations

import json

import pytest

from kdpo_lora import adapters
from kdpo_lora.cli import main
from kdpo_lora.config import EditConfig, resolve_config
from kdpo_lora.estimate import count_parameters, estimate

from conftest import make_model


@pytest.mark.parametrize("layers", [{"layers": (0, 2)}, {"skip_lower_layers": 0.333}])
def test_meta_counts_match_a_real_model_and_its_lora(tmp_path, layers):
    model = make_model()
    settings = EditConfig(target_modules=("q_proj", "down_proj"), lora_rank=4, **layers)
    counts = count_parameters(model.config, settings)
    assert counts.total == sum(p.numel() for p in model.parameters())
    peft_model = adapters.add_adapter(model, "x", adapters.lora_config(settings, model.config.num_hidden_layers))
    assert counts.lora == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)


def test_llama3_8b_fits_an_8gb_gpu_and_the_published_setup_does_not():
    report = estimate("llama-3-8b", resolve_config("llama"))
    assert 7.9e9 < report["parameters"] < 8.1e9
    assert report["kdpo_lora_total_gib"] <= 8.0
    assert report["published_total_gib"] > 55
    assert report["ratio"] < 0.35


def test_estimate_command_offline(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_model().config.to_dict()))
    assert main(["estimate", "--model", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kdpo_lora_total_gib"] < report["published_total_gib"]
    assert main(["estimate", "--model", "llama-3-8b"]) == 0
    assert "as published" in capsys.readouterr().out
