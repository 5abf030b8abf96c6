"""The router's key fallback on the real embedded model: calibrated, and every route it makes explained."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdpo_lora import subject_keys
from kdpo_lora.loading import load_model
from kdpo_lora.requests import read_requests
from kdpo_lora.routing import SubjectRouter
from kdpo_lora.subject_keys import KeyFallback, SubjectKeys

pytestmark = pytest.mark.slow
SAMPLES = Path(subject_keys.__file__).parent / "data" / "samples"


@pytest.fixture(scope="module")
def keys():
    loaded = load_model("smollm2-135m", "nf4", "cpu")
    return SubjectKeys(SimpleNamespace(model=loaded.model, tokenizer=loaded.tokenizer), loaded.fingerprint)


@pytest.fixture(scope="module")
def edits():
    """KnowEdit sample requests (their aliases not given: the fallback is for names not given)."""
    found = [replace(r, aliases=()) for r in read_requests(SAMPLES / "knowedit_wiki_counterfact_test.jsonl")]
    return [r for r in found if r.subject in r.prompt]


def test_each_key_is_calibrated_above_every_unrelated_token_and_held_out_prompts_rarely_pass(keys, edits):
    made = keys.keys(edits)
    assert len(made) == len(edits)
    calibration = keys.calibration()
    for key, threshold in made:
        assert float((calibration @ key).max()) + subject_keys.MARGIN == pytest.approx(threshold)
    matrix, thresholds = torch.stack([k for k, _ in made]), torch.tensor([t for _, t in made])
    # each edit's own prompt reaches its own key (the same state): the keys are the requests' own
    for i, request in enumerate(edits):
        best, where = keys.closest(request.prompt, matrix)
        assert best[i] > 0.99 and where[i].strip() and where[i].strip() in request.subject
    # held out: CounterFact prompts about other subjects, never seen by the calibration
    unrelated = [r.prompt for r in read_requests(SAMPLES / "counterfact.jsonl")[:60]]
    routed = sum(bool((keys.closest(p, matrix)[0] > thresholds).any()) for p in unrelated)
    assert routed <= 3, f"{routed} of {len(unrelated)} unrelated prompts passed a key"


def test_a_prompt_naming_no_subject_is_routed_by_key_and_says_why(keys, edits):
    batches = [(f"b{i}", [r]) for i, r in enumerate(edits)]
    router = SubjectRouter(batches, KeyFallback(keys, batches))
    khomeini = next(i for i, r in enumerate(edits) if r.subject == "Ruhollah Khomeini")
    (name, why), = router.explain("The place of birth of Imam Khomeini is")
    assert name == f"b{khomeini}" and why.startswith("key 'Ruhollah Khomeini' at 'ini' (cosine ")
    score, threshold = map(float, why.split("(cosine ")[1].rstrip(")").split(" > "))
    assert score > threshold
    # named literally: the subject explains it, and no key is consulted
    assert router.explain("Where was Ruhollah Khomeini born?") == [(f"b{khomeini}", "subject 'Ruhollah Khomeini'")]
    assert router.route("The capital of Japan is") == []
    assert SubjectRouter(batches).route("The place of birth of Imam Khomeini is") == []  # without the fallback
