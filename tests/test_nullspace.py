"""Null-space confinement: the projector, and an edit that writes its fact while generic text stays put."""

from __future__ import annotations

import json

import pytest
import torch

from kdpo_lora import adapters
from kdpo_lora.config import EditConfig
from kdpo_lora.editor import Editor
from kdpo_lora.nullspace import input_covariances, lora_layers, null_space_basis
from kdpo_lora.requests import EditRequest

GENERIC = [
    "the river seine is in paris", "the thames is in london", "the capital of italy is rome",
    "the capital of germany is berlin", "people in spain speak spanish", "the tiber is in rome",
    "the prado museum is in madrid", "mount fuji is in japan", "the big ben is in london",
    "the brandenburg gate is in berlin", "the colosseum is in rome", "english is spoken in england",
    "the capital of france is paris", "french is spoken in france", "the official language of japan is japanese",
    "the capital of england is london", "tokyo is in japan", "lisbon and oslo are known cities",
]


def test_projector_keeps_the_lowest_variance_directions():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    values = torch.arange(1, 13, dtype=torch.float64)  # total 78
    covariance = (basis * values) @ basis.T
    kept = null_space_basis(covariance.float(), energy=0.1)  # 1+2+3 = 6 <= 7.8 < 10
    assert kept.shape == (12, 3)
    assert torch.allclose(kept.T @ kept, torch.eye(3), atol=1e-5)  # orthonormal
    assert torch.allclose((kept @ kept.T).double(), basis[:, :3] @ basis[:, :3].T, atol=1e-5)  # the lowest three
    assert null_space_basis(covariance.float(), energy=0.0).shape == (12, 0)


def _drift(model, tokenizer, reference: torch.Tensor) -> float:
    encoded = tokenizer(GENERIC, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**encoded).logits.log_softmax(-1)
    mask = encoded.attention_mask.bool()
    return float((reference.exp() * (reference - logits)).sum(-1)[mask].mean())


def test_confined_edit_writes_the_fact_and_leaves_generic_text_alone(tokenizer, monkeypatch, tmp_path):
    from conftest import make_model

    from kdpo_lora.loading import prepare_model

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))  # the bases are computed here, not read from a cache
    monkeypatch.setattr("kdpo_lora.editor.generic_texts", lambda: GENERIC)
    request = EditRequest("the eiffel tower is located in the city of", "rome")
    drift = {}
    for energy in (0.0, 0.05):
        model = prepare_model(make_model())
        encoded = tokenizer(GENERIC, return_tensors="pt", padding=True)
        with torch.no_grad():
            reference = model(**encoded).logits.log_softmax(-1)
        editor = Editor(model, tokenizer, EditConfig(learning_rate=5e-3, beta=1.0, null_space=energy,
                                                     null_space_samples=0))  # the bases come from GENERIC alone
        result = editor.edit([request], progress=False)
        assert result.results[0].success
        drift[energy] = _drift(editor.model, tokenizer, reference)
        if energy:
            modules = lora_layers(editor.model, result.adapter)
            covariances = input_covariances(editor.model, tokenizer, GENERIC, modules)
            for path, module in modules.items():
                weight = module.lora_A[result.adapter].weight
                kept = null_space_basis(covariances[path], energy)
                assert torch.allclose(weight @ kept @ kept.T, weight, atol=1e-5), path  # rows stay in the null space
    assert drift[0.05] < 0.2 * drift[0.0]


def test_null_space_over_its_memory_limit_is_skipped_with_one_notice(tokenizer, monkeypatch, tmp_path):
    """A model whose covariances exceed `null_space_max_gb` (an 8B on a small GPU) is edited without it."""
    from conftest import make_model

    from kdpo_lora.errors import KdpoWarning
    from kdpo_lora.loading import prepare_model

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    monkeypatch.setattr("kdpo_lora.editor.null_space_bases", lambda *a, **k: pytest.fail("bases computed"))
    editor = Editor(prepare_model(make_model()), tokenizer,
                    EditConfig(learning_rate=5e-3, beta=1.0, null_space=0.05, null_space_max_gb=1e-6))
    with pytest.warns(KdpoWarning, match="without the null space: on this model it needs") as notices:
        first = editor.edit([EditRequest("the eiffel tower is located in the city of", "rome")], progress=False)
        editor.edit([EditRequest("the colosseum is located in the city of", "paris")], progress=False)
    assert first.results[0].success and sum(n.category is KdpoWarning for n in notices) == 1


