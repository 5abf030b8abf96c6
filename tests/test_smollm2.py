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
    # a misspelt subject is not named, but its key (subject_keys.py) routes it, and says why
    typo = "The Eifel Tower is located in the city of"
    (batch, why), = ke.route.explain(typo)
    assert batch == result.adapter and why.startswith("key 'Eiffel Tower' at 'Tower' (cosine ")
    # exact rollback: the base model's answers come back
    ke.rollback(result.adapter)
    assert ke.generate([EDIT.prompt] + UNRELATED, "default", max_new_tokens=6) == before
    assert ke.store().verify(ke.fingerprint) == []
