"""The evaluation harness on the tiny model: metric definitions checked against direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from kdpo_lora.config import EditConfig
from kdpo_lora.editor import Editor
from kdpo_lora.evaluate import (
    evaluate_request, evaluate_requests, fluency, generation_matches, ngram_entropy, pre_edit_locality, score_targets, summarise,
)
from kdpo_lora.requests import EditRequest, Probe

REQUEST = EditRequest(
    "the capital of japan is", "rome", subject="japan", target_true="tokyo",
    rephrase_prompts=("the capital city of japan is",),
    locality=(Probe("the capital of france is", "paris", "neighborhood"),
              Probe("the official language of spain is", "spanish", "neighborhood")),
    portability=(Probe("the capital of japan is located in", "italy", "one_hop"),),
)


def test_unedited_model_has_perfect_locality_and_consistent_scores(tiny_model, tokenizer):
    pre = pre_edit_locality(tiny_model, tokenizer, [REQUEST])
    row = evaluate_request(tiny_model, tokenizer, REQUEST, pre[0])
    assert row["locality"] == 1.0
    scored = score_targets(tiny_model, tokenizer, [REQUEST.prompt], [REQUEST.target_new])[0]
    assert row["edit_success"] == float(scored["argmax"] == scored["target"])
    assert row["gen_efficacy"] == float(generation_matches(tiny_model, tokenizer, [REQUEST.prompt], ["rome"])[0])
    assert {"rephrase_acc", "portability", "portability_one_hop", "efficacy_score", "paraphrase_score",
            "neighborhood_score"} <= set(row)


def test_after_an_edit_efficacy_and_generation_hold(tiny_model, tokenizer):
    pre = pre_edit_locality(tiny_model, tokenizer, [REQUEST])
    editor = Editor(tiny_model, tokenizer, EditConfig(learning_rate=5e-3, beta=1.0))
    editor.edit([REQUEST], progress=False)
    row = evaluate_request(editor.model, tokenizer, REQUEST, pre[0])
    assert row["edit_success"] == row["rewrite_acc"] == row["efficacy_score"] == row["gen_efficacy"] == 1.0
    summary = summarise([row, row])
    assert summary["edit_success"] == 1.0 and 0 <= summary["cf_score"] <= 1


def test_ngram_entropy_and_fluency(tiny_model, tokenizer):
    assert ngram_entropy("a a a a a a") == 0.0
    varied = ngram_entropy("the quick brown fox jumps over the lazy dog and runs far away")
    assert varied > ngram_entropy("the dog the dog the dog the dog the dog the dog") > 0
    # 13 distinct words: 12 distinct bigrams and 11 distinct trigrams, each uniform
    assert varied == pytest.approx((2 / 3 * math.log2(12) + 4 / 3 * math.log2(11)) / 2, rel=1e-9)
    score = fluency(tiny_model, tokenizer, ["the capital of"], samples=2, max_new_tokens=10, seed=3)
    torch.manual_seed(3)  # the same samples, scored by hand
    from kdpo_lora.evaluate import sample_texts

    texts = sample_texts(tiny_model, tokenizer, ["the capital of"], samples=2, max_new_tokens=10)[0]
    assert score == pytest.approx(sum(ngram_entropy(t) for t in texts) / 2) and score > 0


def test_locality_is_also_reported_per_probe_type_when_a_request_has_several(tiny_model, tokenizer):
    request = EditRequest("the capital of japan is", "rome", subject="japan",
                          locality=(Probe("the capital of france is", "paris", "Forgetfulness"),
                                    Probe("the official language of japan is", "japanese", "Relation_Specificity"),
                                    Probe("the river of japan is", "seine", "Relation_Specificity")))
    pre = pre_edit_locality(tiny_model, tokenizer, [request])[0]
    editor = Editor(tiny_model, tokenizer, EditConfig(learning_rate=5e-2, beta=1.0, preserve_weight=0.0))
    editor.edit([request], progress=False)
    row = evaluate_request(editor.model, tokenizer, request, pre, generation=False)
    now = [r["argmax"] for r in score_targets(editor.model, tokenizer, [p.prompt for p in request.locality],
                                               [p.answer for p in request.locality])]
    kept = [sum(a == b for a, b in zip(n, p)) / len(p) for n, p in zip(now, pre)]
    assert row["locality_Forgetfulness"] == kept[0]
    assert row["locality_Relation_Specificity"] == pytest.approx((kept[1] + kept[2]) / 2)
    assert row["locality"] == pytest.approx(sum(kept) / 3)
    assert "locality_neighborhood" not in evaluate_request(editor.model, tokenizer, REQUEST, [[0], [0]], False)


def test_requests_scored_together_get_the_metrics_each_gets_alone(tiny_model, tokenizer):
    other = EditRequest("the official language of spain is", "french", subject="spain",
                        rephrase_prompts=("in spain people speak", "the language of spain is"),
                        locality=(Probe("the capital of italy is", "rome"),))
    requests = [REQUEST, other, REQUEST]
    pre = pre_edit_locality(tiny_model, tokenizer, requests)
    assert pre == [pre_edit_locality(tiny_model, tokenizer, [r])[0] for r in requests]
    editor = Editor(tiny_model, tokenizer, EditConfig(learning_rate=5e-3, beta=1.0))
    editor.edit([REQUEST], progress=False)
    together = evaluate_requests(editor.model, tokenizer, requests, pre)
    alone = [evaluate_request(editor.model, tokenizer, r, p) for r, p in zip(requests, pre)]
    assert [set(row) for row in together] == [set(row) for row in alone]
    assert "efficacy_score" in together[0] and "efficacy_score" not in together[1]
    for row, single in zip(together, alone):
        assert row == pytest.approx(single, abs=1e-5)  # only padding differs between the two