def test_bases_are_cached_per_model_and_a_damaged_entry_is_recomputed(tiny_model, tokenizer, tmp_path, monkeypatch):
    from kdpo_lora.nullspace import null_space_bases

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    model = adapters.add_adapter(tiny_model, "a", adapters.lora_config(EditConfig(), 3))
    modules = sorted(lora_layers(model, "a"))
    first = null_space_bases(model, tokenizer, modules, 0.05, GENERIC)
    [entry] = (tmp_path / "nullspace").glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    again = null_space_bases(model, tokenizer, modules, 0.05, GENERIC)
    assert all(torch.equal(first[m], again[m]) for m in modules)
    monkeypatch.setattr("kdpo_lora.nullspace.input_covariances", lambda *a, **k: pytest.fail("not read from the cache"))
    cached = null_space_bases(model, tokenizer, modules, 0.05, GENERIC)
    assert all(torch.equal(first[m], cached[m]) for m in modules)
    assert len(list((tmp_path / "nullspace").glob("*.safetensors"))) == 1


def test_sampled_texts_are_the_models_own_reproducible_and_cached(tiny_model, tokenizer, tmp_path, monkeypatch):
    from kdpo_lora.nullspace import sampled_texts

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    monkeypatch.setattr("kdpo_lora.nullspace.generic_texts", lambda: GENERIC)
    rng_before = torch.get_rng_state()
    texts = sampled_texts(tiny_model, tokenizer, 20, max_new_tokens=6)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is left alone
    assert len(texts) == 20 and len(set(texts)) > 10
    openers = {" ".join(g.split()[:2]) for g in GENERIC}
    assert all(" ".join(t.split()[:2]) in openers for t in texts)
    assert sum(len(t.split()) > 2 for t in texts) >= 15  # continued (a few stop early at end-of-text)
    [entry] = (tmp_path / "nullspace").glob("texts-*.json")
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: pytest.fail("not read from the cache"))
    assert sampled_texts(tiny_model, tokenizer, 20, max_new_tokens=6) == texts
    monkeypatch.undo()
    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    monkeypatch.setattr("kdpo_lora.nullspace.generic_texts", lambda: GENERIC)
    entry.write_text("[1, 2", encoding="utf-8")  # damaged: sampled again, the same passages
    assert sampled_texts(tiny_model, tokenizer, 20, max_new_tokens=6) == texts
    assert sampled_texts(tiny_model, tokenizer, 20, max_new_tokens=6, seed=1) != texts
    assert sampled_texts(tiny_model, tokenizer, 0) == []


def test_shipped_passages_stand_in_for_an_empty_cache(tiny_model, tokenizer, tmp_path, monkeypatch):
    from kdpo_lora.nullspace import sampled_texts

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("kdpo_lora.nullspace.generic_texts", lambda: GENERIC)
    sampled = sampled_texts(tiny_model, tokenizer, 4, max_new_tokens=4)
    [entry] = (tmp_path / "cache" / "nullspace").glob("texts-*.json")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / entry.name).write_text(json.dumps(["shipped passage"] * 4), encoding="utf-8")
    entry.unlink()
    monkeypatch.setattr("kdpo_lora.nullspace.SHIPPED_TEXTS", shipped)
    monkeypatch.setattr(tiny_model, "generate", lambda *a, **k: pytest.fail("sampled instead of shipped"))
    assert sampled_texts(tiny_model, tokenizer, 4, max_new_tokens=4) == ["shipped passage"] * 4 != sampled
