"""Null-space confinement: the projector, and an edit that writes its fact while generic text stays put."""

from __future__ import annotations

import json

import pytest
import torch

from kdpo_lora import adapters
from kdpo_lora.config import EditConfig
from kdpo_lora.editor import Editor
from kdpo_lora.nullspace import Confinement, input_covariances, lora_layers, narrowed, null_space_basis
from kdpo_lora.requests import EditRequest

from conftest import UNROUTED

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


def test_narrowed_basis_avoids_earlier_edits_inside_the_null_space():
    """`narrowed` keeps the part of a basis's span that earlier edits' inputs hardly use, and never fewer
    than `min_dims` directions (so an edit can always be written)."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16))[0][:, :6]  # a 6-dim null space in 16 dims
    keys = basis[:, :2] @ torch.randn(2, 40) * 3 + basis @ torch.randn(6, 40) * 0.01  # earlier edits: 2 directions
    moment = basis.T @ (keys @ keys.T) @ basis
    kept = narrowed(basis, moment, energy=0.01, min_dims=2)
    assert kept.shape == (16, 4)
    assert torch.allclose(kept.T @ kept, torch.eye(4), atol=1e-5)  # orthonormal
    assert torch.allclose(basis @ basis.T @ kept, kept, atol=1e-5)  # inside the null space
    assert (kept.T @ keys).norm() ** 2 <= 0.01 * (basis.T @ keys).norm() ** 2  # the earlier keys' energy left out
    assert narrowed(basis, moment, energy=0.0, min_dims=5).shape == (16, 5)  # at least min_dims
    assert narrowed(basis, moment, energy=0.0, min_dims=9).shape == (16, 6)  # never more than the basis


def test_first_tokens_counted_with_the_rest_skipped_or_apart(tiny_model, tokenizer):
    """The three ways to count each text's first token (the attention sink) agree with one another, padding
    left out: all tokens = later tokens + first tokens, and `apart` = each part at unit trace."""
    texts = GENERIC[:6] + ["rome", "the capital of a country far away from here is a city"]  # ragged: padding
    modules = ["model.layers.1.mlp.down_proj"]
    moments = {how: input_covariances(tiny_model, tokenizer, texts, modules, how, batch_size=4)[modules[0]]
               for how in ("with_rest", "skip", "apart")}
    tokens = [len(ids) for ids in tokenizer(texts).input_ids]
    total, later = sum(tokens), sum(tokens) - len(texts)
    first = moments["with_rest"] * total - moments["skip"] * later  # the first tokens' X^T X
    assert torch.linalg.eigvalsh(first.double()).min() > -1e-3 * first.trace()  # a genuine X^T X
    expected = moments["skip"] / moments["skip"].trace() + first / first.trace()
    assert torch.allclose(moments["apart"], expected, atol=1e-4)
    with pytest.raises(ValueError, match="first_token"):
        input_covariances(tiny_model, tokenizer, texts, modules, "first")


class _InSpan(torch.nn.Module):
    """A = C·Nᵀ as a torch parametrization: the plain-autograd reference for `Confinement`'s coordinates."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.basis = basis

    def forward(self, coordinates: torch.Tensor) -> torch.Tensor:
        return coordinates @ self.basis.T

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self.basis


