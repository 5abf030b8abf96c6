"""Integration on the real embedded model: SmolLM2-135M-Instruct, NF4, CPU."""

from __future__ import annotations

import pytest

from kdpo_lora.loading import load_model
from kdpo_lora.requests import EditRequest
from kdpo_lora.session import KnowledgeEditor

pytestmark = pytest.mark.slow
EDIT = EditRequest("The Eiffel Tower is located in the city of", "Rome", subject="Eiffel Tower")
UNRELATED = ["The capital of France is", "The capital of Japan is"]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", "nf4", "cpu")


def test_counterfactual_edit_changes_the_fact_and_nothing_unrelated(smollm2, tmp_path):
    ke = KnowledgeEditor(smollm2, tmp_path / "store")
    before = ke.generate([EDIT.prompt] + UNRELATED, None, max_new_tokens=6)
    assert before[0].strip().startswith("Paris")  # a real pretrained model: it knows the fact
    result = ke.edit([EDIT], progress=False)
    assert result.results[0].success
    after = ke.generate([EDIT.prompt] + UNRELATED, "default", max_new_tokens=6)
    assert after[0].strip().startswith("Rome")
    assert after[1:] == before[1:]
    # exact rollback: the base model's answers come back
    ke.rollback(result.adapter)
    assert ke.generate([EDIT.prompt] + UNRELATED, "default", max_new_tokens=6) == before
    assert ke.store().verify(ke.fingerprint) == []


def test_shipped_passages_are_the_embedded_models_own(smollm2, tmp_path, monkeypatch):
    """A fresh install finds the null space's sampled passages shipped instead of sampling them for minutes."""
    from kdpo_lora.config import resolve_config
    from kdpo_lora.nullspace import sampled_texts

    count = resolve_config(smollm2.model.config.model_type).null_space_samples  # what `--null-space` uses
    monkeypatch.setenv("KDPO_LORA_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2.model, "generate", lambda *a, **k: pytest.fail("sampled instead of shipped"))
    texts = sampled_texts(smollm2.model, smollm2.tokenizer, count, progress=False)
    assert len(texts) == count and len(set(texts)) == len(texts)
    lengths = sorted(len(smollm2.tokenizer(t).input_ids) for t in texts)
    assert lengths[len(lengths) // 2] > 64  # passages (a few end early at the end-of-text token), not stubs


def test_attention_sink_left_to_itself_unprotects_a_whole_layer(smollm2):
    """SmolLM2's layer-11 down-projection sees nearly all its input energy at each text's first token: a
    null space from one moment over all tokens holds most of the other tokens' energy there; with the
    first token apart it holds at most its 1%."""
    from kdpo_lora.nullspace import generic_texts, input_covariances, null_space_basis

    layer = ["model.layers.11.mlp.down_proj"]
    texts = generic_texts()[:24]
    moment = {how: input_covariances(smollm2.model, smollm2.tokenizer, texts, layer, how)[layer[0]]
              for how in ("with_rest", "skip", "apart")}
    later = moment["skip"]
    share = lambda basis: float((basis.T @ later @ basis).trace() / later.trace())  # noqa: E731
    assert share(null_space_basis(moment["with_rest"], 0.01)) > 0.5
    assert share(null_space_basis(moment["apart"], 0.01, "apart")) <= 0.01