def test_adam_on_null_space_coordinates_is_adam_on_the_reparametrised_adapter(tokenizer):
    """`Confinement` keeps A in the span and steps Adam on its coordinates, exactly as autograd through
    A = C·Nᵀ would (torch's parametrize), and differently from projecting A's own Adam step; a scale
    multiplies the coordinates' learning rate alone, and `matched` by sqrt(d/k) (here 2)."""
    from conftest import make_model
    from torch.nn.utils import parametrize

    from kdpo_lora.loading import prepare_model

    encoded = tokenizer(GENERIC[:4], return_tensors="pt", padding=True)

    def adapted():
        model = adapters.add_adapter(prepare_model(make_model()), "a", adapters.lora_config(EditConfig(), 3))
        adapters.set_active(model, ["a"], trainable="a")
        torch.manual_seed(1)
        for module in lora_layers(model, "a").values():  # B != 0, so A gets a gradient from the first step
            torch.nn.init.normal_(module.lora_B["a"].weight, std=0.1)
        return model

    def loss(model):
        return model(**encoded).logits.log_softmax(-1)[..., 5].mean()

    torch.manual_seed(2)
    bases = {path: torch.linalg.qr(torch.randn(m.in_features, m.in_features))[0][:, :m.in_features // 4]
             for path, m in lora_layers(adapted(), "a").items()}
    finals = {}
    for mode in ("coordinates", "reference", "projected", "scaled", "scaled reference", "matched"):
        model = adapted()
        params = [p for p in model.parameters() if p.requires_grad]
        if mode.endswith("reference"):
            for path, module in lora_layers(model, "a").items():
                parametrize.register_parametrization(module.lora_A["a"], "weight", _InSpan(bases[path]))
            coordinates = {id(m.lora_A["a"].parametrizations.weight.original) for m in lora_layers(model, "a").values()}
            scale = 2.0 if mode == "scaled reference" else 1.0
            params = [{"params": [p], "lr": 1e-2 * (scale if id(p) in coordinates else 1.0)}
                      for p in model.parameters() if p.requires_grad]
        else:
            confine = Confinement(model, "a", bases, coordinates=mode != "projected")
            params = confine.param_groups(params, 1e-2, scale=2.0 if mode == "scaled" else 1.0,
                                          matched=mode == "matched")
        optimizer = torch.optim.Adam(params)
        for _ in range(3):
            optimizer.zero_grad()
            loss(model).backward()
            if not mode.endswith("reference"):
                confine.pull_gradients()
            optimizer.step()
            if not mode.endswith("reference"):
                confine.write()
        finals[mode] = {path: m.lora_A["a"].weight.detach().clone() for path, m in lora_layers(model, "a").items()}
    for path, basis in bases.items():
        weight = finals["coordinates"][path]
        assert torch.allclose(weight @ basis @ basis.T, weight, atol=1e-5), path  # in the span
        assert torch.allclose(weight, finals["reference"][path], atol=1e-5), path
        assert torch.allclose(finals["scaled"][path], finals["scaled reference"][path], atol=1e-5), path
        assert torch.allclose(finals["matched"][path], finals["scaled"][path], atol=1e-5), path  # sqrt(d/(d/4)) = 2
        assert torch.allclose(finals["projected"][path] @ basis @ basis.T, finals["projected"][path], atol=1e-5)
    assert not all(torch.allclose(finals["projected"][p], finals["reference"][p], atol=1e-4) for p in bases)
    assert not all(torch.allclose(finals["scaled"][p], finals["reference"][p], atol=1e-4) for p in bases)


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


def test_each_batch_avoids_the_profiles_earlier_facts_and_a_rolled_back_one_is_forgotten(
        tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """`null_space_protect_edits`: a batch's A rows lie in the null space less the directions the profile's
    earlier facts use (their texts read back from the store), and a batch rolled back is no longer avoided."""
    from kdpo_lora.loading import load_model
    from kdpo_lora.nullspace import null_space_bases
    from kdpo_lora.session import KnowledgeEditor

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("kdpo_lora.editor.generic_texts", lambda: GENERIC)
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), tmp_path / "store", config=UNROUTED,
                         overrides=dict(learning_rate=5e-3, beta=1.0, null_space=0.05, null_space_samples=0,
                                        null_space_protect_edits=0.05, preserve_weight=0.0, independent=False))
    facts = [EditRequest("the eiffel tower is located in the city of", "rome"),
             EditRequest("the colosseum is located in the city of", "paris"),
             EditRequest("the prado museum is located in the city of", "tokyo")]
    first = ke.edit(facts[:1], progress=False).adapter
    second = ke.edit(facts[1:2], progress=False).adapter
    modules = sorted(lora_layers(ke.editor.model, second))
    plain = null_space_bases(ke.editor.model, tokenizer, modules, 0.05, GENERIC)
    avoided = input_covariances(ke.editor.model, tokenizer, ["the eiffel tower is located in the city of rome"],
                                modules, "skip")
    for path, module in lora_layers(ke.editor.model, second).items():
        kept = narrowed(plain[path], plain[path].T @ avoided[path] @ plain[path], 0.05, 8)
        assert 8 <= kept.shape[1] < plain[path].shape[1], path
        weight = module.lora_A[second].weight.detach()
        assert torch.allclose(weight @ kept @ kept.T, weight, atol=1e-5), path  # inside the narrowed span
    ke.rollback(first)
    seen = []
    monkeypatch.setattr("kdpo_lora.editor.narrowed", lambda basis, moment, *a: seen.append(moment) or basis)
    ke.edit(facts[2:], progress=False)
    only_second = input_covariances(ke.editor.model, tokenizer, ["the colosseum is located in the city of paris"],
                                    modules, "skip")
    assert len(seen) == len(modules)
    for moment, path in zip(seen, modules):  # the moments avoided now: the second fact's alone
        assert torch.allclose(moment, plain[path].T @ only_second[path] @ plain[path], atol=1e-5), path
    seen.clear()
    ke.edit([EditRequest("the big ben is located in the city of", "madrid")], progress=False)
    third = input_covariances(ke.editor.model, tokenizer, ["the prado museum is located in the city of tokyo"],
                              modules, "skip")
    assert len(seen) == len(modules)
    for moment, path in zip(seen, modules):  # the profile grew: the running sum adds the third fact
        expected = plain[path].T @ (only_second[path] + third[path]) @ plain[path]
        assert torch.allclose(moment, expected, atol=1e-5), path


def test_an_edit_avoids_the_directions_its_own_subject_swaps_are_read_through(tiny_model_dir, tokenizer, tmp_path,
                                                                           monkeypatch):
    """`null_space_protect_swaps`: the edit's A rows lie in the null space less the directions its own
    subject swaps (the same question about others, its nearest neighbours) use; off, they are not avoided."""
    from kdpo_lora.editor import preservation_prompts
    from kdpo_lora.loading import load_model
    from kdpo_lora.nullspace import null_space_bases
    from kdpo_lora.session import KnowledgeEditor

    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("kdpo_lora.editor.generic_texts", lambda: GENERIC)
    fact = EditRequest("the eiffel tower is located in the city of", "rome", subject="the eiffel tower")
    settings = dict(learning_rate=5e-3, beta=1.0, null_space=0.05, null_space_samples=0, preserve_prompts=6,
                    preserve_weight=0.0, independent=False)
    ke = KnowledgeEditor(load_model(str(tiny_model_dir), "none", "cpu"), tmp_path / "store", config=UNROUTED,
                         overrides=dict(settings, null_space_protect_swaps=0.05))
    name = ke.edit([fact], progress=False).adapter
    modules = sorted(lora_layers(ke.editor.model, name))
    plain = null_space_bases(ke.editor.model, tokenizer, modules, 0.05, GENERIC)
    swaps = preservation_prompts([fact], 6, 0)
    assert len(swaps) == 6 and not any("eiffel" in s for s in swaps)
    avoided = input_covariances(ke.editor.model, tokenizer, swaps, modules, "skip")
    narrower = 0
    for path, module in lora_layers(ke.editor.model, name).items():
        kept = narrowed(plain[path], plain[path].T @ avoided[path] @ plain[path], 0.05, 8)
        narrower += kept.shape[1] < plain[path].shape[1]
        weight = module.lora_A[name].weight.detach()
        assert torch.allclose(weight @ kept @ kept.T, weight, atol=1e-5), path  # inside the narrowed span
    assert narrower > 0  # the swaps did take directions away
    seen = []
    monkeypatch.setattr("kdpo_lora.editor.narrowed", lambda basis, moment, *a: seen.append(moment) or basis)
    ke.editor.edit([EditRequest("the colosseum is located in the city of", "paris", subject="the colosseum")],
                   config=EditConfig(**settings), progress=False)
    assert not seen  # off by default: nothing narrowed
